"""Spherical k-means on a sample, then every row written into the bucket of its cluster group, by Ray tasks."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather  # noqa: F401  (pa.feather)

from engine import storage
from engine.curate.source import Embeddings, Piece, read_unit_piece
from engine.data.schema import vector_array

# faiss's own cap on the rows k-means trains on (max_points_per_centroid = 256): more adds time, not quality.
ROWS_PER_CENTROID = 256


def default_sample_size(k: int, n_rows: int) -> int:
    return min(n_rows, ROWS_PER_CENTROID * k)


# Below this many row x centroid products a k-means task keeps one CPU: a task of another CPU count may need a new
# worker process (~2 s of imports), more than threads save on a small fit.
THREADED_ABOVE = 50_000_000


def fit_cpus(rows: int, k: int) -> int:
    """CPUs for a k-means task that runs alone (nothing else of the run runs in that stage): every CPU of the
    largest node when the fit is large, else 1; never more than the cluster has free now, so that other jobs on a
    shared cluster do not keep it waiting for a whole node."""
    import ray

    if rows * k < THREADED_ABOVE:
        return 1
    largest = max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"])
    return max(1, min(largest, int(ray.available_resources().get("CPU", 1))))


@contextlib.contextmanager
def use_threads(threads: int) -> Iterator[None]:
    """torch's threads for a task given `threads` CPUs, restored after it: the pooled worker then runs the
    single-CPU tasks again, which must not each start that many threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or threads)))  # logical CPUs can exceed the cores
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(k: int, seed: int, max_iter: int, threads: int, *parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from engine.cluster import KMeans

    x = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    with use_threads(threads):
        model = KMeans(k, spherical=True, seed=seed, max_iter=max_iter).fit(x)
    return model.cluster_centers_.astype(np.float32), np.bincount(model.labels_, minlength=k)


def fit_centroids(sample_refs: list, k: int, seed: int, max_iter: int = 25, rows: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids (k, d), rows of the sample in each cluster): `KMeans(spherical=True)` in one Ray task, so
    the sample goes from the reading tasks to it without passing through the driver. Nothing else runs meanwhile,
    so a large fit (`rows` in the sample) takes every CPU of the largest node (threads for its GEMMs)."""
    import ray

    cpus = fit_cpus(rows, k)
    task = ray.remote(num_cpus=cpus, max_retries=3)(_fit)
    return ray.get(task.remote(k, seed, max_iter, cpus, *sample_refs))


def plan_groups(sample_counts: np.ndarray, n_rows: int, dim: int, *, memory_bytes: int,
                min_groups: int, probes: int = 1) -> list[list[int]]:
    """Clusters packed, in index order, into groups of about `memory_bytes` of vectors (sizes estimated from the
    sample), and at least `min_groups` groups where there are that many clusters, so every CPU has work.

    A cluster larger than the budget is a group alone; its task then works from a memory-mapped file in blocks.
    Guests (probes > 1) can add up to probes - 1 copies of a row, so the memory budget counts them at worst.
    """
    est = sample_counts / max(1, sample_counts.sum()) * n_rows
    target = max(1.0, min(memory_bytes / (4 * dim * probes), math.ceil(n_rows / max(1, min_groups))))
    groups, current, size = [], [], 0.0
    for c in range(len(sample_counts)):
        if current and size + est[c] > target:
            groups.append(current)
            current, size = [], 0.0
        current.append(c)
        size += est[c]
    groups.append(current)
    return groups


def write_bucket(table: pa.Table, path: Path) -> None:
    """A bucket file: Arrow IPC, uncompressed (an internal file, written once and read once memory-mapped; Parquet's
    encoding and compression cost more than the rest of the assign pass)."""
    with storage.atomic_path(path) as tmp:
        pa.feather.write_feather(table, str(tmp), compression="uncompressed")


def read_bucket(path: Path) -> pa.Table:
    """A bucket file, memory-mapped (its columns are read when touched)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def guest_margin(eps: float) -> float:
    """The angle (radians) by which a probed centroid may be farther from a row than its own centroid for the row
    to have a neighbour above the threshold there: for x in cluster A and y in B with angle(x, y) <= t
    (t = arccos(1 - eps)), angle(x, c_B) <= angle(x, y) + angle(y, c_B) <= t + angle(y, c_A) <= 2t + angle(x, c_A).
    Rows farther than that from a cluster cannot have a pair in it, so they are not sent there."""
    return 2.0 * math.acos(max(-1.0, 1.0 - eps))


def bisector_reach(eps: float) -> float:
    """How far (in x . (c_A - c_B) / |c_A - c_B|) a row of cluster A may be from the bisecting hyperplane of A and
    B for a pair in B to exist: y in B has y . (c_A - c_B) <= 0, and (x - y) . n <= |x - y| = sqrt(2 eps) for unit
    rows above the threshold (n the unit normal). Tighter than `guest_margin` between well-separated clusters (the
    bound IVF indexes and Elkan's k-means prune with), and as safe: a row beyond it has no pair in B."""
    return math.sqrt(2.0 * eps)


def _assign_piece(index: int, piece: Piece, column: str, id_column: str, dim: int, centroids: np.ndarray,
                  group_of: np.ndarray, folder: str, probes: int = 1, margin: float = 0.0,
                  reach: float = math.inf) -> int:
    import torch

    ids, x = read_unit_piece(piece, column, id_column, dim)
    # Unit rows and centroids: the nearest centroid is the one of highest cosine similarity.
    sims = torch.from_numpy(x) @ torch.from_numpy(centroids).T
    top_sims, top = sims.topk(min(probes, len(centroids)), dim=1)
    top_sims, top = top_sims.numpy(), top.numpy()
    home, best = top[:, 0], top_sims[:, 0]
    # Row positions and the cluster each copy is compared in: its own, then its next-nearest clusters within the
    # margin (as guests: compared with that cluster's rows, their own fate decided in their home cluster).
    rows, clusters = [np.arange(len(ids))], [home]
    limit = np.cos(np.minimum(np.arccos(np.clip(best, -1, 1)) + margin, np.pi))
    for j in range(1, top.shape[1]):
        near = np.flatnonzero(top_sims[:, j] >= limit)
        gap = np.linalg.norm(centroids[home[near]] - centroids[top[near, j]], axis=1)
        near = near[best[near] - top_sims[near, j] <= reach * gap]
        rows.append(near)
        clusters.append(top[near, j])
    rows_all, clusters_all = np.concatenate(rows), np.concatenate(clusters)
    # A row that is a guest elsewhere can have partners its home walk does not see (see `greedy_dedup`).
    away = np.zeros(len(ids), dtype=bool)
    away[rows_all[len(ids):]] = True
    groups = group_of[clusters_all]
    root = Path(folder)
    for g in np.unique(groups):
        at = np.flatnonzero(groups == g)
        r = rows_all[at]
        (root / "buckets" / f"g{g:05d}").mkdir(parents=True, exist_ok=True)
        write_bucket(pa.table({"id": ids[r], "cluster": clusters_all[at].astype(np.int32),
                               "home": home[r].astype(np.int32), "centroid_sim": best[r].astype(np.float32),
                               "guest_elsewhere": away[r], "v": vector_array(x[r])}),
                     root / "buckets" / f"g{g:05d}" / f"p{index:06d}.arrow")
    # The record comes last: a piece without one is assigned again, rewriting the same file names.
    record = root / "assigned" / f"p{index:06d}.json"
    record.parent.mkdir(exist_ok=True)
    storage.write_text(record, json.dumps({"rows": len(ids), "guests": int(len(rows_all) - len(ids))}))
    return len(ids)


def assign_to_buckets(emb: Embeddings, centroids: np.ndarray, groups: list[list[int]], folder: Path, *,
                      probes: int = 1, margin: float = 0.0, reach: float = math.inf) -> dict[str, Any]:
    """Every row's nearest centroid, written with its unit vector into `folder/buckets/g<group>/p<piece>.arrow`
    by one Ray task per piece, and a guest copy for each of its next `probes - 1` nearest centroids within
    `margin` and `reach` of it (see `guest_margin`, `bisector_reach`); pieces recorded as done by an earlier,
    interrupted run are skipped."""
    import ray

    group_of = np.zeros(len(centroids), dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    done = {p.stem for p in (folder / "assigned").glob("p*.json")}
    task = ray.remote(num_cpus=1, max_retries=3)(_assign_piece)
    c_ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    refs = [task.remote(i, p, emb.column, emb.id_column, emb.dim, c_ref, group_of, str(folder), probes, margin,
                       reach)
            for i, p in enumerate(emb.pieces) if f"p{i:06d}" not in done]
    rows = sum(ray.get(refs))
    guests = sum(json.loads(p.read_text()).get("guests", 0) for p in (folder / "assigned").glob("p*.json"))
    return {"pieces": len(emb.pieces), "pieces_resumed": len(emb.pieces) - len(refs), "rows": rows,
            "guests": guests}
