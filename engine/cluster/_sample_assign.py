"""Sample then assign: k-means trained on a seeded sample that shard actors gather, then every row of an
embeddings folder assigned by Ray Data tasks; for more rows than exact Lloyd over the cluster can afford."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engine.cluster._kmeans import KMeans
from engine.cluster._shard_actors import (
    MAX_REDOS,
    ShardActorPool,
    actor_count,
    check_shapes,
    gather_requests,
    ray_get,
    resolve_source,
    shard_shapes,
)
from engine.cluster._stats import check_int, check_n_clusters
from engine.data.schema import Z

logger = logging.getLogger(__name__)


def draw_sample(pool: ShardActorPool, rows: np.ndarray) -> list:
    """The pool's actors load their shards and leave the rows at global indices `rows` in the object store
    (`_sample_parts`); then they are killed. The parts outlive them: an object belongs to its caller."""
    actors = pool.actors
    try:
        infos = pool.survive(lambda: ray_get([a.load.remote() for a in actors]), "loading the shards")
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
    for group in gather_requests(sizes, rows, dim):  # sorted rows, actors ascending: parts concatenate in row order
        for a, local, _ in group:
            part, count = actors[a].get_counted_subset.options(num_returns=2).remote(local)
            parts.append(part)
            counts.append(count)
    returned = sum(ray_get(counts))
    if returned != len(rows):
        raise RuntimeError(f"the shard actors returned {returned} sample rows of {len(rows)} asked for")
    return parts


def _fit_sample(parts: list, params: dict[str, Any]) -> KMeans:
    """KMeans fitted on the concatenated parts, in a Ray task on the cluster: the driver never holds the sample.

    The task reserves one CPU, so that it never waits for a whole node to be free, and computes with as many
    threads as its node has CPUs (Ray would give a 1-CPU task one thread); it takes a GPU when the cluster has
    one or its autoscaler may launch one, since every backend computes on the process's GPU.
    """
    import ray

    from engine.runtime import gpus_possible

    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0}
    if gpus_possible() >= 1:
        options["num_gpus"] = 1
    return ray_get([ray.remote(_fit_parts).options(**options).remote(params, *parts)])[0]


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

    from engine.cluster.assignments import assign_shards
    from engine.data.folders import read_manifest

    check_int("sample_size", sample_size, minimum=1)
    check_int("seed", seed, minimum=0)
    if num_actors is not None:
        check_int("num_actors", num_actors, minimum=1)
    read_manifest(embeddings, stage=stage)
    shards, names = resolve_source(embeddings)
    shapes = shard_shapes(shards, names, column)
    check_shapes(shapes, column, n_clusters)
    n_samples = sum(rows for _, rows, _ in shapes)
    check_n_clusters(n_clusters, min(sample_size, n_samples))

    rows = np.sort(np.random.default_rng(seed).choice(n_samples, size=min(sample_size, n_samples), replace=False))
    params = dict(n_clusters=n_clusters, init=init, max_iter=max_iter, tol=tol, seed=seed, backend=backend,
                  spherical=spherical)
    for attempt in range(MAX_REDOS + 1):
        parts = draw_sample(ShardActorPool(shards, names, actor_count(num_actors, len(shards)), column, backend,
                                          spherical), rows)
        try:
            model = _fit_sample(parts, params)
            break
        except ray.exceptions.ObjectLostError as e:  # a node holding parts of the sample left the cluster
            if attempt == MAX_REDOS:
                raise
            logger.warning("training on the sample: %s; drawing the sample again", type(e).__name__)
    del parts
    manifest = assign_shards(embeddings, model.cluster_centers_, out_dir, config_hash=config_hash,
                             batch_size=batch_size, concurrency=concurrency, backend=backend, column=column,
                             stage=stage, spherical=spherical)
    return model, manifest
