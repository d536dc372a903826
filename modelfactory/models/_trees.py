"""scikit-learn decision trees as plain arrays, and their traversal in numpy (private).

A forest is stored as a few concatenated arrays (no pickle): per node its
right child (``-1`` for a leaf; the left child of a split node is the next
node, as scikit-learn's depth-first builder lays them out, else a ``left``
array is kept too), its split feature (``-1`` for a leaf), its split threshold
(for split nodes) or its value (for leaves), and the node offset of each tree.

scikit-learn compares float32 features with float64 thresholds
(``x <= threshold``).  For a float32 ``x`` that is the same as comparing with
the largest float32 not above the threshold, so thresholds are stored as
float32 rounded down: exactly the same splits, half the bytes.
"""
from __future__ import annotations

import numpy as np

__all__ = ["pack_trees", "apply_trees"]


def _round_down32(thr: np.ndarray) -> np.ndarray:
    t32 = thr.astype(np.float32)
    over = t32.astype(np.float64) > thr
    t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
    return t32


def pack_trees(trees, leaf_value, value_dtype=np.float64) -> dict[str, np.ndarray]:
    """Pack fitted ``tree_`` objects; ``leaf_value(tree_)`` gives each node's leaf value."""
    rights, lefts, feats, thrs, vals, offsets = [], [], [], [], [], [0]
    implicit = True
    for tr in trees:
        left, right = tr.children_left, tr.children_right
        split = left >= 0
        implicit &= bool(np.all(left[split] == np.flatnonzero(split) + 1))
        rights.append(np.where(split, right, -1))
        lefts.append(np.where(split, left, -1))
        feats.append(np.where(split, tr.feature, -1))
        thrs.append(np.where(split, tr.threshold, 0.0))
        vals.append(np.where(split, 0.0, leaf_value(tr)))
        offsets.append(offsets[-1] + tr.node_count)
    offs = np.asarray(offsets, dtype=np.int64)
    big = int(max((len(r) for r in rights), default=0))
    idx_t = np.int16 if big < 2 ** 15 else np.int32
    nfeat = int(max((int(f.max()) for f in feats if f.size), default=0)) + 1
    feat_t = np.int8 if nfeat < 2 ** 7 else np.int16 if nfeat < 2 ** 15 else np.int32
    out = {
        "tree_offsets": offs.astype(np.int32 if offs[-1] < 2 ** 31 else np.int64),
        "tree_right": np.concatenate(rights).astype(idx_t),
        "tree_feature": np.concatenate(feats).astype(feat_t),
        "tree_threshold": _round_down32(np.concatenate(thrs).astype(np.float64)),
        "tree_value": np.concatenate(vals).astype(value_dtype),
    }
    if not implicit:
        out["tree_left"] = np.concatenate(lefts).astype(idx_t)
    return out


def apply_trees(packed: dict, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leaf (global node index) and depth (edges from the root) of every row in every tree: (T, n)."""
    X32 = np.asarray(X, dtype=np.float32)
    offs = np.asarray(packed["tree_offsets"], dtype=np.int64)
    right = np.asarray(packed["tree_right"], dtype=np.int64)
    left = packed.get("tree_left")
    left = None if left is None else np.asarray(left, dtype=np.int64)
    feat = np.asarray(packed["tree_feature"], dtype=np.int64)
    thr = np.asarray(packed["tree_threshold"])
    T, n = len(offs) - 1, X32.shape[0]
    node = np.repeat(offs[:-1, None], n, axis=1)  # global node index
    depth = np.zeros((T, n), dtype=np.int64)
    rows = np.broadcast_to(np.arange(n), (T, n))
    base = offs[:-1, None]
    while True:
        f = feat[node]
        active = f >= 0
        if not active.any():
            break
        go_left = X32[rows, np.maximum(f, 0)] <= thr[node]
        nxt_left = node + 1 if left is None else base + left[node]
        nxt = np.where(go_left, nxt_left, base + right[node])
        node = np.where(active, nxt, node)
        depth += active
    return node, depth

