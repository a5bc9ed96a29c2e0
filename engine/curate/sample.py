"""Cluster-balanced sampling (Vo et al. 2024) of Parquet embeddings: hierarchy on a sample, draws over all rows."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.curate.hierarchy import Level, balanced_quotas, hierarchical_kmeans
from engine.curate.nodes import place_tasks
from engine.curate.output import check_result_output, write_json, write_result
from engine.curate.partition import ROWS_PER_CENTROID, fit_cpus, use_threads
from engine.curate.source import Piece, open_embeddings, read_unit_piece, validate
from engine.data.folders import write_manifest
from engine.data.schema import vector_array
from engine.errors import ConfigError

STAGE = "sample"
STRATEGIES = ("random", "closest")
# A level-1 k beyond this is for a machine with GPUs and the user's own --k; the default stays tractable here: the
# hierarchy's k-means costs ~k^2 (a sample of 256 rows a centroid), and 10M rows at k 1,000 took 5 min on 2 cores
# where 4,096 would be ~16x the hierarchy's work (~40 min).
MAX_DEFAULT_K = 1024


def default_ks(n_rows: int, levels: int) -> list[int]:
    """About 50 rows a level-1 cluster (at most MAX_DEFAULT_K), then 5x fewer clusters each level up (the paper's
    4-level web-image configuration goes 500k, 50k, 10k: 10x then 5x)."""
    ks = [int(np.clip(n_rows // 50, 2, MAX_DEFAULT_K))]
    for _ in range(levels - 1):
        ks.append(max(1, ks[-1] // 5))
    return ks


def check_settings(n: int, levels: int, ks: Sequence[int] | None, strategy: str, steps: int) -> None:
    if n < 1:
        raise ConfigError(f"--n={n} should be >= 1")
    if levels < 1:
        raise ConfigError(f"--levels={levels} should be >= 1")
    if ks is not None:
        if len(ks) != levels:
            raise ConfigError(f"--k has {len(ks)} values but --levels={levels}: give one k per level")
        for t, k in enumerate(ks):
            if k < 1 or (t and k > ks[t - 1]):
                raise ConfigError(f"--k value {k} of level {t + 1} should be >= 1 and <= the k of the level below "
                                  "(each level clusters the centroids of the one below)")
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy={strategy!r} should be one of {', '.join(STRATEGIES)}")
    if steps < 0:
        raise ConfigError(f"--resample-steps={steps} should be >= 0")


def check_rows(n: int, levels: int, k: Sequence[int] | None, n_rows: int) -> list[int]:
    """The k of every level, checked against the rows the input has (`n` too)."""
    if n > n_rows:
        raise ConfigError(f"--n={n} is larger than the number of rows, {n_rows}: a sample draws each row at most once")
    ks = list(k) if k is not None else default_ks(n_rows, levels)
    if ks[0] > n_rows:
        raise ConfigError(f"--k={ks[0]} (level 1) should be <= the number of rows, {n_rows}")
    return ks


def _fit_hierarchy(ks: list[int], steps: int, seed: int, threads: int, *parts: np.ndarray) -> list[Level]:
    x = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    with use_threads(threads):
        return hierarchical_kmeans(x, ks, steps=steps, seed=seed)


def _priority(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded pseudo-random key per id (splitmix64): the same rows are drawn however the data is split."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))).astype(np.float64)


def _piece_candidates(piece: Piece, column: str, id_column: str, dim: int, centroids: np.ndarray,
                      quotas: np.ndarray | None, strategy: str, seed: int) -> Any:
    """Counts per level-1 cluster (quotas None), else the piece's best `quota` rows of each cluster."""
    ids, x = read_unit_piece(piece, column, id_column, dim)
    sims = x @ centroids.T
    labels = sims.argmax(axis=1)
    if quotas is None:
        return np.bincount(labels, minlength=len(centroids))
    key = -sims[np.arange(len(x)), labels] if strategy == "closest" else _priority(ids, seed)
    return _best_per_cluster(labels, key, ids, quotas)


def _best_per_cluster(labels: np.ndarray, key: np.ndarray, ids: np.ndarray, quotas: np.ndarray) -> tuple:
    order = np.lexsort((ids, key, labels))
    labels, key, ids = labels[order], key[order], ids[order]
    starts = np.searchsorted(labels, labels, side="left")
    rank = np.arange(len(labels)) - starts
    keep = rank < quotas[labels]
    return labels[keep], key[keep], ids[keep]


def sample(embeddings: str | os.PathLike[str], out: str | os.PathLike[str], *, n: int, levels: int = 3,
           k: Sequence[int] | None = None, strategy: str = "random", resample_steps: int = 10, seed: int = 0,
           column: str = "z", id_column: str = "id", sample_size: int | None = None, overwrite: bool = False,
           on_progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Draw `n` rows balanced over a hierarchy of spherical k-means clusters (Vo et al. 2024).

    The hierarchy is fit on a seeded sample (at most 256 rows per level-1 centroid, faiss's cap): level 1 on the
    rows, each level above on the centroids below, each with `resample_steps` resampling steps. Every row is then
    assigned to its level-1 cluster by Ray tasks; `n` is split evenly over the top clusters, each share evenly
    over the children, and within each level-1 cluster the rows are drawn at random (seeded) or closest to the
    centroid first. Writes `out/` (atomically): `sampled/` (id, cluster), `hierarchy/` (one Parquet per level:
    cluster, parent, rows, quota, centroid), `summary.json`. Ray must be running.
    """
    import ray

    check_settings(n, levels, k, strategy, resample_steps)
    source = str(embeddings)
    emb = open_embeddings(source, column=column, id_column=id_column)
    ks = check_rows(n, levels, k, emb.n_rows)
    size = min(emb.n_rows, sample_size or ROWS_PER_CENTROID * ks[0])
    if size < ks[0]:
        raise ConfigError(f"sample_size={size} should be >= the level-1 k, {ks[0]}")
    check_result_output(out, source, overwrite=overwrite)
    notify = on_progress or (lambda stage, info: None)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    place = place_tasks(None, emb.local_files())  # [0] which nodes see the input
    ids, sample_refs = validate(emb, size, seed, place.strategy)  # [1] every row checked before anything is written
    times["validate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cpus = fit_cpus(size, ks[0])  # [2] one Ray task, alone on its node
    hierarchy = ray.get(ray.remote(num_cpus=cpus, max_retries=3)(_fit_hierarchy).remote(
        ks, resample_steps, seed, cpus, *sample_refs))
    del sample_refs
    times["hierarchy"] = time.perf_counter() - t0
    notify("hierarchy", {"k": ks, "seconds": times["hierarchy"]})

    t0 = time.perf_counter()
    task = ray.remote(num_cpus=1, max_retries=3)(_piece_candidates).options(scheduling_strategy=place.strategy)
    c_ref = ray.put(hierarchy[0].centroids)
    counts = sum(ray.get([task.remote(p, column, id_column, emb.dim, c_ref, None, strategy, seed)  # [3]
                          for p in emb.pieces]))
    quotas = balanced_quotas(hierarchy, counts, n, seed)
    times["assign"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    q_ref = ray.put(quotas)
    pending = [task.remote(p, column, id_column, emb.dim, c_ref, q_ref, strategy, seed) for p in emb.pieces]
    best = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    while pending:  # the driver holds at most n candidates plus one piece's
        ready, pending = ray.wait(pending, num_returns=1)
        got = ray.get(ready[0])
        best = _best_per_cluster(*(np.concatenate([a, b]) for a, b in zip(best, got, strict=True)), quotas)
    times["draw"] = time.perf_counter() - t0
    labels, _, chosen = best
    if len(chosen) != n:
        raise RuntimeError(f"drew {len(chosen)} rows for --n={n}")
    config = {"n": n, "k": ks, "strategy": strategy, "resample_steps": resample_steps, "seed": seed,
              "input": emb.fingerprint(), "sample_size": size}
    config_hash = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=8).hexdigest()
    summary = {"rows": emb.n_rows, "n": n, "levels": levels, "k": ks, "strategy": strategy,
               "resample_steps": resample_steps, "seed": seed, "sample_size": size,
               "clusters_drawn_from": int((quotas > 0).sum()), "nodes_left_out": list(place.pinned), "seconds": times}

    def build(tmp: Path) -> list[str]:
        (tmp / "sampled").mkdir()
        order = np.argsort(chosen)
        pq.write_table(pa.table({"id": pa.array(chosen[order], pa.int64()),
                                 "cluster": pa.array(labels[order].astype(np.int32))}),
                       tmp / "sampled" / "sampled-00000.parquet")
        write_manifest(tmp / "sampled", stage="sample", config_hash=config_hash, rows=n,
                       files=["sampled-00000.parquet"])
        (tmp / "hierarchy").mkdir()
        names, rows = [], counts
        for t, level in enumerate(hierarchy):
            if t:
                rows = np.bincount(level.labels, weights=rows, minlength=len(level.centroids))
            parent = hierarchy[t + 1].labels if t + 1 < len(hierarchy) else np.full(len(level.centroids), -1)
            names.append(f"level-{t + 1}.parquet")
            pq.write_table(pa.table({"cluster": pa.array(np.arange(len(level.centroids), dtype=np.int32)),
                                     "parent": pa.array(np.asarray(parent, dtype=np.int32)),
                                     "rows": pa.array(np.asarray(rows, dtype=np.int64)),
                                     **({"quota": pa.array(quotas.astype(np.int64))} if t == 0 else {}),
                                     "centroid": vector_array(level.centroids)}), tmp / "hierarchy" / names[-1])
        write_manifest(tmp / "hierarchy", stage="sample-hierarchy", config_hash=config_hash,
                       rows=int(sum(len(lv.centroids) for lv in hierarchy)), files=names)
        write_json(tmp / "summary.json", summary)
        return ["sampled", "hierarchy", "summary.json"]

    write_result(out, build, stage=STAGE, config_hash=config_hash, rows=n, k=ks)
    notify("write", {"n": n, "seconds": sum(times.values())})
    return summary


