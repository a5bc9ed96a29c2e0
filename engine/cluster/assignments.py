"""K-means over embedding folders: gather vectors for fitting, assign every shard with Ray Data tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine.data.folders import read_shards, read_table, write_dataset
from engine.data.schema import CLUSTER, DISTANCE, ID, LABEL, Z, vectors_to_numpy
from engine.errors import DataError

STAGE = "assign"
# Ray 2.60's warning for any remote argument without a named parameter of map_batches; retries (max_retries,
# max_restarts, max_task_retries) have none yet, and bounded retries are what a faulty node needs.
RAY_REMOTE_ARGS_DEPRECATED = "`ray_remote_args` is deprecated"


@contextlib.contextmanager
def retries_as_remote_args() -> Iterator[None]:
    """Ray 2.60's deprecation warning silenced for the retries (max_retries, max_restarts, max_task_retries) that
    go to map_batches as plain remote arguments (see RAY_REMOTE_ARGS_DEPRECATED)."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RAY_REMOTE_ARGS_DEPRECATED, category=RayDeprecationWarning)
        yield


def actor_gpus(num_actors: int) -> float:
    """The GPUs each of `num_actors` shard actors asks for: a share of the GPUs the cluster has or its autoscaler
    may launch (`engine.runtime.gpus_possible`), at most one; 0 without GPUs."""
    from engine.runtime import gpus_possible

    gpus = gpus_possible()
    return min(1.0, gpus / max(1, num_actors)) if gpus else 0.0


def load_vectors(folder: str | Path, *, stage: str = "embed") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, Z, labels or None) of a complete embeddings folder, read in this process, in id order.

    Id order, not file order: how the rows were split into shards (which differs between an interrupted
    and resumed embedding and an uninterrupted one) does not change what a seeded clustering finds.
    """
    return table_vectors(read_table(folder, stage=stage), where=str(folder))


def table_vectors(table: pa.Table | None, *, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, Z, labels or None) of embedding rows in this process, in id order (see `load_vectors`)."""
    if table is None or table.num_rows == 0:
        raise DataError(f"{where}: the embeddings folder holds no rows")
    table = table.take(np.argsort(table.column(ID).to_numpy(), kind="stable"))
    z = vectors_to_numpy(table.column(Z), name=Z, where=where)
    labels = table.column(LABEL).to_numpy() if LABEL in table.column_names else None
    return table.column(ID).to_numpy(), z, labels


def assign_batch(batch: pa.Table, centroids: np.ndarray, backend: str = "auto", column: str = Z,
                 spherical: bool = False) -> pa.Table:
    """Nearest centroid and its Euclidean distance for each row of an embeddings batch (of the unit-norm
    row when spherical)."""
    from engine.cluster._stats import assign, unit_rows

    z = vectors_to_numpy(batch.column(column), name=column)
    if spherical:
        z = unit_rows(z, name=f"column '{column}'")
    if z.shape[1] != centroids.shape[1]:
        raise DataError(f"column '{column}' has {z.shape[1]} dimensions but the centroids have {centroids.shape[1]}")
    labels, sq = assign(z, centroids, backend=backend)
    return pa.table({
        ID: batch.column(ID),
        CLUSTER: pa.array(labels.astype(np.int32)),
        DISTANCE: pa.array(np.sqrt(sq).astype(np.float32)),
    })


def assign_shards(embeddings: str | Path, centroids: np.ndarray, out_dir: str | Path, *, config_hash: str,
                  batch_size: int = 65536, concurrency: int = 2, backend: str = "auto", column: str = Z,
                  stage: str | None = "embed", spherical: bool = False, max_retries: int = 3,
                  use_gpu: bool = False) -> dict[str, Any]:
    """Write `id, cluster, distance` (Euclidean) for every row of a complete folder into `out_dir`, atomically.

    By default the folder holds embeddings (`z`); `column` and `stage` name another vector column and
    manifest stage, e.g. `x` of input shards written by `prepare_source` (stage "input", None for any).
    spherical: rows are L2-normalised first, as `KMeans(spherical=True)` does. A task whose worker dies is
    retried up to `max_retries` times and rewrites its own file (Ray Data names it by write and task), so
    no id is written twice. `use_gpu`: each task takes a GPU (the nearest-centroid search runs on it).
    """
    from ray.data import TaskPoolStrategy

    from engine.data.folders import read_manifest

    manifest = read_manifest(embeddings, stage=stage)
    expected = manifest["rows"]
    ds = read_shards(embeddings, stage=stage, columns=[ID, column])
    # Stateless tasks, not an actor pool: the centroids are small enough to travel with each task, and
    # tasks reuse warm worker processes instead of starting actors.
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    with retries_as_remote_args():
        out = ds.map_batches(assign_batch, fn_kwargs={"centroids": centroids, "backend": backend, "column": column,
                                                          "spherical": spherical},
                             batch_size=batch_size, batch_format="pyarrow",
                             compute=TaskPoolStrategy(size=max(1, min(concurrency, len(manifest["files"])))),
                             num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=max_retries)
    return write_dataset(out, out_dir, stage=STAGE, config_hash=config_hash, expected_rows=expected,
                         k=int(len(centroids)))


def write_assignments(ids: np.ndarray, labels: np.ndarray, distances: np.ndarray, out_dir: str | Path, *,
                      config_hash: str, rows_per_file: int = 1_000_000, **extra: Any) -> dict[str, Any]:
    """Write `id, cluster, distance` held in this process into `out_dir`, atomically, with the manifest
    `assign_shards` writes: for clusterings computed in memory (no centroids to assign shards with)."""
    import pyarrow.parquet as pq

    from engine.data.folders import staged_folder, write_manifest

    n = len(ids)
    if not len(labels) == len(distances) == n:
        raise DataError(f"{out_dir}: {n} ids but {len(labels)} labels and {len(distances)} distances")
    table = pa.table({
        ID: pa.array(np.asarray(ids, dtype=np.int64)),
        CLUSTER: pa.array(np.asarray(labels, dtype=np.int32)),
        DISTANCE: pa.array(np.asarray(distances, dtype=np.float32)),
    })
    with staged_folder(out_dir) as tmp:
        files = []
        for i, start in enumerate(range(0, max(n, 1), rows_per_file)):
            files.append(f"assignments-{i:05d}.parquet")
            pq.write_table(table.slice(start, rows_per_file), tmp / files[-1])
        manifest = write_manifest(tmp, stage=STAGE, config_hash=config_hash, rows=n,
                                  schema=str(pq.read_schema(tmp / files[0])), files=files, **extra)
    return manifest
