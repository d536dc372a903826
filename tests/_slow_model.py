"""A seasonal model that sleeps per unit when MF_SLOW is set: makes "mid-run" easy to hit."""
from __future__ import annotations

import os
import time

from modelfactory.models.seasonal import SeasonalProfile


class SlowSeasonal(SeasonalProfile):
    @classmethod
    def fit_batch(cls, params, batch):
        time.sleep(float(os.environ.get("MF_SLOW", "0")))
        return super().fit_batch(params, batch)

    @classmethod
    def score_batch(cls, models, batch, **kwargs):
        time.sleep(float(os.environ.get("MF_SLOW_SCORE", "0")))
        return super().score_batch(models, batch, **kwargs)
