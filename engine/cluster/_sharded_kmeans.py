"""ShardedKMeans: exact Lloyd k-means over data held by Ray shard actors, only centroids and stats moving."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from engine import storage
from engine.cluster._kmeans import FitState, KMeans, digest
from engine.cluster._lloyd import lloyd
from engine.cluster._seeding import kmeans_parallel
from engine.cluster._shard_actors import (
    Shard,
    ShardActorPool,
    actor_count,
    check_shapes,
    gather,
    ray_get,
    resolve_source,
    shard_shapes,
)
from engine.cluster._stats import (
    PartialStats,
    as_float32_matrix,
    assign,
    check_int,
    check_n_clusters,
    resolve_backend,
    unit_rows,
)
from engine.data.schema import Z
from engine.errors import ConfigError, DataError

INITS = ("auto", "k-means||", "k-means++", "random")


class ShardedKMeans(BaseEstimator):
    """Exact Lloyd k-means over shards that stay in Ray actors; the result equals `KMeans` on their union.

    Parameters
    ----------
    n_clusters : number of centroids k, >= 1 and <= the total number of rows.
    init : "k-means||" (Bahmani et al. 2012: oversampling rounds on the actors, then weighted k-means++
        and weighted Lloyd on the small candidate set in the driver), "k-means++" and "auto" (the same: plain
        k-means++ needs every row in one place), "random" (k distinct rows drawn uniformly over all
        shards) or an array (k, d) of initial centroids.
    max_iter, tol, seed, backend : as `KMeans`; the same seed gives the same result for the same shards,
        however they are grouped into actors (up to float rounding of the sums).
    num_actors : actors holding the shards (contiguous groups of shards); default min(shards, cluster CPUs).
    column : the vector column of Parquet shards.
    spherical : cosine k-means as `KMeans(spherical=True)`: each actor normalises its rows once at load,
        and the centroids are re-normalised after each update.
    checkpoint, checkpoint_every : as `KMeans`: the Lloyd state (iteration, centroids) is saved every
        `checkpoint_every` iterations, and a fit of the same shards and settings continues from it,
        without initialising again.
    callback : as `KMeans`: given each iteration's history record (with "run": 1) as the iteration ends.

    Each actor takes 1 CPU (and a GPU share when the cluster has GPUs, for the "auto" backend), actors are
    spread over the nodes, every actor reads only its own files, and all are killed when fit returns.
    An actor that dies (its node removed, its process killed) is replaced by a new one that loads the same
    shards on a live node, and the step it died in (the loading, the seeding, or one Lloyd iteration) is
    redone, so the result is the one of a fit without the failure. Parquet shards must then be readable
    from the other nodes (shared storage or an object store), as they must be for a multi-node fit anyway.
    Empty clusters are repaired as `KMeans` does (`split_empty`), from the summed stats alone.

    Fitted attributes: cluster_centers_, inertia_, n_iter_, n_features_in_, n_samples_, history_ (the
    `KMeans.history_` records).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        max_iter: int = 25,
        tol: float = 1e-4,
        seed: int = 0,
        backend: str = "auto",
        num_actors: int | None = None,
        column: str = Z,
        spherical: bool = False,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 10,
        callback: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.seed = seed
        self.backend = backend
        self.num_actors = num_actors
        self.column = column
        self.spherical = spherical
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.callback = callback

    def fit(self, source: str | Path | Sequence[str | Path] | Sequence[np.ndarray], y: Any = None) -> ShardedKMeans:
        """Cluster the rows of `source`: a complete embeddings folder, Parquet paths, or numpy shards."""
        self._check_params()
        shards, names = resolve_source(source)
        # What the shapes alone can tell is checked here, before any actor starts.
        shapes = shard_shapes(shards, names, self.column)
        check_shapes(shapes, self.column, self.n_clusters)
        saved = FitState(self.checkpoint, self._fingerprint(shards, shapes))
        resume, _ = saved.load()
        num_actors = actor_count(self.num_actors, len(shards))
        pool = ShardActorPool(shards, names, num_actors, self.column, self.backend, self.spherical)
        actors = pool.actors
        try:
            sizes = pool.survive(lambda: self._load(actors), "loading the shards")
            self.n_samples_ = int(sizes.sum())
            check_n_clusters(self.n_clusters, self.n_samples_)
            init = self._check_init(self.n_features_in_)
            if "centroids" in resume:
                centroids = resume["centroids"]
            elif isinstance(init, np.ndarray):
                centroids = unit_rows(init, name="init") if self.spherical else init.copy()
            elif init == "random":
                centroids = pool.survive(lambda: gather(actors, sizes, np.random.default_rng(self.seed).choice(
                    self.n_samples_, size=self.n_clusters, replace=False), self.n_features_in_), "seeding")
            else:
                centroids = pool.survive(
                    lambda: self._kmeans_parallel(actors, sizes, np.random.default_rng(self.seed)), "seeding")
            self._lloyd(pool, centroids, resume=resume or None, save=lambda state: saved.save(state, None))
        finally:
            pool.kill()
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Index of the nearest centroid for each row."""
        check_is_fitted(self, "cluster_centers_")
        X = as_float32_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but ShardedKMeans was fitted with {self.n_features_in_} features."
            )
        if self.spherical:
            X = unit_rows(X)
        return assign(X, self.cluster_centers_, backend=self.backend)[0]

    # --- settings -------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        check_int("n_clusters", self.n_clusters, minimum=1)
        check_int("max_iter", self.max_iter, minimum=1)
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float | np.number):
            raise ConfigError(f"tol should be a number, got {self.tol!r}.")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"tol={self.tol} should be a finite number >= 0.")
        check_int("seed", self.seed, minimum=0)
        resolve_backend(self.backend)
        if self.num_actors is not None:
            check_int("num_actors", self.num_actors, minimum=1)
        if isinstance(self.init, str) and self.init not in INITS:
            raise ConfigError(
                f"init={self.init!r} should be 'auto', 'k-means++', 'k-means||', 'random' or an array of shape "
                "(n_clusters, n_features)."
            )
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"column should be a column name, got {self.column!r}.")
        if not isinstance(self.spherical, bool | np.bool_):
            raise ConfigError(f"spherical should be True or False, got {self.spherical!r}.")
        check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback should be a callable or None, got {self.callback!r}.")

    def _fingerprint(self, shards: list[Shard], shapes: list[tuple[str, int, int | None]]) -> dict[str, Any]:
        """What a saved state must match: each shard (its digest, or its file's size and time) and the
        settings that change the result."""
        if self.checkpoint is None:
            return {}
        data = [digest(s) if isinstance(s, np.ndarray) else [s, *storage.size_and_mtime(s)] for s in shards]
        init = self.init if isinstance(self.init, str) else digest(np.asarray(self.init, dtype=np.float32))
        return {"estimator": type(self).__name__, "shapes": shapes, "data": data, "init": init,
                "params": {k: getattr(self, k)
                           for k in ("n_clusters", "max_iter", "tol", "seed", "column", "spherical")},
                "backend": resolve_backend(self.backend)}

    def _check_init(self, n_features: int) -> str | np.ndarray:
        if isinstance(self.init, str):
            return self.init
        try:
            init = as_float32_matrix(self.init, name="init")
        except DataError as e:
            raise ConfigError(str(e)) from e
        expected = (self.n_clusters, n_features)
        if init.shape != expected:
            raise ConfigError(f"init has shape {init.shape}, but should be (n_clusters, n_features)={expected}.")
        return init

    # --- the distributed steps ------------------------------------------------------------------------

    def _load(self, actors: list) -> np.ndarray:
        """Rows per actor; checks that every shard has the same dimension, naming the first that differs."""
        infos = ray_get([a.load.remote() for a in actors])
        check_shapes([shard for info in infos for shard in info], self.column, self.n_clusters)
        self.n_features_in_ = int(infos[0][0][2])
        return np.array([sum(rows for _, rows, _ in info) for info in infos], dtype=np.int64)

    def _stats(self, actors: list, centroids_ref) -> PartialStats:
        parts = ray_get([a.partial_stats.remote(centroids_ref) for a in actors])
        return sum((PartialStats(*p) for p in parts[1:]), PartialStats(*parts[0]))

    def _lloyd(self, pool: ShardActorPool, centroids: np.ndarray, resume: dict[str, Any] | None = None,
               save=None) -> None:
        """The Lloyd loop with the rows in the actors: one broadcast and one reduce per iteration; an iteration
        during which an actor died is redone with its replacement."""
        import ray

        history = list(resume["history"]) if resume else []
        done = [len(history)]  # iterations started, to name the one an actor died in

        def stats(C: np.ndarray, what: str) -> PartialStats:
            ref = ray.put(C)
            return pool.survive(lambda: self._stats(pool.actors, ref), what)

        def step(C: np.ndarray) -> PartialStats:
            done[0] += 1
            return stats(C, f"iteration {done[0]}")

        result = lloyd(
            step, centroids, max_iter=self.max_iter, tol=self.tol, spherical=self.spherical,
            first_iter=len(history) + 1, history=history,
            previous_objective=resume["previous_objective"] if resume else None,
            on_iteration=None if self.callback is None else lambda record, _: self.callback({"run": 1, **record}),
            save=None if save is None else lambda state: save({"run": 1, **state}),
            checkpoint_every=self.checkpoint_every,
        )
        self.cluster_centers_ = result.centroids
        self.inertia_ = stats(result.centroids, "the inertia").sse
        self.n_iter_ = result.n_iter
        self.history_ = result.history

    def _kmeans_parallel(self, actors: list, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """k-means|| seeding: oversample on the actors, then reduce the weighted candidates in the driver."""
        import ray

        def call(method: str, *args: Any) -> list[Any]:
            # Arrays go to the object store once, not once per actor.
            refs = [ray.put(a) if isinstance(a, np.ndarray) else a for a in args]
            return ray_get([getattr(actor, method).remote(*refs) for actor in actors])

        local = KMeans(self.n_clusters, max_iter=self.max_iter, tol=self.tol, backend=self.backend,
                       spherical=self.spherical)
        return kmeans_parallel(call, lambda rows: gather(actors, sizes, rows, self.n_features_in_), self.n_samples_,
                               self.n_clusters, self.seed, rng, local.fit_candidates)
