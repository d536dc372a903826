"""Conformance checks for modelfactory models: run them on your own model too.

>>> from modelfactory.models import get
>>> report = check_model(get("seasonal"))
>>> report["bytes"] < 2_000
True

:func:`check_model` fits the model on small synthetic hourly series (always
passing times and two feature columns; a model ignores what it does not
need) and checks the protocol the runner relies on.  A failed check raises
:class:`ConformanceError` (an ``AssertionError``) whose message starts with
``check_model[<check>]``.  The checks:

``params``         ``get_params``/``clone``/``validate_params``/``repr`` agree; a clone is unfitted
``unfitted``       scoring before ``fit`` raises ``NotFittedError``
``fit``            ``fit`` returns the model itself; the fitted state ends with ``_``
``score``          the scoring contract: keys, lengths, ``score`` in [0, 1], bool flags, lower <= upper
``spike``          a 30-sigma spike scores at least as high as ordinary points
``serialisation``  ``to_bytes`` is not a pickle; ``from_bytes`` scores identically
``determinism``    two fits of clones score identically
``constant``       a constant series is skipped (``SkipGroup``) or fits a sane model
``short``          a 3-point series is skipped or fits a sane model
``gaps``           a series with NaNs and missing timestamps is skipped or fits a sane model,
                   and a NaN value scores 0 and is never an anomaly (for a model that judges the
                   target: ``judges_target()``)
``all_nan``        an all-NaN series is skipped (a model that does not judge the target: it is
                   skipped, or fits a model that scores by the contract)
``batch``          ``fit_batch`` returns one entry per series and matches ``fit``
``debounce``       ``debounce="first"`` keeps a subset of the flags
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .exceptions import NotFittedError
from .models.base import SCORE_KEYS, Model, SeriesBatch, SkipGroup

__all__ = ["check_model", "ConformanceError", "make_series"]

_HOUR = 3600


class ConformanceError(AssertionError):
    """A model broke the modelfactory model protocol; the message names the check."""


def make_series(n: int, *, period: int = 24, seed: int = 0, start: int = 1_767_571_200,
                step: int = _HOUR, features: int = 2):
    """A smooth seasonal series with noise: ``(y, t, X)`` with ``n`` rows.

    ``X`` holds ``features`` columns that explain most of ``y`` (for
    feature models); ``t`` is int64 epoch seconds every ``step``.

    >>> y, t, X = make_series(48)
    >>> y.shape, t.dtype.name, X.shape
    ((48,), 'int64', (48, 2))
    """
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    phase = 2 * np.pi * i / max(period, 1)
    X = np.column_stack([np.sin(phase), np.cos(phase)] + [rng.normal(size=n) for _ in range(features - 2)])
    X = X[:, :features]
    y = 100 + 10 * np.sin(phase) + 0.02 * i + rng.normal(0, 1.0, n)
    return y, start + i.astype(np.int64) * step, X


def _fail(check: str, model: Model, msg: str, err: BaseException | None = None):
    text = f"check_model[{check}] {type(model).__name__}: {msg}"
    if err is not None:
        text += f" ({type(err).__name__}: {err})"
        raise ConformanceError(text) from err
    raise ConformanceError(text)


def _period(model: Model) -> int:
    m = getattr(model, "season_length", None)
    return int(m) if isinstance(m, (int, np.integer)) and m >= 2 else 24


def _check_result(model: Model, res: Any, n: int, check: str) -> None:
    if not isinstance(res, dict):
        _fail(check, model, f"score must return a dict; got {type(res).__name__}")
    missing = [k for k in SCORE_KEYS if k not in res]
    if missing:
        _fail(check, model, f"score result lacks {missing}")
    for k in SCORE_KEYS:
        a = np.asarray(res[k])
        if a.shape != (n,):
            _fail(check, model, f"score[{k!r}] has shape {a.shape}; expected ({n},)")
    s = np.asarray(res["score"], dtype=np.float64)
    if not (np.all(np.isfinite(s)) and s.min(initial=0) >= 0 and s.max(initial=0) <= 1):
        _fail(check, model, "score must be finite and in [0, 1]")
    if np.asarray(res["is_anomaly"]).dtype != bool:
        _fail(check, model, f"is_anomaly must be bool; got {np.asarray(res['is_anomaly']).dtype}")
    lo, hi = np.asarray(res["lower"], float), np.asarray(res["upper"], float)
    both = np.isfinite(lo) & np.isfinite(hi)
    if np.any(lo[both] > hi[both]):
        _fail(check, model, "lower must not exceed upper")


def _same(a: dict, b: dict) -> bool:
    return all(np.allclose(np.asarray(a[k], float), np.asarray(b[k], float), rtol=1e-9, atol=1e-12,
                           equal_nan=True) for k in SCORE_KEYS)


def _try_fit(model: Model, check: str, y, t, X):
    """Fit a clone; return the model, or None when it skips the group (with a reason)."""
    try:
        return model.clone().fit(y, t=t, X=X)
    except SkipGroup as err:
        if not str(err).strip():
            _fail(check, model, "SkipGroup needs a reason (an empty message was raised)")
        return None
    except Exception as err:  # noqa: BLE001 - any other error breaks the contract
        _fail(check, model, "must fit or raise SkipGroup with a reason", err)


def _sane(model: Model, fitted: Model, check: str, y, t, X) -> dict:
    try:
        res = fitted.score(y, t=t, X=X)
    except Exception as err:  # noqa: BLE001
        _fail(check, model, "a fitted model must score", err)
    _check_result(model, res, len(y), check)
    exp = np.asarray(res["expected"], float)
    if np.isfinite(y).any() and not np.isfinite(exp[np.isfinite(y)]).any() and not _detector(model):
        _fail(check, model, "a fitted model must not predict only NaN (a silent NaN model); if it is a detector "
                            "that expects nothing, say so: expects_what_it_scores = False in its class")
    return res


def _detector(model: Model) -> bool:
    """Whether the model's own class (or a base of it other than :class:`Model`) declares
    ``expects_what_it_scores = False``: a detector whose ``expected`` is NaN by design.  Model's
    own default, False, says nothing of a class that never thought of it."""
    for c in type(model).__mro__:
        if c is Model:
            return False
        if "expects_what_it_scores" in vars(c):
            return not c.expects_what_it_scores
    return False


def check_model(model: Model, *, seed: int = 0) -> dict[str, Any]:
    """Check that ``model`` (an unfitted instance) follows the modelfactory model protocol.

    Returns a small report: ``{"checks": [...passed...], "bytes": size of the
    serialised model}``.  Raises :class:`ConformanceError` naming the first
    failed check.

    Examples
    --------
    >>> from modelfactory.models import get
    >>> report = check_model(get("seasonal"))
    >>> "serialisation" in " ".join(report["checks"]) and report["bytes"] < 2000
    True
    """
    if not isinstance(model, Model):
        raise ConformanceError(f"check_model[type] needs a modelfactory Model instance; got {type(model).__name__}")
    passed: list[str] = []
    judges = bool(model.judges_target())
    m = _period(model)
    need = max(int(model.required_rows()), 4)
    n = max(2 * need, 4 * m, 96)
    y, t, X = make_series(n + m, period=m, seed=seed)
    ynew, tnew, Xnew = y[n:], t[n:], X[n:]
    y, t, X = y[:n], t[:n], X[:n]

    # params
    try:
        model.validate_params()
        params = model.get_params()
        twin = model.clone()
        repr(model)
    except Exception as err:  # noqa: BLE001
        _fail("params", model, "validate_params/get_params/clone/repr must work", err)
    if set(params) != set(type(model).params):
        _fail("params", model, f"get_params() keys {sorted(params)} differ from the declared {sorted(type(model).params)}")
    if twin is model or type(twin) is not type(model) or twin.get_params() != params:
        _fail("params", model, "clone() must return a new model of the same type with the same parameters")
    if twin.is_fitted:
        _fail("params", model, "clone() must return an unfitted model")
    passed.append("params")

    # unfitted
    try:
        twin.score(ynew, t=tnew, X=Xnew)
    except NotFittedError:
        passed.append("unfitted")
    except Exception as err:  # noqa: BLE001
        _fail("unfitted", model, "scoring before fit must raise NotFittedError", err)
    else:
        _fail("unfitted", model, "scoring before fit must raise NotFittedError")

    # fit
    fitted = model.clone()
    try:
        ret = fitted.fit(y, t=t, X=X)
    except Exception as err:  # noqa: BLE001
        _fail("fit", model, f"fit must succeed on a clean seasonal series of {n} rows", err)
    if ret is not fitted:
        _fail("fit", model, "fit must return the model itself (self)")
    if not fitted.is_fitted:
        _fail("fit", model, "after fit, is_fitted must be True (set every attribute of state_attrs)")
    bad = [a for a in fitted.state_attrs if not a.endswith("_")]
    if bad:
        _fail("fit", model, f"fitted state attributes must end with '_': {bad}")
    passed.append("fit")

    # score
    res = _sane(model, fitted, "score", ynew, tnew, Xnew)
    passed.append("score")

    # spike
    spiked = ynew.copy()
    spiked[m // 2] += 30.0
    sres = fitted.score(spiked, t=tnew, X=Xnew)
    if sres["score"][m // 2] < np.median(np.asarray(res["score"])):
        _fail("spike", model, "a 30-sigma spike must score at least the median of ordinary points")
    passed.append("spike")

    # serialisation
    try:
        data = fitted.to_bytes()
        back = type(model).from_bytes(data)
    except Exception as err:  # noqa: BLE001
        _fail("serialisation", model, "to_bytes/from_bytes must round-trip", err)
    if not isinstance(data, bytes) or data[:1] == b"\x80":
        _fail("serialisation", model, "to_bytes must return bytes that are not a pickle")
    if back.get_params() != fitted.get_params() or not _same(back.score(ynew, t=tnew, X=Xnew), res):
        _fail("serialisation", model, "a model loaded from bytes must have the same parameters and scores")
    passed.append("serialisation")

    # determinism
    again = model.clone().fit(y, t=t, X=X)
    if not _same(again.score(ynew, t=tnew, X=Xnew), res):
        _fail("determinism", model, "two fits on the same data must score identically (fix random_state)")
    passed.append("determinism")

    # constant
    const = np.full(n, 5.0)
    got = _try_fit(model, "constant", const, t, X)
    if got is not None:
        r = _sane(model, got, "constant", np.full(m, 5.0), tnew, Xnew)
        if np.any(np.abs(np.asarray(r["expected"], float) - 5.0) > 1e-6 * 5):
            _fail("constant", model, "a model of a constant series must expect the constant")
        if np.any(r["is_anomaly"]):
            _fail("constant", model, "the constant itself must not be anomalous")
    passed.append("constant")

    # short
    got = _try_fit(model, "short", y[:3], t[:3], X[:3])
    if got is not None:
        _sane(model, got, "short", ynew, tnew, Xnew)
    passed.append("short")

    # gaps and NaNs
    rng = np.random.default_rng(seed + 1)
    keep = np.ones(n, dtype=bool)
    keep[n // 3:n // 3 + 3] = False  # three missing timestamps
    yg = y.copy()
    yg[rng.choice(n, size=max(1, n // 20), replace=False)] = np.nan
    got = _try_fit(model, "gaps", yg[keep], t[keep], X[keep])
    if got is not None:
        probe = ynew.copy()
        probe[1] = np.nan
        r = _sane(model, got, "gaps", probe, tnew, Xnew)
        if judges and (r["score"][1] != 0 or r["is_anomaly"][1]):
            _fail("gaps", model, "a NaN value must score 0 and never be an anomaly")
    passed.append("gaps")

    # all NaN (a model that does not judge the target fits on the features alone)
    if judges:
        try:
            model.clone().fit(np.full(n, np.nan), t=t, X=X)
        except SkipGroup:
            passed.append("all_nan")
        except Exception as err:  # noqa: BLE001
            _fail("all_nan", model, "an all-NaN series must raise SkipGroup", err)
        else:
            _fail("all_nan", model, "an all-NaN series must raise SkipGroup, not fit")
    else:
        got = _try_fit(model, "all_nan", np.full(n, np.nan), t, X)
        if got is not None:
            _check_result(model, got.score(ynew, t=tnew, X=Xnew), len(ynew), "all_nan")
        passed.append("all_nan")

    # batch
    cls = type(model)
    series = [(y, t, X), (const, t, X), (y[:3], t[:3], X[:3])]
    batch = SeriesBatch(np.concatenate([s[0] for s in series]),
                        np.cumsum([0] + [len(s[0]) for s in series]),
                        np.concatenate([s[1] for s in series]), np.concatenate([s[2] for s in series]))
    try:
        out = cls.fit_batch(model.get_params(), batch)
    except Exception as err:  # noqa: BLE001
        _fail("batch", model, "fit_batch must return per-series results, not raise", err)
    if len(out) != 3 or not all(isinstance(o, (Model, Exception)) for o in out):
        _fail("batch", model, "fit_batch must return one model or exception per series")
    if not isinstance(out[0], Model) or not _same(out[0].score(ynew, t=tnew, X=Xnew), res):
        _fail("batch", model, "fit_batch must give the same model as fit for each series")
    passed.append("batch")

    # debounce
    raw = fitted.score(spiked, t=tnew, X=Xnew, debounce="none")["is_anomaly"]
    first = fitted.score(spiked, t=tnew, X=Xnew, debounce="first")["is_anomaly"]
    if np.any(first & ~raw):
        _fail("debounce", model, "debounce='first' may only remove alerts")
    passed.append("debounce")
    return {"checks": passed, "bytes": len(data)}
