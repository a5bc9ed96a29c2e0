"""Shard actors: the rows of embedding shards loaded once into Ray actors (faiss's DatasetAssign shape), a pool
that replaces the actors lost with their node, and gathering given rows back from them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.cluster._device import DeviceRows, place_rows
from engine.cluster._seeding import SeedingRows
from engine.cluster._stats import (
    HostRows,
    as_centroids,
    check_n_clusters,
    resolve_backend,
    row_sq_norms,
    unit_rows,
)
from engine.data.folders import shard_paths
from engine.data.schema import Z, check_finite, vectors_to_numpy
from engine.errors import ConfigError, DataError, remote_errors_as_raised

logger = logging.getLogger(__name__)

# Redos of one step after shard actors died: a node lost now and then is survived, an actor that dies
# every time (out of memory on any node) is not retried forever.
MAX_REDOS = 3
# Seconds to wait for the GCS's verdict on an actor that does not answer (Ray declares a silent node dead after
# 5 missed health checks 3 s apart by default).
VERDICT_WAIT = 60.0

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
                    part = unit_rows(part, name=f"{name}: column '{self._column}'", first_row=rows)
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
        # Seeding: where the rows are placed, with the squared norms computed at load, no Lloyd bounds.
        return self._rows().nearest_centroids(as_centroids(centroids, n_features=self.dim()))

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


def resolve_source(source: Any) -> tuple[list[Shard], list[str]]:
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


def shard_shapes(shards: list[Shard], names: list[str], column: str) -> list[tuple[str, int, int | None]]:
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


def check_shapes(shapes: list[tuple[str, int, int | None]], column: str, n_clusters: int) -> None:
    """Every shard has rows, all have one dimension (the first that differs is named), and k <= rows."""
    first = next(((name, dim) for name, _, dim in shapes if dim is not None), None)
    for name, rows, dim in shapes:
        if rows == 0:
            raise DataError(f"{name}: the shard holds no rows")
        if dim is not None and dim != first[1]:
            raise DataError(f"{name}: column '{column}' has {dim} dimensions, but {first[0]} has {first[1]}")
    check_n_clusters(n_clusters, sum(rows for _, rows, _ in shapes))


def actor_count(num_actors: int | None, n_shards: int) -> int:
    """The given count (at most one actor per shard), or by default one per shard up to the cluster's CPUs."""
    if num_actors is not None:
        if num_actors > n_shards:
            raise ConfigError(f"num_actors={num_actors} should be <= the number of shards ({n_shards}).")
        return int(num_actors)
    import ray

    from engine.runtime import init_ray

    init_ray()  # joins RAY_ADDRESS or starts the embedded local Ray; a no-op when Ray is up
    return max(1, min(n_shards, int(ray.cluster_resources().get("CPU", 1))))


class ShardActorPool:
    """The shard actors of one fit, each holding a contiguous group of shards, and their replacement.

    An actor whose process or node dies (a node removed from the cluster, a killed worker) takes its rows
    with it; `survive` runs a step of the fit, and when the step fails for a dead actor, starts a new actor
    for that actor's shards (SPREAD places it on a live node), loads it and runs the step again. Steps are
    whole Lloyd iterations or the whole seeding, so a redone step gives what it would have given.
    """

    def __init__(self, shards: list[Shard], names: list[str], num_actors: int, column: str, backend: str,
                 spherical: bool = False):
        import ray

        from engine.cluster.assignments import actor_gpus
        from engine.runtime import init_ray

        init_ray()
        options: dict[str, Any] = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        gpus = actor_gpus(num_actors)  # the GPUs the cluster has or its autoscaler may launch, shared out
        if gpus:
            # Every backend computes on a GPU when the process has one ("same code path").
            options["num_gpus"] = gpus
        self._remote = ray.remote(ShardActor).options(**options)
        # Contiguous groups keep the global row order (actor 0's rows first), as KMeans sees the concatenation.
        groups = np.array_split(np.arange(len(shards)), num_actors)
        self._args = [([shards[i] for i in g], [names[i] for i in g], column, backend, int(g[0]), spherical)
                      for g in groups]
        # Replaced in place, so a step holding this list reaches the new actors when it runs again.
        self.actors = [self._remote.remote(*args) for args in self._args]

    def survive(self, step: Callable[[], T], what: str) -> T:
        """`step()`, run again (up to MAX_REDOS times) after replacing the actors that died during it."""
        import ray

        redos, fresh = 0, []
        while True:
            try:
                if fresh:  # replacements load inside the attempt: one that dies while loading is replaced too
                    ray_get([self.actors[i].load.remote() for i in fresh])
                    fresh = []
                return step()
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                dead = self._dead()
                if not dead or redos == MAX_REDOS:
                    raise
                redos += 1
                logger.warning("%s: %d shard actor(s) died (%s); starting new ones for their shards and redoing "
                               "the step", what, len(dead), type(e).__name__)
                for i in dead:
                    self.actors[i] = self._remote.remote(*self._args[i])
                fresh = sorted({*fresh, *dead})

    def _dead(self) -> list[int]:
        """The actors that are dead. One that is unavailable (its node stopped answering, as a crashed machine does)
        is asked again until the GCS gives its verdict (at most VERDICT_WAIT seconds; then it counts as dead): a
        replacement started before the verdict could be placed on that same node, and die with it."""
        import time

        import ray

        dead = []
        deadline = time.monotonic() + VERDICT_WAIT
        for i, actor in enumerate(self.actors):
            while True:
                try:
                    ray.get(actor.count.remote())
                    break
                except ray.exceptions.ActorUnavailableError:
                    if time.monotonic() >= deadline:
                        dead.append(i)
                        break
                    time.sleep(0.5)
                except ray.exceptions.RayActorError:
                    dead.append(i)
                    break
        return dead

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def ray_get(refs: list) -> list:
    """ray.get, raising an engine error from an actor as itself instead of Ray's wrapper."""
    import ray

    with remote_errors_as_raised():
        return ray.get(refs)


def gather_requests(sizes: np.ndarray, rows: np.ndarray,
                    dim: int) -> Iterator[list[tuple[int, np.ndarray, np.ndarray]]]:
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


def gather(actors: list, sizes: np.ndarray, rows: np.ndarray, dim: int) -> np.ndarray:
    """The rows at global indices `rows` (into the concatenation of the actors' rows), in that order, asked
    for in requests of at most _GATHER_BYTES together."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    for group in gather_requests(sizes, rows, dim):
        refs = [actors[a].get_subset.remote(local) for a, local, _ in group]
        for (_, _, where), part in zip(group, ray_get(refs), strict=True):
            out[where] = part
    return out
