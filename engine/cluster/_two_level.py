"""TwoLevelKMeans: k-means for large k (tens of thousands) as ~sqrt(k) coarse clusters, then sub-clusters in each."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from engine.cluster._kmeans import KMeans
from engine.cluster._stats import (
    as_float32_matrix,
    as_weights,
    check_enough_weight,
    check_int,
    nearest_on_host,
    row_sq_norms,
    unit_rows,
)

logger = logging.getLogger(__name__)


class TwoLevelKMeans(KMeans):
    """k-means with many centroids at the cost of few: a coarse k-means, then one k-means inside each part.

    Flat Lloyd costs n * k * d per iteration; with n_coarse ~ sqrt(k) coarse clusters, each holding its
    share of the rows and of the k centroids, both levels together cost about 2 n sqrt(k) d per iteration
    (faiss's `two_level_clustering` recipe for training IVF indexes with large k). Each coarse cluster gets a
    number of sub-clusters proportional to its weight (largest remainders, at least 1, at most its rows), so
    the counts add up to exactly n_clusters. `refine_iter` full Lloyd iterations over all k centroids can
    follow (each costs as much as a flat iteration); labels_ and inertia_ come from one exact assignment
    of every row to the final centroids.

    On continuous data (embeddings, overlapping mixtures) the result is within a few percent of flat
    k-means (tests/test_two_level.py: 0.3% on 30 blobs cut into 120 clusters, 0.03% after 3 refinements).
    On exactly k well-separated blobs it can be far worse: a part holding 10.5 blobs gets 10 or 11
    centroids by weight, so some blob is split or merged, and Lloyd cannot move a centroid across parts.

    Parameters: those of `KMeans` (init, n_init, max_iter, tol, seed, backend, spherical,
    max_points_per_centroid apply to every sub-problem; an array init is not accepted), plus
    n_coarse : coarse clusters; None means round(sqrt(n_clusters)).
    refine_iter : full Lloyd iterations after the two levels (0 = none).

    history_ holds the coarse run's records (level "coarse"), one summary record per coarse cluster
    (level "sub": rows, k, iterations, objective, seconds) and the refinement's records (level "refine").
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        n_coarse: int | None = None,
        refine_iter: int = 0,
        init: str = "k-means++",
        n_init: int = 1,
        max_iter: int = 25,
        tol: float = 1e-4,
        seed: int = 0,
        backend: str = "auto",
        verbose: bool = False,
        spherical: bool = False,
        max_points_per_centroid: int | None = None,
        callback=None,
    ) -> None:
        super().__init__(n_clusters, init=init, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed,
                         backend=backend, verbose=verbose, spherical=spherical,
                         max_points_per_centroid=max_points_per_centroid, callback=callback)
        self.n_coarse = n_coarse
        self.refine_iter = refine_iter

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> TwoLevelKMeans:
        X = as_float32_matrix(X)
        w = as_weights(sample_weight, X.shape[0])
        _, _, backend = self._check_params(X)
        if not isinstance(self.init, str):
            from engine.errors import ConfigError

            raise ConfigError("TwoLevelKMeans takes init='k-means++' or 'random', not an array of centroids.")
        check_enough_weight(w, self.n_clusters)
        refine_iter = check_int("refine_iter", self.refine_iter, minimum=0)
        n_coarse = self._coarse_count(X.shape[0])
        if self.spherical:
            X = unit_rows(X)
        seeds = np.random.SeedSequence(self.seed).spawn(n_coarse + 2)
        history: list[dict[str, Any]] = []

        coarse = self._sub_model(n_coarse, seeds[0], level="coarse", history=history).fit(X, sample_weight=w)
        parts = coarse.labels_
        weight_per_part = np.bincount(parts, weights=w, minlength=n_coarse)
        members = [np.flatnonzero((parts == c) & (w > 0)) for c in range(n_coarse)]
        counts = allocate(weight_per_part, np.array([len(m) for m in members]), self.n_clusters)

        centroids = []
        for c, (rows, k_c) in enumerate(zip(members, counts, strict=True)):
            start = time.perf_counter()
            sub = self._sub_model(int(k_c), seeds[c + 1], level=None, history=None)
            sub.set_params(max_points_per_centroid=None)  # the coarse level already sub-sampled if asked
            sub.fit(X[rows], sample_weight=w[rows])
            centroids.append(sub.cluster_centers_)
            record = {"level": "sub", "part": c, "rows": int(rows.size), "k": int(k_c), "iter": sub.n_iter_,
                      "objective": sub.inertia_, "seconds": time.perf_counter() - start}
            history.append(record)
            if self.callback is not None:
                self.callback(dict(record))
        C = np.concatenate(centroids).astype(np.float32)

        if refine_iter:
            refine = self._sub_model(self.n_clusters, seeds[-1], level="refine", history=history)
            refine.set_params(init=C, n_init=1, max_iter=refine_iter)
            C = refine.fit(X, sample_weight=w).cluster_centers_
        labels, sq = nearest_on_host(X, C, backend, row_sq_norms(X))
        self.cluster_centers_ = C
        self.labels_ = labels
        self.inertia_ = float(sq.astype(np.float64) @ w)
        self.n_iter_ = coarse.n_iter_ + refine_iter
        self.n_coarse_ = n_coarse
        self.history_ = history
        self.n_training_samples_ = coarse.n_training_samples_
        self.n_features_in_ = X.shape[1]
        return self

    def _coarse_count(self, n_samples: int) -> int:
        if self.n_coarse is None:
            return max(1, min(self.n_clusters, round(self.n_clusters**0.5)))
        n_coarse = check_int("n_coarse", self.n_coarse, minimum=1)
        if n_coarse > self.n_clusters:
            from engine.errors import ConfigError

            raise ConfigError(f"n_coarse={n_coarse} should be <= n_clusters={self.n_clusters}.")
        return n_coarse

    def _sub_model(self, k: int, seed: np.random.SeedSequence, *, level: str | None,
                   history: list | None) -> KMeans:
        callback = None
        if history is not None:
            user = self.callback

            def callback(record: dict[str, Any]) -> None:
                history.append({"level": level, **record})
                if user is not None:
                    user({"level": level, **record})

        return KMeans(k, init=self.init, n_init=self.n_init, max_iter=self.max_iter, tol=self.tol,
                      seed=int(seed.generate_state(1)[0]), backend=self.backend, verbose=self.verbose,
                      spherical=self.spherical, max_points_per_centroid=self.max_points_per_centroid,
                      callback=callback)


def allocate(weights: np.ndarray, capacity: np.ndarray, total: int) -> np.ndarray:
    """Split `total` into integer counts proportional to `weights`, each in [1, capacity], summing to total.

    Largest-remainder rounding; a part that would get more than its capacity (rows) keeps its capacity and
    the rest is shared out again among the others. Needs len(weights) <= total <= capacity.sum().
    """
    weights = np.asarray(weights, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    n = len(weights)
    if not n <= total <= capacity.sum() or (capacity < 1).any():
        raise ValueError(f"cannot split {total} over {n} parts with capacities {capacity.tolist()}")
    counts = np.ones(n, dtype=np.int64)
    free = np.ones(n, dtype=bool) & (capacity > 1)
    left = total - n
    while left > 0:
        share = weights * free
        if share.sum() <= 0:
            share = free.astype(np.float64)
        ideal = left * share / share.sum()
        extra = np.minimum(np.floor(ideal).astype(np.int64), capacity - counts)
        remaining = left - int(extra.sum())
        if remaining > 0:
            # Largest remainders first, among the parts that still have room after `extra`.
            order = np.argsort(-(ideal - np.floor(ideal)), kind="stable")
            for i in order:
                if remaining == 0:
                    break
                if free[i] and counts[i] + extra[i] < capacity[i]:
                    extra[i] += 1
                    remaining -= 1
        counts += extra
        left = total - int(counts.sum())
        free = counts < capacity
    return counts
