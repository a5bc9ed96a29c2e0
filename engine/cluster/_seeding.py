"""Seeding for large k: k-means|| (Bahmani et al. 2012) over rows held in one process or spread over Ray shard
actors, and k-means++ within the cells of a coarse partition for k in the thousands."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from engine.cluster._stats import (
    kmeans_plusplus,
    kmeans_plusplus_unchecked,
    nearest_on_host,
    resolve_backend,
    stats_from_assignment,
    thread_pool,
)

logger = logging.getLogger(__name__)

# k-means|| oversamples l = 2k expected rows per round; 2 rounds as Spark's default (initializationSteps): the
# paper finds a handful as good as k-means++, and every round costs a pass over all rows against 2k centres
# (2 Lloyd iterations' flops), the weighting of the ~(1 + rounds * 2k) candidates one more against them all:
# with 5 rounds, seeding cost as many flops as 20 Lloyd iterations at k=1024.
PARALLEL_ROUNDS = 2
OVERSAMPLING = 2.0
# `init="auto"` of KMeans: greedy k-means++ up to this k, k-means|| above. Greedy k-means++ costs about
# n d k (2 + ln k) multiply-adds and k passes over n rows one centre at a time; k-means|| about 8 n d k in a
# few large products (2 rounds of 2k candidates, and their weighting): k-means|| does fewer above k ~ 400
# (ln k > 6), and its large products keep a GPU busy where k-means++'s one centre at a time does not.
PARALLEL_ABOVE_K = 256
# ... and k-means++ within the cells of a coarse partition above this k: k-means|| costs ~8 n d k (k = 20,000 on
# 1M x 256 rows: ~8e13 flops, minutes on a CPU), the partitioned seeding ~n d k (2 + ln k) / sqrt(k) (~1e12).
PARTITIONED_ABOVE_K = 4096
# The coarse k-means of the partitioned seeding trains on at most this many rows per cell (faiss's
# max_points_per_centroid) for this many Lloyd iterations: it only has to cut the rows into compact cells.
COARSE_ROWS_PER_CELL = 256
COARSE_ITERATIONS = 10
LOCAL_LLOYD = 3


class SeedingRows:
    """The row-side steps of k-means|| over `self._X` (float32 rows), for `KMeans` (all rows, optional weights)
    and for each `ShardActor` (its share); `kmeans_parallel` drives them.

    Subclasses set _X, _backend, _shard_rows (rows per shard, for per-shard random streams), _first_shard, and
    _weights (None: all ones).
    """

    _X: np.ndarray
    _backend: str = "auto"
    _shard_rows: list[int]
    _first_shard: int = 0
    _weights: np.ndarray | None = None
    _closest_sq: np.ndarray | None = None

    def _assign_rows(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        C = np.ascontiguousarray(centroids, dtype=np.float32)
        return nearest_on_host(self._X, C, resolve_backend(self._backend))

    def update_closest(self, candidates: np.ndarray, first: bool = False) -> float:
        """Fold new candidates into each row's nearest-candidate distance; returns the (weighted) cost.
        `first` starts afresh, forgetting the candidates of a seeding redone after an actor was replaced."""
        _, sq = self._assign_rows(candidates)
        if first or self._closest_sq is None:
            self._closest_sq = sq
        else:
            np.minimum(self._closest_sq, sq, out=self._closest_sq)
        if self._weights is None:
            return float(np.sum(self._closest_sq, dtype=np.float64))
        return float(self._closest_sq.astype(np.float64) @ self._weights)

    def oversample(self, expected: float, cost: float, seed: int, round_: int) -> np.ndarray:
        """Each row independently with probability min(1, expected * w d^2 / cost).

        The draws of each shard come from its own stream (seed, round, global shard index), so the sample
        does not depend on how the shards are grouped into actors.
        """
        picked, start = [], 0
        for s, rows in enumerate(self._shard_rows):
            # Shard by shard, so the draws and probabilities (float64) are a shard's rows, not the share's.
            u = np.random.default_rng([seed, round_, self._first_shard + s]).uniform(size=rows)
            p = self._closest_sq[start:start + rows].astype(np.float64)
            if self._weights is not None:
                p *= self._weights[start:start + rows]
            p = np.minimum(1.0, expected * p / cost)
            picked.append(start + np.flatnonzero(u < p))
            start += rows
        return self._X[np.concatenate(picked)]

    def count_nearest(self, candidates: np.ndarray) -> np.ndarray:
        """How many of these rows (their total weight) have each candidate as their nearest."""
        labels, _ = self._assign_rows(candidates)
        return np.bincount(labels, weights=self._weights, minlength=candidates.shape[0]).astype(np.float64)


class LocalRows(SeedingRows):
    """All rows of an in-process fit, as one part; `placed` (HostRows or DeviceRows of the same rows) computes
    the assignments where the fit computes, e.g. on the GPU the rows were uploaded to."""

    def __init__(self, X: np.ndarray, weights: np.ndarray | None, backend: str, placed: Any = None):
        self._X, self._weights, self._backend, self._placed = X, weights, backend, placed
        self._shard_rows = [X.shape[0]]

    def _assign_rows(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._placed is None:
            return super()._assign_rows(centroids)
        return self._placed.nearest_centroids(np.ascontiguousarray(centroids, dtype=np.float32))


def kmeans_parallel(
    call: Callable[..., list[Any]],
    gather: Callable[[np.ndarray], np.ndarray],
    n_samples: int,
    n_clusters: int,
    seed: int,
    rng: np.random.Generator,
    fit_candidates: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    first_weights: np.ndarray | None = None,
) -> np.ndarray:
    """k-means|| seeding: oversample rows by their distance to the candidates so far, weight the candidates by
    the rows nearest to them, then seed k centroids from the weighted candidates.

    call(method, *args) runs a `SeedingRows` method on every part and returns their answers in part order;
    gather(indices) returns the rows at those global indices; fit_candidates(candidates, weights, seeds) runs
    weighted Lloyd on the candidates from k-means++ `seeds` (as Spark's k-means|| does) and returns k centroids.
    first_weights: the rows' weights, for drawing the first candidate (None: uniform).
    """
    k = n_clusters
    first = (rng.integers(n_samples, size=1) if first_weights is None
             else rng.choice(n_samples, size=1, p=first_weights / first_weights.sum()))
    candidates = [gather(first)]
    cost = sum(call("update_closest", candidates[0], True))
    for round_ in range(PARALLEL_ROUNDS):
        if cost <= 0:
            break  # every row sits on a candidate
        new = np.concatenate(call("oversample", OVERSAMPLING * k, cost, seed, round_))
        if new.shape[0] == 0:
            continue
        candidates.append(new)
        cost = sum(call("update_closest", new, False))
    C = np.concatenate(candidates)
    weights = np.sum(call("count_nearest", C), axis=0)
    if np.count_nonzero(weights) < k:
        # Fewer distinct candidates than clusters (tiny or highly duplicated data): top up with random
        # rows, and let a zero-weight duplicate still be chosen rather than fail.
        C = np.concatenate([C, gather(np.sort(rng.choice(n_samples, size=k, replace=False)))])
        weights = np.sum(call("count_nearest", C), axis=0)
        if np.count_nonzero(weights) < k:
            weights = np.maximum(weights, 1e-6)
    logger.debug("k-means||: %d candidates for k=%d", C.shape[0], k)
    seeds = kmeans_plusplus(C, k, sample_weight=weights, seed=int(rng.integers(2**31)))
    return fit_candidates(C, weights, seeds)


def kmeans_plusplus_partitioned(
    X: np.ndarray,
    w: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    backend: str,
    fit_coarse: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray],
) -> np.ndarray:
    """k centroids by greedy k-means++ within the cells of a coarse partition (for k in the thousands), each cell's
    seeds then moved by LOCAL_LLOYD Lloyd iterations over the cell's rows (as k-means|| refines its candidates).

    A coarse k-means of round(sqrt(k)) cells (`fit_coarse(rows, weights, cells, seed)`, on a sample) cuts the rows
    into cells; each cell gets a share of the k seeds and runs greedy k-means++ on its own rows, so a seed is
    compared with its cell's rows only: about n d k (2 + ln k) / sqrt(k) operations instead of k-means++'s
    n d k (2 + ln k). A cell's share follows its potential (the weighted squared distances to its coarse centre,
    as k-means++'s first draw would) raised to d / (d + 2): in the many-centre limit a quantiser's centres follow
    the density to that power (Zador's asymptotics), which gives spread cells fewer seeds per unit of potential
    in low dimensions and tends to plain proportion in high ones. No cell gets more seeds than it has rows.
    """
    n, d = X.shape
    cells = max(2, min(n_clusters, int(round(np.sqrt(n_clusters)))))
    sample = rng.choice(n, size=min(n, COARSE_ROWS_PER_CELL * cells), replace=False, p=w / w.sum())
    coarse = fit_coarse(X[np.sort(sample)], np.ones(sample.size, dtype=np.float32), cells,
                        int(rng.integers(2**31)))
    labels, sq = nearest_on_host(X, np.ascontiguousarray(coarse, dtype=np.float32), resolve_backend(backend))
    cells = coarse.shape[0]
    rows_per_cell = np.bincount(labels, minlength=cells)
    potential = np.bincount(labels, weights=w * sq, minlength=cells)
    share = _allocate(n_clusters, potential ** (d / (d + 2)), np.minimum(rows_per_cell, np.bincount(
        labels, weights=(w > 0).astype(np.float64), minlength=cells).astype(np.int64)))
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(rows_per_cell)])
    todo = np.flatnonzero(share)
    cell_seeds = rng.integers(2**63, size=todo.size)  # drawn first: the result does not depend on the threads

    def seed_cell(i: int) -> np.ndarray:
        rows = order[starts[todo[i]]:starts[todo[i] + 1]]
        cell_X, cell_w = X[rows], w[rows]
        C = kmeans_plusplus_unchecked(cell_X, int(share[todo[i]]), cell_w, np.random.default_rng(cell_seeds[i]),
                                      n_local_trials=None)
        for _ in range(LOCAL_LLOYD):  # as k-means|| refines its candidates: cheap, the cell's rows only
            labels, sq = _nearest_in_cell(cell_X, C)
            C = stats_from_assignment(cell_X, labels, sq, C.shape[0], cell_w).centroids(C)[0]
        return C

    # Cells in parallel, each on one BLAS / OpenMP thread: a cell's products are small (trials x rows), and a
    # multi-threaded BLAS spends them in its barriers (2 GFLOP/s measured here on a busy 2-core machine).
    with threadpool_limits(1):
        return np.concatenate(list(thread_pool(torch.get_num_threads()).map(seed_cell, range(todo.size))))


def _nearest_in_cell(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest of a cell's seeds and the squared distance, in numpy (the cell's thread, its one BLAS thread)."""
    dist = np.einsum("ij,ij->i", C, C)[None, :] - 2.0 * (X @ C.T)
    labels = dist.argmin(axis=1)
    sq = np.take_along_axis(dist, labels[:, None], axis=1)[:, 0] + np.einsum("ij,ij->i", X, X)
    return labels, np.maximum(sq, 0.0)


def _allocate(total: int, mass: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """`total` integer shares (total <= capacity.sum()): one for every entry with capacity while there are enough,
    the rest in proportion to `mass` by largest remainders, none above its `capacity`; what a capped entry cannot
    take goes to the others in the same way."""
    share = np.zeros(mass.shape[0], dtype=np.int64)
    if total >= np.count_nonzero(capacity):
        share[capacity > 0] = 1  # no cell without a seed: its rows would all be far from every centroid
    while (left := total - int(share.sum())) > 0:
        open_ = np.flatnonzero(capacity > share)
        room = capacity[open_] - share[open_]
        m = mass[open_] if mass[open_].sum() > 0 else np.ones(open_.size)  # zero potential: evenly
        ideal = left * m / m.sum()
        add = np.minimum(np.floor(ideal).astype(np.int64), room)
        remainder = np.where(add < room, ideal - np.floor(ideal), -1.0)
        extra = min(left - int(add.sum()), int(np.count_nonzero(remainder >= 0)))
        add[np.argsort(-remainder, kind="stable")[:extra]] += 1
        share[open_] += add
    return share
