"""The model protocol every built-in model follows, and user models may.

After scikit-learn: ``__init__(self, *, ...)`` only stores hyperparameters,
``fit`` returns ``self``, learned state lives in attributes ending with ``_``,
and ``clone()`` gives a fresh unfitted copy.  Parameters are validated
declaratively when ``fit`` runs.

After statsforecast: a model may fit a whole *batch* of series at once from a
ragged layout (:class:`SeriesBatch`: one values array plus offsets, straight
from Arrow).  The runner uses :meth:`Model.fit_batch`; the default loops over
:meth:`fit`, so a model only overrides it when it can do better.

Scoring contract (anomaly models): :meth:`Model.score` returns ``expected``,
``lower``, ``upper``, ``score`` (in [0, 1], higher is more anomalous,
comparable across models: ``robust_score`` of a standardised deviation) and
``is_anomaly``.  Thresholds are model parameters; the ``debounce`` and
``quiet`` parameters (see :func:`debounce`) are applied by :meth:`Model.score`
for every model, so an on-call team gets one alert per anomalous episode.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.special import erf

from ..exceptions import GROUP_ERRORS, ModelError, NotFittedError, ParameterError
from ._util import max_abs

__all__ = ["Param", "Model", "SeriesBatch", "SkipGroup", "robust_score", "debounce", "SCORE_KEYS",
           "SCORING_PARAMS", "dumps", "loads"]

_MAGIC = b"MFM1"
#: The keys every :meth:`Model.score` result has (one array each, one value per row).
SCORE_KEYS = ("expected", "lower", "upper", "score", "is_anomaly")
DEBOUNCE_MODES = ("none", "first")
#: Values beyond this magnitude skip their group: the squares that scales and least squares
#: are made of overflow float64 from about 1.3e154, and the models came out NaN yet "ok".
MAX_ABS_VALUE = 1e150


def too_large(name: str, y: np.ndarray) -> str | None:
    """Why the values ``y`` are too large to model (None when they are not)."""
    big = max_abs(y)
    if big <= MAX_ABS_VALUE:
        return None
    return (f"{name}: values as large as {big:.3g} are beyond what float64 arithmetic can model "
            f"(squares overflow past 1e154): rescale the target below {MAX_ABS_VALUE:g}")


class SkipGroup(Exception):
    """Raised by a model when a group's data does not suit it; the group is ``skipped``."""


@dataclass(frozen=True)
class Param:
    """A declared hyperparameter: its default and the rule it must follow."""

    default: Any
    kind: type | tuple = object
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    doc: str = ""

    def describe(self) -> str:
        """What the value must be, e.g. ``an int >= 2`` or ``one of 'ets', 'flat'``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        names = [k.__name__ for k in kinds if k is not type(None)]
        words = " or ".join(names) if names else "None"
        if float in kinds:
            words = "finite " + words
        words = ("an " if words[:1] in "aeiou" else "a ") + words
        if type(None) in kinds and names:
            words += " (or None)"
        if self.low is not None and self.high is not None:
            return f"{words} in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"{words} >= {self.low}"
        if self.high is not None:
            return f"{words} <= {self.high}"
        return words

    def check(self, owner: str, name: str, value: Any) -> None:
        ok = True
        if self.choices is not None:
            ok = value in self.choices
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            if float in kinds and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                pass
            elif not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                ok = False
            if ok and float in kinds and isinstance(value, float) and not math.isfinite(value):
                ok = False  # NaN passes every comparison below; a model with it never alerts
            if ok and value is not None and not isinstance(value, (str, bool)):
                if self.low is not None and value < self.low:
                    ok = False
                if self.high is not None and value > self.high:
                    ok = False
        if not ok:
            raise ParameterError(
                f"The {name!r} parameter of {owner} must be {self.describe()}. Got {value!r} instead."
            )


@dataclass
class SeriesBatch:
    """Many series in one ragged layout: series ``i`` is ``values[offsets[i]:offsets[i+1]]``.

    ``times`` are int64 seconds since the epoch (or None); ``features`` is a
    2-d float array with one row per value (or None).
    """

    values: np.ndarray
    offsets: np.ndarray
    times: np.ndarray | None = None
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def series(self, i: int):
        s, e = self.offsets[i], self.offsets[i + 1]
        t = None if self.times is None else self.times[s:e]
        x = None if self.features is None else self.features[s:e]
        return self.values[s:e], t, x

    def subset(self, idx: np.ndarray) -> "SeriesBatch":
        """The series ``idx`` as a new, smaller batch."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        take = (np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(idx)
                else np.zeros(0, np.int64))
        offsets = np.concatenate(([0], np.cumsum(ends - starts)))
        return SeriesBatch(self.values[take], offsets, None if self.times is None else self.times[take],
                           None if self.features is None else self.features[take])


def robust_score(z: np.ndarray) -> np.ndarray:
    """Map an absolute standardised deviation to [0, 1]: ``erf(|z| / sqrt 2)``,
    the two-sided normal probability mass within ``|z|``.  3 sigma gives 0.9973.

    NaN maps to 0 (a missing value is never anomalous).

    >>> robust_score(np.array([0.0, 3.0, np.nan])).round(4).tolist()
    [0.0, 0.9973, 0.0]
    """
    z = np.abs(np.asarray(z, dtype=np.float64))
    return np.where(np.isnan(z), 0.0, erf(np.nan_to_num(z, nan=0.0) / math.sqrt(2.0)))


def debounce(is_anomaly, mode: str = "first", quiet: int = 1) -> np.ndarray:
    """Turn per-point anomaly flags into alerts.

    ``mode="none"`` returns the flags unchanged.  ``mode="first"`` keeps only
    the first point of each anomalous episode, where an episode ends after
    ``quiet`` consecutive non-anomalous points (``quiet=1``: every run of
    consecutive anomalies is one episode; ``quiet=K``: anomalies separated by
    fewer than ``K`` quiet points belong to the same episode and alert once).
    Points before the first one count as quiet.

    >>> a = np.array([0, 1, 1, 0, 1, 0, 0, 1], dtype=bool)
    >>> debounce(a, "first").astype(int).tolist()
    [0, 1, 0, 0, 1, 0, 0, 1]
    >>> debounce(a, "first", quiet=2).astype(int).tolist()
    [0, 1, 0, 0, 0, 0, 0, 1]
    """
    flags = np.asarray(is_anomaly, dtype=bool)
    if mode not in DEBOUNCE_MODES:
        raise ParameterError(f"debounce mode must be one of {DEBOUNCE_MODES}; got {mode!r}.")
    if isinstance(quiet, bool) or not isinstance(quiet, (int, np.integer)) or quiet < 1:
        raise ParameterError(f"The 'quiet' parameter of debounce must be an int >= 1. Got {quiet!r} instead.")
    if mode == "none" or flags.size == 0:
        return flags.copy()
    idx = np.flatnonzero(flags)
    out = np.zeros_like(flags)
    if idx.size:
        gap = np.diff(idx) - 1  # quiet points between consecutive anomalies
        keep = np.concatenate(([True], gap >= quiet))
        out[idx[keep]] = True
    return out


_debounce = debounce  # Model.score has a parameter of the same name

#: Parameters every built-in anomaly model has; :meth:`Model.score` applies them.
SCORING_PARAMS: dict[str, Param] = {
    "debounce": Param("none", choices=DEBOUNCE_MODES,
                      doc="'first' alerts only on the first point of an anomalous episode"),
    "quiet": Param(1, int, low=1, doc="quiet points that end an episode (with debounce='first')"),
}


class Model:
    """Base class for modelfactory models.

    Subclasses declare ``params: ClassVar[dict[str, Param]]`` and implement
    :meth:`_fit` (one series) or override :meth:`fit_batch`, plus
    :meth:`_score`.  State is saved by :meth:`get_state` (a dict of numpy
    arrays and scalars) and restored by :meth:`set_state`, which serialise
    without pickle.
    """

    name: ClassVar[str] = "model"
    params: ClassVar[dict[str, Param]] = {}
    min_rows: ClassVar[int] = 1
    needs_time: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    #: True for a model that never reads feature columns (a model of the target over time):
    #: ``train`` then refuses ``features=``, which ``score`` would need in the new data too.
    ignores_features: ClassVar[bool] = False
    #: Whether values beyond :data:`MAX_ABS_VALUE` skip the group (False for a model that
    #: squares nothing, such as ``seasonal``'s medians and MADs).
    skips_huge_values: ClassVar[bool] = True
    #: Attribute names (ending in ``_``) that make up the fitted state.
    state_attrs: ClassVar[tuple[str, ...]] = ()
    #: Whether a row this model has no ``expected`` value for was not scored (True for the
    #: built-ins): ``score`` then reports a group none of whose rows has one as ``skipped``, with
    #: the reason, not ``ok`` with 0 anomalies.  False for a detector that expects nothing.
    expects_what_it_scores: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.params)
        if unknown:
            import difflib

            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, list(self.params), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"{type(self).__name__} has no parameter {name!r}.{hint} "
                f"Parameters: {', '.join(self.params) or '(none)'}."
            )
        for k, p in self.params.items():
            if not isinstance(p, Param):  # `params = {"k": 3.0}` was "AttributeError: 'float' object has no attribute 'default'"
                raise ModelError(
                    f"{type(self).__name__}.params[{k!r}] is {p!r}, a {type(p).__name__}: declare each parameter as a "
                    f"Param with its default, e.g. params = {{{k!r}: Param({p!r})}} "
                    "(from modelfactory.models import Param; Param(3.0, float, low=0) also checks the value).")
            v = kwargs.get(k, p.default)
            # numpy scalars as Python values: checked alike, and stored in JSON manifests
            setattr(self, k, v.item() if isinstance(v, np.generic) else v)

    # -- parameters -------------------------------------------------------
    def data_needs(self) -> tuple[bool, bool]:
        """Whether this model, with its parameters, needs (a time column, feature columns):
        checked before a job runs.  The class's ``needs_time`` / ``needs_features`` by default."""
        return self.needs_time, self.needs_features

    def uses_features(self) -> bool:
        """Whether this model, with its parameters, reads feature columns at all (not
        ``ignores_features`` by default; a user's model may, so it gets them)."""
        return not self.ignores_features

    def judges_target(self) -> bool:
        """Whether a row's score judges its target value (True by default): then a row whose value
        is missing scores 0 and is never flagged, and one of +-inf is as far off as can be.  False
        for a detector of whole rows that does not read the target (``isolation_forest`` with
        ``include_target=False``): its rows are scored on their features, whatever the target."""
        return True

    def required_rows(self) -> int:
        """The fewest non-missing values a series needs (groups with fewer are skipped)."""
        return self.min_rows

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.params}

    def validate_params(self) -> None:
        """Check every parameter against its declaration; raise :class:`ParameterError`."""
        for k, p in self.params.items():
            p.check(type(self).__name__, k, getattr(self, k))

    def clone(self) -> "Model":
        """A fresh, unfitted copy with the same parameters."""
        return type(self)(**self.get_params())

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != self.params[k].default}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # -- fitting ----------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.state_attrs) and all(hasattr(self, a) for a in self.state_attrs)

    def check_fitted(self) -> None:
        if not self.is_fitted:
            name = type(self).__name__
            missing = [a for a in self.state_attrs if not hasattr(self, a)]
            held = sorted(a for a in vars(self) if a.endswith("_") and not a.startswith("_") and a not in self.state_attrs)
            if held and missing:  # a stored model of this class as it was: state, under other names
                raise NotFittedError(
                    f"This {name} lacks {', '.join(missing)} of its state_attrs but holds {', '.join(held)}: if it "
                    "was stored by an earlier version of its class, the class changed since (train again with this "
                    "class, or restore the class as it was to use the stored models); if not, call fit() first.")
            if not self.state_attrs:  # fit() cannot help: nothing says what a fitted one holds
                raise NotFittedError(f"{name} declares no state_attrs, so it can never be scored or loaded as "
                                     "fitted: list the attributes its fit sets (e.g. state_attrs = ('mean_',)).")
            raise NotFittedError(f"This {name} is not fitted yet: call fit() first.")

    def fit(self, y, *, t=None, X=None) -> "Model":
        """Fit one series (``y`` values, ``t`` int64 seconds, ``X`` features)."""
        self.validate_params()
        y = np.asarray(y, dtype=np.float64)
        t = None if t is None else _as_seconds(t)
        X = None if X is None else _as_2d(X)
        self._check_data(y, t, X)
        if t is not None and y.size > 1 and (np.diff(t) < 0).any():
            # models of a series in time read it in time order (the step from consecutive
            # spacings, the grid, the windows): rows straight from an unsorted frame got a wrong
            # step and a skip saying "got 5 values", or a bare ValueError, where a run sorts them
            order = np.argsort(t, kind="stable")
            y, t, X = y[order], t[order], None if X is None else X[order]
        self._fit(y, t, X)
        return self

    def _check_data(self, y, t, X) -> None:
        if y.ndim != 1:
            raise ModelError(f"{self.name} fits one series: y must be 1-d; got shape {y.shape}.")
        if self.needs_time and t is None:
            raise ModelError(f"{self.name} needs a time column: pass time=.")
        if self.needs_features and (X is None or X.shape[1] == 0):
            raise ModelError(f"{self.name} needs feature columns: pass features=[...].")
        if t is not None and len(t) != len(y):
            raise ModelError(f"{self.name} got {len(y)} values but {len(t)} times.")
        if X is not None and len(X) != len(y):
            raise ModelError(f"{self.name} got {len(y)} values but {len(X)} feature rows.")
        if self.skips_huge_values and (why := too_large(self.name, y)) is not None:
            raise SkipGroup(why)
        if self.judges_target():
            n = int(np.count_nonzero(np.isfinite(y)))
            if n < self.required_rows():
                raise SkipGroup(f"{self.name} needs at least {self.required_rows()} non-missing values; got {n}")
        elif len(y) < self.required_rows():  # the target plays no part: rows count
            raise SkipGroup(f"{self.name} needs at least {self.required_rows()} rows; got {len(y)}")

    def _fit(self, y, t, X) -> None:
        """Fit one series; a batch model does it as a batch of one."""
        if type(self).fit_batch.__func__ is Model.fit_batch.__func__:
            raise NotImplementedError(f"{type(self).__name__} implements neither _fit nor fit_batch.")
        fitted = type(self).fit_batch(self.get_params(), SeriesBatch(y, np.array([0, len(y)]), t, X))[0]
        if isinstance(fitted, BaseException):
            raise fitted
        self.set_state(fitted.get_state())

    @classmethod
    def fit_batch(cls, params: dict, batch: SeriesBatch) -> list:
        """Fit every series of ``batch``; return one fitted model or exception per series.

        The default fits one series at a time; batch models override this.
        """
        out: list = []
        proto = cls(**params)
        proto.validate_params()
        for i in range(len(batch)):
            y, t, X = batch.series(i)
            try:
                out.append(proto.clone().fit(y, t=t, X=X))
            except GROUP_ERRORS as err:  # noqa: BLE001 - one group's failure is recorded, never fatal
                out.append(err)
        return out

    # -- scoring ----------------------------------------------------------
    def score(self, y, *, t=None, X=None, debounce: str | None = None,
              quiet: int | None = None) -> dict[str, np.ndarray]:
        """Score new rows of the group this model was fitted on.

        Parameters
        ----------
        y : array-like of float
            The new values (NaN is allowed: it scores 0 and is never anomalous; +-inf, where
            the model expects a value, scores 1 and is anomalous).
        t : array-like of int64 seconds or datetime64, optional
            Their times (needed by models with ``needs_time``).
        X : 2-d array-like, optional
            Their features (needed by models with ``needs_features``).
        debounce, quiet : optional
            Override the model's ``debounce`` / ``quiet`` parameters.

        Returns
        -------
        dict of numpy arrays, one value per row
            ``expected``, ``lower``, ``upper``, ``score`` (in [0, 1], higher
            is more anomalous) and ``is_anomaly`` (bool, after debouncing).
        """
        self.check_fitted()
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        t = None if t is None else _as_seconds(t).reshape(-1)
        X = None if X is None else _as_2d(X)
        if t is not None and len(t) != len(y):
            raise ModelError(f"score got {len(y)} values but {len(t)} times.")
        if X is not None and len(X) != len(y):
            raise ModelError(f"score got {len(y)} values but {len(X)} feature rows.")
        if self.needs_time and t is None:
            raise ModelError(f"{self.name} needs the time of each point to score it: pass t=.")
        if self.needs_features and X is None:
            raise ModelError(f"{self.name} needs the features of each point to score it: pass X=.")
        out = checked_scores(self._score(y, t, X), len(y), f"{type(self).__name__}._score")
        flags = out["is_anomaly"]
        if self.judges_target():
            # +-inf where the model expects a finite value (a broken rate, a division by zero upstream)
            # is as far off as a value can be: it scored 0 and was never flagged, an outage unseen
            broken = np.isinf(y) & np.isfinite(np.asarray(out["expected"], dtype=np.float64))
            missing = np.isnan(y)  # not judged: no flag, and no score that says otherwise
            out["score"] = np.where(broken, 1.0, np.where(missing, 0.0, out["score"]))
            flags = (flags & ~missing) | broken
        mode = getattr(self, "debounce", "none") if debounce is None else debounce
        k = getattr(self, "quiet", 1) if quiet is None else quiet
        out["is_anomaly"] = _debounce(flags, mode, k)
        return out

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} does not implement _score(self, y, t, X), so it cannot "
                                  f"score: return a dict of {', '.join(SCORE_KEYS)}, one value per row "
                                  "(see examples/custom_model.py)")

    @classmethod
    def score_batch(cls, models: list, batch: SeriesBatch, **kwargs: Any) -> dict[str, np.ndarray]:
        """Score every series of ``batch`` with its model (``models[i]``, or None).

        Returns the :data:`SCORE_KEYS` arrays for all rows of the batch, in
        batch order.  Rows of a series without a model get NaN ``expected``,
        ``lower`` and ``upper``, score 0 and no anomaly.  The default loops
        over :meth:`score`; models may override it with a vectorised version.
        """
        n = len(batch.values)
        out = {k: np.full(n, np.nan) for k in SCORE_KEYS[:3]}
        out["score"] = np.zeros(n)
        out["is_anomaly"] = np.zeros(n, dtype=bool)
        for i, model in enumerate(models):
            if model is None:
                continue
            s, e = int(batch.offsets[i]), int(batch.offsets[i + 1])
            y, t, X = batch.series(i)
            res = model.score(y, t=t, X=X, **kwargs)
            for key in SCORE_KEYS:
                out[key][s:e] = res[key]
        return out

    # -- state and serialisation -----------------------------------------
    def get_state(self) -> dict[str, Any]:
        self.check_fitted()
        return {a: getattr(self, a) for a in self.state_attrs}

    def set_state(self, state: dict[str, Any]) -> "Model":
        for a in self.state_attrs:
            setattr(self, a, state[a])
        return self

    def to_bytes(self) -> bytes:
        """Serialise parameters and fitted state without pickle."""
        return dumps(self.name, self.get_params(), self.get_state())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Model":
        name, params, state = loads(data)
        if name != cls.name:
            raise ModelError(f"These bytes hold a {name!r} model, not {cls.name!r}.")
        return cls(**params).set_state(state)


def checked_scores(out, n: int, who: str, rows: str = "one value per row") -> dict:
    """What a model's ``who`` (``X._score``, ``X.score_batch``) returned for ``n`` rows, held to the
    scoring contract, as a new dict: every :data:`SCORE_KEYS` key, ``n`` values each (a
    :class:`ModelError` naming ``who`` otherwise: numpy would broadcast a single value over every
    row without a word); a NaN score is 0 and scores are clipped to [0, 1]; ``is_anomaly`` as
    flags (:func:`as_flags`).  ``rows``: how the message says "``n`` values"."""
    keys = ", ".join(SCORE_KEYS)
    if not hasattr(out, "keys") or not hasattr(out, "__getitem__"):
        # a tuple of arrays (expected, lower, upper) was "ValueError: The truth value of an array
        # with more than one element is ambiguous" at the `in` test below
        raise ModelError(f"{who} returned {type(out).__name__}, not a dict; it must return a dict of {keys}, {rows}.")
    for key in SCORE_KEYS:
        if key not in out:
            raise ModelError(f"{who} returned no {key!r}; it must return {keys}, {rows}.")
        if np.shape(out[key]) != (n,):
            raise ModelError(f"{who} returned {key!r} of shape {np.shape(out[key])} for {n} rows; it must return "
                             f"{rows}.")
    out = dict(out)
    score = np.asarray(out["score"], dtype=np.float64)
    if np.isnan(score).any() or (score < 0).any() or (score > 1).any():  # (a copy only where one is needed)
        score = np.clip(np.nan_to_num(score, nan=0.0), 0.0, 1.0)
    out["score"], out["is_anomaly"] = score, as_flags(out["is_anomaly"])
    return out


def as_flags(values) -> np.ndarray:
    """A model's ``is_anomaly`` as booleans: a missing value (NaN, None) is no flag, where
    ``bool(nan)`` is True and would flag every row a model has no opinion on."""
    a = np.asarray(values)
    if a.dtype == bool:
        return a
    if a.dtype.kind == "f":
        return np.nan_to_num(a, nan=0.0) != 0
    if a.dtype.kind == "O":  # (pandas' nullable booleans and NA come as objects)
        return np.array([_flag(v) for v in a.ravel()], dtype=bool).reshape(a.shape)
    return a.astype(bool)


def _flag(v) -> bool:
    """One ``is_anomaly`` value as a flag: None, NaN (of any float type) and pandas' NA are none."""
    if v is None:
        return False
    with contextlib.suppress(TypeError, ValueError):  # (not a number: text, pd.NA)
        if np.isnan(v):
            return False
    try:
        return bool(v)
    except (TypeError, ValueError):  # pd.NA: "boolean value of NA is ambiguous"
        return False


def _as_2d(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X.reshape(-1, 1) if X.ndim == 1 else X


def _as_seconds(t) -> np.ndarray:
    """Epoch seconds from numbers, numpy datetimes, or pandas times (tz-aware included)."""
    if hasattr(t, "dt") or (hasattr(t, "dtype") and str(getattr(t, "dtype", "")).startswith("datetime64[")) \
            and not isinstance(t, np.ndarray):
        import pandas as pd

        return pd.to_datetime(t, utc=True).to_numpy("datetime64[s]").astype(np.int64)
    t = np.asarray(t)
    if t.dtype == object and t.size and hasattr(t.flat[0], "timestamp"):
        import pandas as pd

        return pd.to_datetime(t, utc=True).to_numpy("datetime64[s]").astype(np.int64)
    if np.issubdtype(t.dtype, np.datetime64):
        return t.astype("datetime64[s]").astype(np.int64)
    return t.astype(np.int64)


def dumps(name: str, params: dict, state: dict) -> bytes:
    """Compact, pickle-free serialisation: a JSON header and raw array bytes."""
    arrays, scalars, buf = [], {}, io.BytesIO()
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            arrays.append([k, a.dtype.str, list(a.shape)])
            buf.write(a.tobytes())
        else:
            scalars[k] = v.item() if isinstance(v, np.generic) else v
    header = json.dumps({"m": name, "p": params, "a": arrays, "s": scalars},
                        separators=(",", ":")).encode()
    return _MAGIC + len(header).to_bytes(4, "little") + header + buf.getvalue()


def loads(data: bytes) -> tuple[str, dict, dict]:
    if data[:4] != _MAGIC:
        raise ModelError("Not a modelfactory model (bad magic bytes).")
    n = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + n])
    pos, state = 8 + n, dict(header["s"])
    for k, dt, shape in header["a"]:
        dtype = np.dtype(dt)
        count = int(np.prod(shape)) if shape else 1
        state[k] = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(shape)
        pos += count * dtype.itemsize
    return header["m"], header["p"], state
