"""ShardedKMeans: exact Lloyd k-means over data held by Ray shard actors, only centroids and stats moving."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from engine import storage
from engine.cluster._device import DeviceRows, place_rows
from engine.cluster._kmeans import KMeans, _check_int, _digest, _FitState, _unit_rows
from engine.cluster._lloyd import lloyd
from engine.cluster._seeding import SeedingRows, kmeans_parallel
from engine.cluster._stats import (
    HostRows,
    PartialStats,
    as_centroids,
    as_float32_matrix,
    assign,
    check_n_clusters,
    resolve_backend,
    row_sq_norms,
)
from engine.data.schema import Z, check_finite, vectors_to_numpy
from engine.data.shards import shard_paths
from engine.errors import ConfigError, DataError, find_engine_error

logger = logging.getLogger(__name__)

INITS = ("auto", "k-means||", "k-means++", "random")

# Redos of one step after shard actors died: a node lost now and then is survived, an actor that dies
# every time (out of memory on any node) is not retried forever.
_MAX_REDOS = 3

# Bytes of rows per request when gathering rows into the driver (a sample, seeds). Each answer passes through
# Ray's object store, whose pages stay mapped in the resident memory of the actor and of the driver after the
# copy: bounded requests reuse the same pages, where one request per actor held the whole sample there again
# beside the driver's copy.
_GATHER_BYTES = 64 << 20

Shard = str | np.ndarray
T = TypeVar("T")


class ShardActor(SeedingRows):
    """The rows of a group of shards, loaded once and kept in one process (faiss's DatasetAssign shape).

    `count / dim / get_subset / partial_stats / assign` are what Lloyd needs; the remaining methods serve
    the k-means|| seeding. Plain class: Ray wraps it with `ray.remote`, and
    it works in-process too.
    """

    def __init__(self, shards: Sequence[Shard], names: Sequence[str], column: str = Z, backend: str = "auto",
                 first_shard: int = 0, spherical: bool = False):
        self._shards = list(shards)
        self._names = list(names)
        self._column = column
        self._backend = backend
        self._first_shard = first_shard  # global index of this actor's first shard, for per-shard seeds
        self._spherical = spherical  # rows are L2-normalised once, at load
        self._X = np.zeros((0, 0), dtype=np.float32)
        self._x_sq = np.zeros(0, dtype=np.float32)  # squared row norms, computed once for every pass
        self._shard_rows: list[int] = []
        self._placed: HostRows | DeviceRows | None = None
        # k-means||: squared distance (float32, as `assign` gives it: the minimum of those is exact) to the
        # nearest candidate.
        self._closest_sq: np.ndarray | None = None
        self._info: list[tuple[str, int, int]] | None = None

    def load(self) -> list[tuple[str, int, int]]:
        """Read and check this actor's shards; returns (name, rows, dim) per shard. Loaded once: a second
        call (a step redone after another actor was replaced) returns the same answer.

        A separate call rather than the constructor, so a DataError reaches the driver as itself. The rows
        are copied piece by piece (a Parquet row group, or a numpy shard) into one array sized from the
        shards' row counts, so the peak memory is this actor's share plus one piece, not twice the share (a
        list of parts and their concatenation) nor the share plus a whole Parquet file and its decoding.
        """
        if self._info is not None:
            return self._info
        total = sum(_rows(shard) for shard in self._shards)
        X: np.ndarray | None = None
        info: list[tuple[str, int, int]] = []
        offset = 0
        for shard, name in zip(self._shards, self._names, strict=True):
            rows = dim = 0
            for part in self._pieces(shard, name):
                if part.shape[0] == 0:
                    continue  # an empty row group: its list column has no dimension to check
                if rows and part.shape[1] != dim:  # list columns can change length between row groups
                    raise DataError(f"{name}: column '{self._column}' has vectors of mixed lengths: row 0 has "
                                    f"{dim}, row {rows} has {part.shape[1]}")
                dim = part.shape[1]
                if X is not None and dim != X.shape[1]:
                    raise DataError(
                        f"{name}: column '{self._column}' has {dim} dimensions, but {info[0][0]} has {X.shape[1]}"
                    )
                check_finite(part, name=self._column, where=name, first_row=rows)
                if self._spherical:
                    part = _unit_rows(part, name=f"{name}: column '{self._column}'", first_row=rows)
                if X is None:
                    X = np.empty((total, part.shape[1]), dtype=np.float32)
                X[offset + rows:offset + rows + part.shape[0]] = part
                rows += part.shape[0]
            if rows == 0:
                raise DataError(f"{name}: the shard holds no rows")
            offset += rows
            info.append((name, rows, X.shape[1]))
        # Arrow's allocator keeps the pages it freed for the next read; this actor reads no more, so they
        # go back to the system instead of staying in its resident memory beside the rows.
        pa.default_memory_pool().release_unused()
        self._shards = []  # the rows now live in self._X; drop the inputs
        self._shard_rows = [rows for _, rows, _ in info]
        self._X = X
        self._x_sq = row_sq_norms(X)
        self._info = info
        return info

    def count(self) -> int:
        return int(self._X.shape[0])

    def dim(self) -> int:
        return int(self._X.shape[1])

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        return self._X[np.asarray(indices, dtype=np.int64)]  # a copy already: fancy indexing copies

    def get_counted_subset(self, indices: np.ndarray) -> tuple[np.ndarray, int]:
        """get_subset and its row count; called with num_returns=2, so the caller can fetch the count only."""
        subset = self.get_subset(indices)
        return subset, int(subset.shape[0])

    def assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid and squared distance of every row (labels int64, float32).

        The rows were checked at load and are not checked again: the check of a whole share allocated a
        (rows x d) mask on every pass, a quarter of the share's bytes.
        """
        return self._rows().assign(as_centroids(centroids, n_features=self.dim()))

    def _assign_rows(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.assign(centroids)  # with the squared norms computed at load

    def partial_stats(self, centroids: np.ndarray) -> tuple:
        """The PartialStats fields (`PartialStats.as_tuple`) of this actor's rows for `centroids`."""
        return self._rows().stats(as_centroids(centroids, n_features=self.dim())).as_tuple()

    def _rows(self) -> HostRows | DeviceRows:
        """The loaded rows where this actor computes: on its GPU (uploaded once, for every pass) when it has one
        and the backend computes there, else in host memory."""
        if self._placed is None:
            self._placed = place_rows(self._X, None, resolve_backend(self._backend), x_sq=self._x_sq)
        return self._placed

    def peak_rss(self) -> int:
        """This process's peak resident memory in bytes (Linux reports kibibytes), for memory checks."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _pieces(self, shard: Shard, name: str) -> Iterator[np.ndarray]:
        """The rows of a shard as float32 pieces: a numpy shard whole, a Parquet file one row group at a time."""
        if isinstance(shard, np.ndarray):
            if shard.ndim != 2:
                raise DataError(f"{name}: should be a 2-D array (rows, dims), got shape {shard.shape}")
            try:
                yield np.ascontiguousarray(shard, dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise DataError(f"{name}: should hold numbers, got dtype {shard.dtype}") from e
            return
        try:
            # One row group at a time, in this thread: Arrow's buffers are a row group's, not the file's
            # (reading whole 250k x 64 files peaked at ~0.3 GiB above the rows, row groups at ~0.13).
            file = pq.ParquetFile(shard, pre_buffer=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{name}: not a readable Parquet file ({e})") from e
        names = file.schema_arrow.names
        if self._column not in names:
            raise DataError(f"{name}: no column '{self._column}' (columns: {', '.join(names)})")
        first_row = 0
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=[self._column], use_threads=False)
            yield vectors_to_numpy(table.column(self._column), name=self._column, where=name, first_row=first_row)
            first_row += table.num_rows


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
        shards, names = _resolve_source(source)
        # What the shapes alone can tell is checked here, before any actor starts.
        shapes = _shapes(shards, names, self.column)
        _check_shapes(shapes, self.column, self.n_clusters)
        saved = _FitState(self.checkpoint, self._fingerprint(shards, shapes))
        resume, _ = saved.load()
        num_actors = _actor_count(self.num_actors, len(shards))
        pool = _ShardActors(shards, names, num_actors, self.column, self.backend, self.spherical)
        actors = pool.actors
        try:
            sizes = pool.survive(lambda: self._load(actors), "loading the shards")
            self.n_samples_ = int(sizes.sum())
            check_n_clusters(self.n_clusters, self.n_samples_)
            init = self._check_init(self.n_features_in_)
            if "centroids" in resume:
                centroids = resume["centroids"]
            elif isinstance(init, np.ndarray):
                centroids = _unit_rows(init, name="init") if self.spherical else init.copy()
            elif init == "random":
                centroids = pool.survive(lambda: _gather(actors, sizes, np.random.default_rng(self.seed).choice(
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
            X = _unit_rows(X)
        return assign(X, self.cluster_centers_, backend=self.backend)[0]

    # --- settings -------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        _check_int("n_clusters", self.n_clusters, minimum=1)
        _check_int("max_iter", self.max_iter, minimum=1)
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float | np.number):
            raise ConfigError(f"tol should be a number, got {self.tol!r}.")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"tol={self.tol} should be a finite number >= 0.")
        _check_int("seed", self.seed, minimum=0)
        resolve_backend(self.backend)
        if self.num_actors is not None:
            _check_int("num_actors", self.num_actors, minimum=1)
        if isinstance(self.init, str) and self.init not in INITS:
            raise ConfigError(
                f"init={self.init!r} should be 'auto', 'k-means++', 'k-means||', 'random' or an array of shape "
                "(n_clusters, n_features)."
            )
        if not isinstance(self.column, str) or not self.column:
            raise ConfigError(f"column should be a column name, got {self.column!r}.")
        if not isinstance(self.spherical, bool | np.bool_):
            raise ConfigError(f"spherical should be True or False, got {self.spherical!r}.")
        _check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback should be a callable or None, got {self.callback!r}.")

    def _fingerprint(self, shards: list[Shard], shapes: list[tuple[str, int, int | None]]) -> dict[str, Any]:
        """What a saved state must match: each shard (its digest, or its file's size and time) and the
        settings that change the result."""
        if self.checkpoint is None:
            return {}
        data = [_digest(s) if isinstance(s, np.ndarray) else [s, *storage.size_and_mtime(s)] for s in shards]
        init = self.init if isinstance(self.init, str) else _digest(np.asarray(self.init, dtype=np.float32))
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
        infos = _get([a.load.remote() for a in actors])
        _check_shapes([shard for info in infos for shard in info], self.column, self.n_clusters)
        self.n_features_in_ = int(infos[0][0][2])
        return np.array([sum(rows for _, rows, _ in info) for info in infos], dtype=np.int64)

    def _stats(self, actors: list, centroids_ref) -> PartialStats:
        parts = _get([a.partial_stats.remote(centroids_ref) for a in actors])
        return sum((PartialStats(*p) for p in parts[1:]), PartialStats(*parts[0]))

    def _lloyd(self, pool: _ShardActors, centroids: np.ndarray, resume: dict[str, Any] | None = None,
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
            return _get([getattr(actor, method).remote(*refs) for actor in actors])

        local = KMeans(self.n_clusters, max_iter=self.max_iter, tol=self.tol, backend=self.backend,
                       spherical=self.spherical)
        return kmeans_parallel(call, lambda rows: _gather(actors, sizes, rows, self.n_features_in_), self.n_samples_,
                               self.n_clusters, self.seed, rng, local.fit_candidates)


def _resolve_source(source: Any) -> tuple[list[Shard], list[str]]:
    """(shards, names): Parquet paths of a complete folder or a list, or numpy arrays named 'shard i'."""
    if isinstance(source, str | Path):
        paths = shard_paths(source)  # IncompleteResultError without a manifest
        if not paths:
            raise DataError(f"{source}: the manifest lists no shards")
        return _check_paths(paths)
    if isinstance(source, np.ndarray) or not isinstance(source, Sequence) or len(source) == 0:
        raise ConfigError(
            "source should be an embeddings folder, a non-empty list of Parquet paths or a non-empty list of "
            f"numpy arrays (one per shard), got {type(source).__name__}."
        )
    if all(isinstance(s, str | Path) for s in source):
        return _check_paths([str(s) for s in source])
    if all(isinstance(s, np.ndarray) for s in source):
        return list(source), [f"shard {i}" for i in range(len(source))]
    raise ConfigError("source should be all Parquet paths or all numpy arrays, not a mix.")


def _check_paths(paths: list[str]) -> tuple[list[Shard], list[str]]:
    for p in paths:
        if not storage.is_file(p):
            raise DataError(f"{p}: no such Parquet file")
    return list(paths), list(paths)


def _shapes(shards: list[Shard], names: list[str], column: str) -> list[tuple[str, int, int | None]]:
    """(name, rows, dim or None when only the data can tell) of each shard, from array shapes or Parquet
    metadata, without reading the vectors."""
    out = []
    for shard, name in zip(shards, names, strict=True):
        if isinstance(shard, np.ndarray):
            if shard.ndim != 2:
                raise DataError(f"{name}: should be a 2-D array (rows, dims), got shape {shard.shape}")
            out.append((name, shard.shape[0], shard.shape[1]))
            continue
        try:
            meta = pq.ParquetFile(shard).metadata
        except (OSError, ValueError) as e:
            raise DataError(f"{name}: not a readable Parquet file ({e})") from e
        schema = meta.schema.to_arrow_schema()
        if column not in schema.names:
            raise DataError(f"{name}: no column '{column}' (columns: {', '.join(schema.names)})")
        field_type = schema.field(column).type
        dim = field_type.list_size if pa.types.is_fixed_size_list(field_type) else None
        out.append((name, meta.num_rows, dim))
    return out


def _rows(shard: Shard) -> int:
    """Row count of a shard from its shape or its Parquet metadata, without reading the vectors."""
    return int(shard.shape[0]) if isinstance(shard, np.ndarray) else int(pq.ParquetFile(shard).metadata.num_rows)


def _check_shapes(shapes: list[tuple[str, int, int | None]], column: str, n_clusters: int) -> None:
    """Every shard has rows, all have one dimension (the first that differs is named), and k <= rows."""
    first = next(((name, dim) for name, _, dim in shapes if dim is not None), None)
    for name, rows, dim in shapes:
        if rows == 0:
            raise DataError(f"{name}: the shard holds no rows")
        if dim is not None and dim != first[1]:
            raise DataError(f"{name}: column '{column}' has {dim} dimensions, but {first[0]} has {first[1]}")
    check_n_clusters(n_clusters, sum(rows for _, rows, _ in shapes))


def _actor_count(num_actors: int | None, n_shards: int) -> int:
    """The given count (at most one actor per shard), or by default one per shard up to the cluster's CPUs."""
    if num_actors is not None:
        if num_actors > n_shards:
            raise ConfigError(f"num_actors={num_actors} should be <= the number of shards ({n_shards}).")
        return int(num_actors)
    import ray

    from engine.runtime import init_ray

    init_ray()  # joins RAY_ADDRESS or starts the embedded local Ray; a no-op when Ray is up
    return max(1, min(n_shards, int(ray.cluster_resources().get("CPU", 1))))


class _ShardActors:
    """The shard actors of one fit, each holding a contiguous group of shards, and their replacement.

    An actor whose process or node dies (a node removed from the cluster, a killed worker) takes its rows
    with it; `survive` runs a step of the fit, and when the step fails for a dead actor, starts a new actor
    for that actor's shards (SPREAD places it on a live node), loads it and runs the step again. Steps are
    whole Lloyd iterations or the whole seeding, so a redone step gives what it would have given.
    """

    def __init__(self, shards: list[Shard], names: list[str], num_actors: int, column: str, backend: str,
                 spherical: bool = False):
        import ray

        from engine.runtime import init_ray

        init_ray()
        gpus = ray.cluster_resources().get("GPU", 0.0)
        options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if gpus:
            # Every backend computes on a GPU when the process has one ("same code path"); share them out.
            options["num_gpus"] = min(1.0, gpus / num_actors)
        self._remote = ray.remote(ShardActor).options(**options)
        # Contiguous groups keep the global row order (actor 0's rows first), as KMeans sees the concatenation.
        groups = np.array_split(np.arange(len(shards)), num_actors)
        self._args = [([shards[i] for i in g], [names[i] for i in g], column, backend, int(g[0]), spherical)
                      for g in groups]
        # Replaced in place, so a step holding this list reaches the new actors when it runs again.
        self.actors = [self._remote.remote(*args) for args in self._args]

    def survive(self, step: Callable[[], T], what: str) -> T:
        """`step()`, run again (up to _MAX_REDOS times) after replacing the actors that died during it."""
        import ray

        redos = 0
        while True:
            try:
                return step()
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                dead = self._dead()
                if not dead or redos == _MAX_REDOS:
                    raise
                redos += 1
                logger.warning("%s: %d shard actor(s) died (%s); starting new ones for their shards and redoing "
                               "the step", what, len(dead), type(e).__name__)
                for i in dead:
                    self.actors[i] = self._remote.remote(*self._args[i])
                _get([self.actors[i].load.remote() for i in dead])

    def _dead(self) -> list[int]:
        import ray

        dead = []
        for i, actor in enumerate(self.actors):
            try:
                ray.get(actor.count.remote())
            except ray.exceptions.RayActorError:
                dead.append(i)
        return dead

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def _get(refs: list) -> list:
    """ray.get, raising an engine error from an actor as itself instead of Ray's wrapper."""
    import ray

    try:
        return ray.get(refs)
    except Exception as e:
        err = find_engine_error(e)
        if err is None:
            raise
        raise err from None


def _requests(sizes: np.ndarray, rows: np.ndarray, dim: int) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
    """The requests for the rows at global indices `rows` (into the concatenation of the actors' rows), in groups
    of at most _GATHER_BYTES: per group, (actor, the actor's own indices, positions in `rows`), actors ascending."""
    rows = np.asarray(rows, dtype=np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    step = max(1, _GATHER_BYTES // (4 * dim))
    for first in range(0, rows.shape[0], step):
        chunk = rows[first:first + step]
        owner = np.searchsorted(ends, chunk, side="right")
        group = []
        for a in np.unique(owner):
            pick = np.flatnonzero(owner == a)
            group.append((int(a), chunk[pick] - starts[a], first + pick))
        yield group


def _gather(actors: list, sizes: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """The rows at global indices `rows` (into the concatenation of the actors' rows), in that order, asked
    for in requests of at most _GATHER_BYTES together."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    for group in _requests(sizes, rows, dim):
        refs = [actors[a].get_subset.remote(local) for a, local, _ in group]
        for (_, _, where), part in zip(group, _get(refs), strict=True):
            out[where] = part
    return out


def _draw_sample(pool: _ShardActors, rows: np.ndarray) -> list:
    """The pool's actors load their shards and leave the rows at global indices `rows` in the object store
    (`_sample_parts`); then they are killed. The parts outlive them: an object belongs to its caller."""
    actors = pool.actors
    try:
        infos = pool.survive(lambda: _get([a.load.remote() for a in actors]), "loading the shards")
        sizes = np.array([sum(n for _, n, _ in info) for info in infos])
        return pool.survive(lambda: _sample_parts(actors, sizes, rows, infos[0][0][2]), "sampling")
    finally:
        pool.kill()


def _sample_parts(actors: list, sizes: np.ndarray, rows: np.ndarray, dim: int) -> list:
    """References to the rows at global indices `rows` (sorted), in that order, left in the object store.

    The requests of `_gather`, but nothing is fetched here: the parts go to the task that trains on them. Each
    request also returns its row count, which is fetched, so that an actor that died fails this step (and the
    pool replaces it) rather than the training.
    """
    parts, counts = [], []
    for group in _requests(sizes, rows, dim):  # sorted rows, actors ascending: parts concatenate in row order
        for a, local, _ in group:
            part, count = actors[a].get_counted_subset.options(num_returns=2).remote(local)
            parts.append(part)
            counts.append(count)
    returned = sum(_get(counts))
    if returned != len(rows):
        raise RuntimeError(f"the shard actors returned {returned} sample rows of {len(rows)} asked for")
    return parts


def _fit_sample(parts: list, params: dict[str, Any]) -> KMeans:
    """KMeans fitted on the concatenated parts, in a Ray task on the cluster: the driver never holds the sample.

    The task reserves one CPU, so that it never waits for a whole node to be free, and computes with as many
    threads as its node has CPUs (Ray would give a 1-CPU task one thread); it takes a GPU when the cluster has
    one, since every backend computes on the process's GPU.
    """
    import ray

    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    if any(n["Resources"].get("GPU", 0.0) >= 1 for n in ray.nodes() if n["Alive"]):
        options["num_gpus"] = 1
    return _get([ray.remote(_fit_parts).options(**options).remote(params, *parts)])[0]


def _fit_parts(params: dict[str, Any], *parts: np.ndarray) -> KMeans:
    import faiss
    import ray
    import torch

    node = ray.get_runtime_context().get_node_id()
    threads = next(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["NodeID"] == node)
    torch.set_num_threads(max(1, threads))
    faiss.omp_set_num_threads(max(1, threads))
    # Parts passed as arguments arrive resolved (read-only views of the object store); one copy joins them.
    sample = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    del parts
    return KMeans(**params).fit(sample)


def fit_sample_then_assign(
    embeddings: str | Path,
    out_dir: str | Path,
    n_clusters: int,
    sample_size: int,
    *,
    init: str | np.ndarray = "k-means++",
    max_iter: int = 25,
    tol: float = 1e-4,
    seed: int = 0,
    backend: str = "auto",
    num_actors: int | None = None,
    config_hash: str = "",
    batch_size: int = 65536,
    concurrency: int = 2,
    column: str = Z,
    stage: str | None = "embed",
    spherical: bool = False,
) -> tuple[KMeans, dict[str, Any]]:
    """Train `KMeans` on a seeded sample of an embeddings folder, then assign every row with Ray Data.

    The sample (sample_size rows drawn uniformly without replacement; all rows when there are fewer) is
    gathered from shard actors, so no process reads more than its share of the files; the actors are
    killed before the assignment starts. Returns the fitted model and the manifest of `out_dir`, which
    holds `id, cluster, distance` for every embedding row exactly once. `column` and `stage` read another
    vector column of another complete folder (e.g. `x` of input shards, stage "input").
    """

    import ray

    from engine.cluster.shards import assign_shards
    from engine.data.shards import read_manifest

    _check_int("sample_size", sample_size, minimum=1)
    _check_int("seed", seed, minimum=0)
    if num_actors is not None:
        _check_int("num_actors", num_actors, minimum=1)
    read_manifest(embeddings, stage=stage)
    shards, names = _resolve_source(embeddings)
    shapes = _shapes(shards, names, column)
    _check_shapes(shapes, column, n_clusters)
    n_samples = sum(rows for _, rows, _ in shapes)
    check_n_clusters(n_clusters, min(sample_size, n_samples))

    rows = np.sort(np.random.default_rng(seed).choice(n_samples, size=min(sample_size, n_samples), replace=False))
    params = dict(n_clusters=n_clusters, init=init, max_iter=max_iter, tol=tol, seed=seed, backend=backend,
                  spherical=spherical)
    for attempt in range(_MAX_REDOS + 1):
        parts = _draw_sample(_ShardActors(shards, names, _actor_count(num_actors, len(shards)), column, backend,
                                          spherical), rows)
        try:
            model = _fit_sample(parts, params)
            break
        except ray.exceptions.ObjectLostError as e:  # a node holding parts of the sample left the cluster
            if attempt == _MAX_REDOS:
                raise
            logger.warning("training on the sample: %s; drawing the sample again", type(e).__name__)
    del parts
    manifest = assign_shards(embeddings, model.cluster_centers_, out_dir, config_hash=config_hash,
                             batch_size=batch_size, concurrency=concurrency, backend=backend, column=column,
                             stage=stage, spherical=spherical)
    return model, manifest
