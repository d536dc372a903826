"""modelfactory: one model per group, for millions of groups, on Dask.

>>> import modelfactory
>>> sorted(modelfactory.__all__)[:3]
['ModelFactoryError', 'ModelStore', 'Run']
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import demo, models  # noqa: E402
from .api import Run, apply, map_keys, score, train  # noqa: E402
from .exceptions import ModelFactoryError  # noqa: E402
from .models import SkipGroup, register_model  # noqa: E402
from .store import ModelStore  # noqa: E402
from .plot import plot_series  # noqa: E402  (loads the module modelfactory.plot, callable as plot_series)
from . import plot  # modelfactory.plot(...) draws; modelfactory.plot.load_series and the rest too

__all__ = ["train", "score", "apply", "map_keys", "Run", "ModelStore", "register_model", "models", "demo",
           "plot", "plot_series", "ModelFactoryError", "SkipGroup", "__version__"]
