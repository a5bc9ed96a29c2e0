"""The one Lloyd loop: iterations over a "partial stats for these centroids" step, for every k-means mode.

`KMeans` (rows in this process or on its GPU), `ShardedKMeans` (rows in Ray shard actors) and the federated
rounds (rows in partition clients) differ only in how they gather the `PartialStats` of all rows for given
centroids; convergence, empty-cluster repair, spherical re-normalisation, callbacks, checkpoints and the
history are here, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.cluster._stats import PartialStats, row_sq_norms

logger = logging.getLogger(__name__)

# Relative size of the symmetric perturbation that splits a cluster in two (faiss's EPS): small enough that the
# two halves start where the cluster was, large enough that the next assignment separates them.
_SPLIT_EPS = 1.0 / 1024


@dataclass
class LloydResult:
    centroids: np.ndarray  # (k, d) float32 after the last update
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_iter(self) -> int:
        return len(self.history)


def lloyd(
    step: Callable[[np.ndarray], PartialStats],
    centroids: np.ndarray,
    *,
    max_iter: int,
    tol: float,
    spherical: bool = False,
    first_iter: int = 1,
    history: list[dict[str, Any]] | None = None,
    previous_objective: float | None = None,
    on_iteration: Callable[[dict[str, Any], np.ndarray], None] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: int = 10,
    log: Callable[..., None] = logger.debug,
) -> LloydResult:
    """Lloyd iterations first_iter..max_iter from `centroids`: assign (the step), move each centroid to its mean,
    repair empty clusters (`split_empty`), re-normalise when spherical.

    step(centroids) -> the stats of every row for those centroids; its `sse` may be None-like (NaN) when the
    objective is not released (federated DP), and then the `tol` rule never stops the loop.
    on_iteration(record, centroids) is called after each iteration with its history record (see `lloyd_record`)
    and the updated centroids.
    save(state) is called every `checkpoint_every` iterations with what a resumed loop needs: centroids,
    previous_objective and history; pass them back as `centroids`, `previous_objective` and `history`, with
    first_iter = len(history) + 1.
    """
    history = list(history or [])
    result = LloydResult(np.asarray(centroids, dtype=np.float32), history)
    for it in range(first_iter, max_iter + 1):
        start = time.perf_counter()
        stats = step(result.centroids)
        new, empty = stats.centroids(result.centroids)
        repaired = split_empty(new, stats, empty) if empty.size else 0
        if spherical:
            renormalise(new, result.centroids)
        objective = stats.sse if np.isfinite(stats.sse) else None
        record = lloyd_record(it, result.centroids, new, objective, previous_objective, repaired, start)
        record["empty"] = int(empty.size)
        result.centroids = new
        history.append(record)
        if on_iteration is not None:
            on_iteration(record, new)
        log("iter %d: objective %s, rel %s, shift %.3g, empty %d, repaired %d", it, objective, record["rel_change"],
            record["shift"], empty.size, repaired)
        if tol > 0 and record["rel_change"] is not None and record["rel_change"] < tol:
            break
        previous_objective = objective
        if save is not None and it % checkpoint_every == 0 and it < max_iter:
            save({"centroids": result.centroids, "previous_objective": objective, "history": history})
    return result


def split_empty(centroids: np.ndarray, stats: PartialStats, empty: np.ndarray) -> int:
    """Give each empty cluster half of the cluster with the largest SSE (by count when the stats carry no
    per-cluster SSE): both halves start at that cluster's mean, moved apart by a symmetric perturbation, and the
    next assignment separates them. Updates `centroids` in place; returns how many clusters were repaired.

    Needs no rows, so every mode repairs the same way, federated clients included, and the result does not
    depend on how the rows are spread. Measured against the other rules from one init (200k x 64, k = 256,
    20 iterations, data with many empty clusters): the farthest row of the largest cluster (this engine's
    rule before) and the globally farthest rows (scikit-learn's) were up to 2.9x worse where duplicated rows
    empty many clusters; faiss's split of a random cluster weighted by size up to 2x (benchmarks/RESULTS.md).
    """
    counts = stats.counts.astype(np.float64, copy=True)
    # A cluster's SSE is what splitting it can reduce; the count is the fallback when SSE is not released.
    size = counts.copy() if stats.cluster_sse is None else stats.cluster_sse.astype(np.float64, copy=True)
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    repaired = 0
    for j in empty:
        donor = int(np.argmax(np.where(counts > 1, size, -np.inf)))
        if counts[donor] <= 1:
            break  # nothing left to split: fewer distinct points than clusters
        mean = centroids[donor].astype(np.float64)
        centroids[j] = mean * (1 + sign * _SPLIT_EPS) + sign * _SPLIT_EPS * (mean == 0)
        centroids[donor] = mean * (1 - sign * _SPLIT_EPS) - sign * _SPLIT_EPS * (mean == 0)
        counts[j] = counts[donor] / 2
        counts[donor] -= counts[j]
        size[j] = size[donor] / 2
        size[donor] -= size[j]
        repaired += 1
    return repaired


def renormalise(new: np.ndarray, previous: np.ndarray) -> None:
    """Scale the updated centroids to unit norm in place; one whose members cancel out keeps its old row."""
    norms = np.sqrt(row_sq_norms(new))
    zero = norms == 0
    new[zero] = previous[zero]
    norms[zero] = 1.0
    new /= norms[:, None]


def lloyd_record(it: int, centroids: np.ndarray, new: np.ndarray, objective: float | None,
                 previous: float | None, repaired: int, start: float) -> dict[str, Any]:
    """One Lloyd iteration's `history_` record, shared by every k-means mode.

    `rel_change` is the relative decrease of the objective from the previous iteration (None at the first, or
    when either objective is unknown); the `tol` rule stops when it falls below `tol`.
    """
    if previous is None or objective is None:
        rel_change = None
    elif previous > 0:
        rel_change = (previous - objective) / previous
    else:
        rel_change = 0.0  # a perfect fit has nothing left to decrease
    return {
        "iter": it,
        "objective": objective,
        "rel_change": rel_change,
        "shift": float(np.sqrt(((new.astype(np.float64) - centroids) ** 2).sum(axis=1).max())),
        "empty_repaired": repaired,
        "seconds": time.perf_counter() - start,
    }
