"""Spherical k-means on a sample, then every row written into the bucket of its cluster group, by Ray tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.curate.source import Embeddings, Piece, read_unit_piece
from engine.data.schema import vector_array

# faiss's own cap on the rows k-means trains on (max_points_per_centroid = 256): more adds time, not quality.
ROWS_PER_CENTROID = 256


def default_sample_size(k: int, n_rows: int) -> int:
    return min(n_rows, ROWS_PER_CENTROID * k)


def _fit(k: int, seed: int, max_iter: int, *parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from engine.cluster import KMeans

    x = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    model = KMeans(k, spherical=True, seed=seed, max_iter=max_iter).fit(x)
    return model.cluster_centers_.astype(np.float32), np.bincount(model.labels_, minlength=k)


def fit_centroids(sample_refs: list, k: int, seed: int, max_iter: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids (k, d), rows of the sample in each cluster): `KMeans(spherical=True)` in one Ray task, so
    the sample goes from the reading tasks to it without passing through the driver."""
    import ray

    return ray.get(ray.remote(num_cpus=1, max_retries=3)(_fit).remote(k, seed, max_iter, *sample_refs))


def plan_groups(sample_counts: np.ndarray, n_rows: int, dim: int, *, memory_bytes: int,
                min_groups: int) -> list[list[int]]:
    """Clusters packed, in index order, into groups of about `memory_bytes` of vectors (sizes estimated from the
    sample), and at least `min_groups` groups where there are that many clusters, so every CPU has work.

    A cluster larger than the budget is a group alone; its task then works from a memory-mapped file in blocks.
    """
    est = sample_counts / max(1, sample_counts.sum()) * n_rows
    target = max(1.0, min(memory_bytes / (4 * dim), math.ceil(n_rows / max(1, min_groups))))
    groups, current, size = [], [], 0.0
    for c in range(len(sample_counts)):
        if current and size + est[c] > target:
            groups.append(current)
            current, size = [], 0.0
        current.append(c)
        size += est[c]
    groups.append(current)
    return groups


def _write_atomic(table: pa.Table, path: Path) -> None:
    with storage.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _assign_piece(index: int, piece: Piece, column: str, id_column: str, dim: int, centroids: np.ndarray,
                  group_of: np.ndarray, folder: str) -> int:
    import torch

    ids, x = read_unit_piece(piece, column, id_column, dim)
    # Unit rows and centroids: the nearest centroid is the one of highest cosine similarity.
    sims = torch.from_numpy(x) @ torch.from_numpy(centroids).T
    best, labels = sims.max(dim=1)
    labels, best = labels.numpy(), best.numpy()
    groups = group_of[labels]
    root = Path(folder)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        (root / "buckets" / f"g{g:05d}").mkdir(parents=True, exist_ok=True)
        _write_atomic(pa.table({"id": ids[rows], "cluster": labels[rows].astype(np.int32),
                                "centroid_sim": best[rows].astype(np.float32), "v": vector_array(x[rows])}),
                      root / "buckets" / f"g{g:05d}" / f"p{index:06d}.parquet")
    # The record comes last: a piece without one is assigned again, rewriting the same file names.
    record = root / "assigned" / f"p{index:06d}.json"
    record.parent.mkdir(exist_ok=True)
    storage.write_text(record, json.dumps({"rows": len(ids)}))
    return len(ids)


def assign_to_buckets(emb: Embeddings, centroids: np.ndarray, groups: list[list[int]], folder: Path) -> dict[str, Any]:
    """Every row's nearest centroid, written with its unit vector into `folder/buckets/g<group>/p<piece>.parquet`
    by one Ray task per piece; pieces recorded as done by an earlier, interrupted run are skipped."""
    import ray

    group_of = np.zeros(len(centroids), dtype=np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    done = {p.stem for p in (folder / "assigned").glob("p*.json")}
    task = ray.remote(num_cpus=1, max_retries=3)(_assign_piece)
    c_ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    refs = [task.remote(i, p, emb.column, emb.id_column, emb.dim, c_ref, group_of, str(folder))
            for i, p in enumerate(emb.pieces) if f"p{i:06d}" not in done]
    rows = sum(ray.get(refs))
    return {"pieces": len(emb.pieces), "pieces_resumed": len(emb.pieces) - len(refs), "rows": rows}
