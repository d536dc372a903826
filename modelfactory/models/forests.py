"""``isolation_forest`` and ``random_forest``: scikit-learn forests, stored as arrays, scored in numpy.

Both fit scikit-learn (``n_jobs=1``, a fixed ``random_state``) and then keep
only the trees' arrays (see :mod:`modelfactory.models._trees`): serialisation
needs no pickle, and scoring re-implements ``score_samples`` / ``predict`` in
numpy, with the same results as scikit-learn.

Missing feature values (NaN) are replaced by the feature's training median when
fitting, and by ``isolation_forest`` when scoring.  ``random_forest`` scores a row
that misses some of its features by its prediction averaged over the training
distribution of the missing ones (ten of its quantiles), with a band widened by the
spread of those predictions: with the training median in their place, 40-70 % of
clean rows missing one of two features were flagged.  A row to score whose
features are all missing is not scored (``expected`` NaN, score 0): a forest fed
only medians predicts one value for every row, and flagged most rows of a group
whose features went missing.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..exceptions import ModelError
from ._trees import apply_trees, pack_trees
from ._util import center_scale, fit_quietly, grid_step, max_abs, scale_floor
from .base import SCORING_PARAMS, Model, Param, SkipGroup, robust_score

__all__ = ["IsolationForest", "RandomForest", "average_path_length"]

_TREE_KEYS = ("tree_offsets", "tree_right", "tree_feature", "tree_threshold", "tree_value")
#: The quantiles of each feature a random_forest averages its prediction over where that feature is
#: missing: the midpoints of ten equal shares of its training values.
_LEVELS = (np.arange(10) + 0.5) / 10


def average_path_length(n) -> np.ndarray:
    """``c(n)``: the average path length of an unsuccessful search in a binary search tree of ``n``.

    >>> average_path_length(np.array([1, 2, 256])).round(3).tolist()
    [0.0, 1.0, 10.245]
    """
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros(n.shape)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _Forest(Model):
    expects_what_it_scores = True
    needs_features = True

    def required_rows(self) -> int:
        return self.min_values

    def _matrix(self, y, X, fitting: bool) -> np.ndarray:
        M = X if not self._uses_target() else np.column_stack([X, y])
        M = np.asarray(M, dtype=np.float64)
        if M.ndim == 1:
            M = M.reshape(-1, 1)
        if fitting:
            big = np.abs(np.where(np.isfinite(M), M, 0.0)).max(initial=0.0)
            if big > np.finfo(np.float32).max:  # scikit-learn's trees split float32 copies: inf beyond it
                raise SkipGroup(f"{self.name}: a value as large as {big:.3g} in the features"
                                f"{' or target' if self._uses_target() else ''} does not fit scikit-learn's "
                                "float32 trees (at most 3.4e38): rescale that column")
            if not np.isfinite(M).any(axis=0).all():
                bad = int(np.flatnonzero(~np.isfinite(M).any(axis=0))[0])
                k = bad + 1
                nth = f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
                raise SkipGroup(f"{self.name}: the {nth} feature column (in the order of features=) has no "
                                "finite value in this group")
            self.medians_ = np.nanmedian(np.where(np.isfinite(M), M, np.nan), axis=0)
        elif M.shape[1] != len(self.medians_):
            raise ModelError(f"{self.name} was fitted on {len(self.medians_) - self._uses_target()} "
                             f"feature columns; got {np.shape(X)[1]}.")
        return np.where(np.isfinite(M), M, self.medians_)

    def _uses_target(self) -> bool:
        return False

    @staticmethod
    def _unscored(X) -> np.ndarray:
        """Rows whose features are all missing: nothing to predict or isolate them from."""
        X = np.asarray(X, dtype=np.float64)
        return ~np.isfinite(X.reshape(len(X), -1)).any(axis=1) if X.size else np.zeros(len(X), bool)

    @staticmethod
    def _drop(out: dict, rows: np.ndarray) -> dict:
        if rows.any():
            for k in ("expected", "lower", "upper"):
                out[k] = np.where(rows, np.nan, out[k])
            out["score"] = np.where(rows, 0.0, out["score"])
            out["is_anomaly"] = out["is_anomaly"] & ~rows
        return out

    def _trees(self) -> dict:
        return {k: getattr(self, k + "_") for k in _TREE_KEYS} | (
            {"tree_left": self.tree_left_} if getattr(self, "tree_left_", None) is not None else {})

    def _store_trees(self, packed: dict) -> None:
        for k, v in packed.items():
            setattr(self, k + "_", v)
        if "tree_left" not in packed:
            self.tree_left_ = None

    def get_state(self):
        state = super().get_state()
        if getattr(self, "tree_left_", None) is not None:
            state["tree_left_"] = self.tree_left_
        return state

    def set_state(self, state):
        super().set_state(state)
        self.tree_left_ = state.get("tree_left_")
        return self


class IsolationForest(_Forest):
    """scikit-learn's ``IsolationForest`` per group, for per-request anomaly detection.

    Parameters
    ----------
    n_estimators : int, default 50
        Trees (fewer than scikit-learn's 100 to keep per-group models small).
    max_samples : int, default 256
        Rows drawn to build each tree (all rows when the group has fewer).
    include_target : bool, default True
        Use the target column as one more feature.
    threshold : float, default 3.5
        Robust z-score of the isolation score (against its training
        distribution) beyond which a row is anomalous.
    min_values : int, default 32
        Fewest rows to fit.
    random_state : int, default 0
    debounce, quiet
        See :func:`modelfactory.models.base.debounce`.

    Data it needs: feature columns (rows need not be regular in time).  NaN
    features are replaced by training medians; a column with no finite
    value skips the group.  A constant group fits (every row isolates the
    same) and never alerts.  ``expected``/``lower``/``upper`` describe the
    target's training distribution (median +- threshold robust sigmas); the
    ``score`` comes from the forest.
    """

    name = "isolation_forest"
    params: ClassVar = {
        "n_estimators": Param(50, int, low=1, high=10_000, doc="trees"),
        "max_samples": Param(256, int, low=2, doc="rows per tree"),
        "include_target": Param(True, bool, doc="use the target as a feature"),
        "threshold": Param(3.5, float, low=0.0, doc="robust z of the isolation score"),
        "min_values": Param(32, int, low=2, doc="fewest rows to fit"),
        "random_state": Param(0, int, low=0, doc="seed"),
        **SCORING_PARAMS,
    }
    state_attrs: ClassVar = ("medians_", "max_samples_", "offset_", "center_", "scale_", "y_center_",
                             "y_scale_", "notes_") + tuple(k + "_" for k in _TREE_KEYS)

    def _uses_target(self) -> bool:
        return bool(self.include_target)

    def judges_target(self) -> bool:
        return bool(self.include_target)

    def _fit(self, y, t, X) -> None:
        from sklearn.ensemble import IsolationForest as _IF

        M = self._matrix(y, X, fitting=True)
        est = _IF(n_estimators=self.n_estimators, max_samples=min(self.max_samples, len(M)),
                  random_state=self.random_state, n_jobs=1)
        est, self.notes_ = fit_quietly(lambda: est.fit(M.astype(np.float32)))
        if est._max_features != M.shape[1]:  # pragma: no cover - we never subsample features
            raise NotImplementedError("feature subsampling is not supported")
        self._store_trees(pack_trees([e.tree_ for e in est.estimators_],
                                     lambda tr: tr.n_node_samples, np.int32))
        self.tree_value_ = self.tree_value_.astype(np.uint16 if self.tree_value_.max() < 2 ** 16 else np.int32)
        self.max_samples_ = int(est._max_samples)
        self.offset_ = float(est.offset_)
        s = -self.score_samples(M, prepared=True)
        self.center_, self.scale_ = center_scale(s, floor=1e-3)
        self.y_center_, self.y_scale_ = center_scale(y, floor=scale_floor(max_abs(y)))

    def score_samples(self, X, *, prepared: bool = False, y=None) -> np.ndarray:
        """scikit-learn's ``IsolationForest.score_samples`` (the opposite of the anomaly score), in numpy.

        ``X`` holds the feature columns (plus the target as the last column
        when ``include_target``), or pass ``y`` separately.
        """
        M = np.asarray(X, dtype=np.float64)
        if not prepared:
            if y is None and M.shape[1] != len(self.medians_):
                raise ModelError(f"isolation_forest was fitted on {len(self.medians_)} columns "
                                 f"(features{' and target' if self.include_target else ''}); got {M.shape[1]}.")
            M = np.where(np.isfinite(M), M, self.medians_) if y is None else self._matrix(y, M, False)
        packed = self._trees()
        leaf, depth = apply_trees(packed, M)
        n_leaf = np.asarray(self.tree_value_, dtype=np.float64)[leaf]
        depths = np.zeros(M.shape[0])
        for d, c in zip(depth, average_path_length(n_leaf)):  # tree by tree, as scikit-learn adds
            depths += d + c
        denom = len(packed["tree_offsets"]) - 1
        denom = denom * average_path_length(np.array([self.max_samples_]))[0]
        return -(2.0 ** (-(depths / denom if denom else np.ones_like(depths))))

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        s = -self.score_samples(self._matrix(np.where(np.isfinite(y), y, self.y_center_), X, False),
                                prepared=True)
        z = np.maximum((s - self.center_) / self.scale_, 0.0)  # only "easier to isolate" is anomalous
        expected = np.full(y.shape, self.y_center_)
        return self._drop({
            "expected": expected,
            "lower": expected - self.threshold * self.y_scale_,
            "upper": expected + self.threshold * self.y_scale_,
            "score": robust_score(z),
            "is_anomaly": z > self.threshold,
        }, self._unscored(X))


class RandomForest(_Forest):
    """scikit-learn's ``RandomForestRegressor`` from features to the target, per group.

    Parameters
    ----------
    n_estimators : int, default 50
    max_depth : int or None, default None
    min_samples_leaf : int, default 3
    max_features : float, default 1.0
        Fraction of features tried at each split.
    threshold : float, default 3.5
        Robust z-score of a residual, against the out-of-bag residuals, beyond
        which a row is anomalous.
    min_values : int, default 20
        Fewest rows with a finite target to fit.
    random_state : int, default 0
    debounce, quiet
        See :func:`modelfactory.models.base.debounce`.

    ``expected`` is the forest's prediction; the anomaly score standardises
    the residual by the median and robust sigma of the out-of-bag residuals
    (honest, unlike in-sample residuals).  Rows with a NaN target are not
    used to fit; NaN features are replaced by training medians.  A constant
    target fits exactly and gets a tiny floor scale.
    """

    name = "random_forest"
    params: ClassVar = {
        "n_estimators": Param(50, int, low=1, high=10_000, doc="trees"),
        "max_depth": Param(None, (int, type(None)), low=1, doc="deepest split"),
        "min_samples_leaf": Param(3, int, low=1, doc="fewest rows in a leaf"),
        "max_features": Param(1.0, float, low=0.01, high=1.0, doc="fraction of features per split"),
        "threshold": Param(3.5, float, low=0.0, doc="robust z of the residual"),
        "min_values": Param(20, int, low=2, doc="fewest rows to fit"),
        "random_state": Param(0, int, low=0, doc="seed"),
        **SCORING_PARAMS,
    }
    state_attrs: ClassVar = ("medians_", "quantiles_", "center_", "scale_", "notes_") + tuple(
        k + "_" for k in _TREE_KEYS)

    def _fit(self, y, t, X) -> None:
        from sklearn.ensemble import RandomForestRegressor

        ok = np.isfinite(y)
        M = self._matrix(y[ok], X[ok], fitting=True)
        with np.errstate(all="ignore"):  # a column with no finite value skipped the group in _matrix
            raw = np.asarray(X[ok], dtype=np.float64).reshape(int(ok.sum()), -1)
            self.quantiles_ = np.nanquantile(np.where(np.isfinite(raw), raw, np.nan), _LEVELS, axis=0)
        # a fraction, always: scikit-learn reads an int as a count of features (1: one per split)
        est = RandomForestRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                    min_samples_leaf=self.min_samples_leaf, max_features=float(self.max_features),
                                    bootstrap=True, oob_score=True, random_state=self.random_state, n_jobs=1)
        # The trees grow on the target centred and scaled by a power of two: scikit-learn takes a node
        # whose variance is at most float64's epsilon (2.2e-16) for pure and never splits it, so a target
        # with a spread below about 1e-8 (or on a large offset, whose variance it computes as a small
        # difference of large numbers) grew trees of one leaf.  A power of two scales exactly.
        center = float(np.median(y[ok]))
        spread = float(np.std(y[ok] - center))
        power = -int(np.round(np.log2(spread))) if spread > 0 and np.isfinite(spread) else 0
        est, self.notes_ = fit_quietly(lambda: est.fit(M, np.ldexp(y[ok] - center, power)))
        self._store_trees(pack_trees([e.tree_ for e in est.estimators_],
                                     lambda tr: np.ldexp(tr.value[:, 0, 0], -power) + center))
        oob = np.ldexp(np.asarray(est.oob_prediction_, dtype=np.float64).reshape(-1), -power) + center
        # scikit-learn predicts 0 for a row that no tree left out of its bootstrap sample (with few
        # trees, many rows): its "residual" is the value itself, and with n_estimators=1 the scale
        # then flagged almost every clean row, with 2 or 3 it was ten times too wide to see a spike
        left_out = np.zeros(len(M), dtype=bool)
        for drawn in est.estimators_samples_:
            in_bag = np.zeros(len(M), dtype=bool)
            in_bag[drawn] = True
            left_out |= ~in_bag
        if not left_out.any():
            raise ModelError(f"random_forest: no row was left out of every tree's bootstrap sample, so there "
                             f"are no out-of-bag residuals to scale anomalies by; raise n_estimators "
                             f"(got {self.n_estimators})")
        floor = scale_floor(np.max(np.abs(y[ok])))
        # counts and integer gauges: most residuals are tied, and their MAD collapses (see tie_floor)
        self.center_, self.scale_ = center_scale((y[ok] - oob)[left_out], floor=floor, step=grid_step(y[ok]))

    def predict(self, X) -> np.ndarray:
        """scikit-learn's ``RandomForestRegressor.predict``, in numpy."""
        M = self._matrix(None, np.asarray(X, dtype=np.float64), fitting=False)
        packed = self._trees()
        leaf, _ = apply_trees(packed, M)
        vals = np.asarray(self.tree_value_, dtype=np.float64)[leaf]
        out = np.zeros(M.shape[0])
        for v in vals:  # tree by tree, as scikit-learn accumulates
            out += v
        return out / vals.shape[0]

    def set_state(self, state):
        # models stored before the missing features were averaged over filled them with the median
        return super().set_state({"quantiles_": np.asarray(state["medians_"], dtype=np.float64)[None, :], **state})

    def _marginal(self, X) -> tuple[np.ndarray, np.ndarray]:
        """The prediction of each row, and its variance over the features it misses.

        A row missing some (not all) of its features is predicted at each of the stored training
        quantiles of the missing ones (all at the same level), and gets the mean and the variance
        of those predictions: what the forest expects not knowing them, and how much that
        uncertainty widens its band.  Complete rows: :meth:`predict`, variance 0.
        """
        X = np.asarray(X, dtype=np.float64)
        X = X.reshape(len(X), -1)
        mean, var = self.predict(X), np.zeros(len(X))
        miss = ~np.isfinite(X)
        rows = np.flatnonzero(miss.any(axis=1) & ~miss.all(axis=1))
        Q = np.asarray(self.quantiles_, dtype=np.float64)
        if rows.size and len(Q) > 1:
            A = np.repeat(X[rows][None], len(Q), axis=0)  # (levels, rows, features)
            A = np.where(np.isfinite(A), A, Q[:, None, :])
            P = self.predict(A.reshape(-1, X.shape[1])).reshape(len(Q), rows.size)
            mean[rows], var[rows] = P.mean(axis=0), P.var(axis=0)
        return mean, var

    def _score(self, y, t, X) -> dict[str, np.ndarray]:
        expected, var = self._marginal(X)
        sd = np.sqrt(self.scale_ ** 2 + var)  # = scale_ for a row with all its features
        z = (y - expected - self.center_) / sd
        finite = np.isfinite(z)
        zz = np.where(finite, z, 0.0)
        return self._drop({
            "expected": expected,
            "lower": expected + self.center_ - self.threshold * sd,
            "upper": expected + self.center_ + self.threshold * sd,
            "score": robust_score(zz),
            "is_anomaly": finite & (np.abs(zz) > self.threshold),
        }, self._unscored(X))
