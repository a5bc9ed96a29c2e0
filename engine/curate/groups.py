"""One Ray task per cluster group: each of its clusters deduplicated in turn, results recorded cluster by cluster."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.curate.partition import bucket_slices, read_vectors, scratch_rows
from engine.curate.similarity import greedy_dedup, keep_order

# Threads reading a group's slices of the bucket files (direct reads wait on the disk, not the CPU).
READERS = 4
# Results are flushed (and recorded as done) at least every this many rows, so a killed task redoes little.
FLUSH_ROWS = 50_000
# What a batch of clusters writes: rows kept and removed for sure, rows whose fate the global pass decides
# (`pending`), and the edges it decides them by.
RESULT_FILES = ("kept", "duplicates", "pending", "edges")


def finished_clusters(folder: Path) -> dict[int, dict[str, Any]]:
    """Cluster -> its record, for every batch of clusters whose result files and record were both written."""
    out = {}
    for path in (folder / "records").glob("*.json"):
        record = json.loads(path.read_text())
        if all((folder / "results" / record[f]).is_file() for f in RESULT_FILES):
            for c in record["clusters"]:
                out[c] = record
    return out


def _load_group(slices: list[tuple[Path, pa.Table, int, int]], dim: int, memory_bytes: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """(ids, clusters, home clusters, centroid similarities, guest-elsewhere flags, vectors) of a group's slices of
    the bucket files; the vectors in memory when they fit `memory_bytes`, else in a memory-mapped file that the
    blocked pass reads a block at a time (in memory: this process's `scratch("group")`, valid until its next group)."""
    n = sum(t.num_rows for _, t, _, _ in slices)
    spill = n * dim * 4 > memory_bytes
    if spill:
        handle = tempfile.NamedTemporaryFile(prefix="dce-dedup-", suffix=".f32", delete=False)
        handle.close()
        vectors: Any = np.memmap(handle.name, dtype=np.float32, mode="w+", shape=(max(n, 1), dim))
    else:
        vectors = scratch_rows("group", n, dim)
    ids, clusters, homes, sims, away = [], [], [], [], []
    at = np.cumsum([0] + [t.num_rows for _, t, _, _ in slices])

    def read(part: int) -> None:  # every READERS-th slice, into this thread's own read buffer
        for i in range(part, len(slices), READERS):
            f, _, r0, r1 = slices[i]
            vectors[at[i]:at[i + 1]] = read_vectors(f, r0, r1, dim, buffer=f"read{part}")

    with ThreadPoolExecutor(READERS) as pool:  # reads and copies release the GIL: the disk's queue kept full
        list(pool.map(read, range(READERS)))
    for _, t, _, _ in slices:
        ids.append(t.column("id").to_numpy())
        clusters.append(t.column("cluster").to_numpy())
        homes.append(t.column("home").to_numpy())
        sims.append(t.column("centroid_sim").to_numpy())
        away.append(t.column("guest_elsewhere").to_numpy(zero_copy_only=False))
    if spill:
        vectors.flush()
    return (np.concatenate(ids), np.concatenate(clusters), np.concatenate(homes), np.concatenate(sims),
            np.concatenate(away).astype(bool), vectors)


def _flush(folder: Path, batch: list[tuple[int, Any]], n_eps: int) -> None:
    clusters = [c for c, _ in batch]
    name = hashlib.blake2b(json.dumps(clusters).encode(), digest_size=8).hexdigest()
    tables = {what: pa.concat_tables([t[what] for _, t in batch]) for what in RESULT_FILES}
    for what, table in tables.items():
        with storage.atomic_path(folder / "results" / f"{what}-{name}.parquet") as tmp:
            pq.write_table(table, tmp)
    record = {"clusters": clusters, **{what: f"{what}-{name}.parquet" for what in RESULT_FILES},
              "kept_rows": tables["kept"].num_rows, "duplicate_rows": tables["duplicates"].num_rows,
              "pending_rows": tables["pending"].num_rows, "edge_rows": tables["edges"].num_rows,
              "removed_per_eps": [sum(t["removed_per_eps"][e] for _, t in batch) for e in range(n_eps)]}
    storage.write_text(folder / "records" / f"{name}.json", json.dumps(record))  # last: the batch is done with it


def walk_cluster(cluster: int, ids: np.ndarray, homes: np.ndarray, centroid_sims: np.ndarray, away: np.ndarray,
                 rows: Callable[[int, int], np.ndarray], eps: list[float], main: int, block: int,
                 ) -> dict[str, Any]:
    """One cluster's walk over its members and guests (`ids`, their home clusters, ..., in keep order; `away`: the
    row is a guest elsewhere): the tables of `RESULT_FILES` and the removed count per eps."""
    member = homes == cluster
    result = greedy_dedup(len(ids), rows, eps, main=main, block=block, counted=member, volatile=~member | away)
    mine = member[result.removed]
    removed, duplicate_of = result.removed[mine], result.duplicate_of[mine]
    decided = np.ones(len(ids), dtype=bool)
    decided[result.removed] = False
    decided[result.pending] = False
    pending = result.pending[member[result.pending]]
    later, earlier, sim = result.edges
    # A member's edges matter only while it is pending; a guest's, as its home may have left it pending.
    need = ~member[later] | np.isin(later, result.pending)
    later, earlier, sim = later[need], earlier[need], sim[need]
    return {
        "kept": pa.table({"id": pa.array(ids[member & decided], pa.int64())}),
        "duplicates": pa.table({"id": pa.array(ids[removed], pa.int64()),
                                "duplicate_of": pa.array(ids[duplicate_of], pa.int64()),
                                "similarity": pa.array(result.similarity[mine], pa.float32()),
                                "cluster": pa.array(np.full(len(removed), cluster, np.int32))}),
        "pending": pa.table({"id": pa.array(ids[pending], pa.int64()),
                             "centroid_sim": pa.array(centroid_sims[pending], pa.float32()),
                             "cluster": pa.array(np.full(len(pending), cluster, np.int32))}),
        "edges": pa.table({"id": pa.array(ids[later], pa.int64()), "earlier": pa.array(ids[earlier], pa.int64()),
                           "similarity": pa.array(sim, pa.float32())}),
        "removed_per_eps": result.removed_per_eps}


def process_group(group: int, clusters: list[int], ranges: list[tuple[str, int, int]], centroids: np.ndarray,
                  folder: str, dim: int, eps: list[float], main: int, keep: str, seed: int, block: int,
                  memory_bytes: int, flush_rows: int = FLUSH_ROWS) -> dict[str, Any]:
    """Deduplicate every unfinished cluster of one group at `eps[main]` (counting the removals of every eps of
    `eps`); returns how many clusters it did and skipped. `ranges`: the group's rows in each bucket file
    (`piece_ranges`)."""
    root = Path(folder)
    (root / "results").mkdir(exist_ok=True)
    (root / "records").mkdir(exist_ok=True)
    done = finished_clusters(root)
    todo = [c for c in clusters if c not in done]
    if not todo:
        return {"group": group, "clusters": 0, "skipped": len(clusters), "rows": 0, "pairs": 0, "member_pairs": 0,
                "seconds": {}}
    t0 = time.perf_counter()
    ids, labels, homes, csims, away, vectors = _load_group(bucket_slices(root, ranges), dim, memory_bytes)
    seconds = {"load": time.perf_counter() - t0, "walk": 0.0, "flush": 0.0}
    try:
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
        batch, batch_rows, rows, pairs, member_pairs = [], 0, 0, 0, 0
        for c in todo:
            members = order[bounds[c]:bounds[c + 1]]
            # Sorted for memory-mapped reads; the keep order is applied on top.
            members = np.sort(members)
            walk = members[keep_order(ids[members], None, None, keep, seed, c, centroid_sims=csims[members])]
            # Guests (rows of other clusters met here through probes) take part in the walk, and only members'
            # fates are written. A guest, or a member that is a guest elsewhere, may have partners this walk does
            # not see: its fate, and that of rows it decides, is left to the global pass (`resolve_pending`).
            if isinstance(vectors, np.memmap):  # sorted reads of the file, the keep order applied on top
                def walk_rows(i, j, w=walk):
                    return vectors[np.sort(w[i:j])][np.argsort(np.argsort(w[i:j]))]
            else:  # in memory: the cluster's rows gathered once, in walk order
                def walk_rows(i, j, xw=vectors[walk]):
                    return xw[i:j]
            t0 = time.perf_counter()
            batch.append((c, walk_cluster(c, ids[walk], homes[walk], csims[walk], away[walk], walk_rows, eps,
                                          main, block)))
            seconds["walk"] += time.perf_counter() - t0
            batch_rows += len(walk)
            m = int((homes[walk] == c).sum())
            rows += m
            pairs += len(walk) * (len(walk) - 1) // 2  # compared, guests included
            member_pairs += m * (m - 1) // 2  # what one exact within-cluster pass compares
            if batch_rows >= flush_rows:
                t0 = time.perf_counter()
                _flush(root, batch, len(eps))
                seconds["flush"] += time.perf_counter() - t0
                batch, batch_rows = [], 0
        if batch:
            t0 = time.perf_counter()
            _flush(root, batch, len(eps))
            seconds["flush"] += time.perf_counter() - t0
    finally:
        if isinstance(vectors, np.memmap):
            name = vectors.filename
            del vectors
            os.unlink(name)
    # seconds: the task's own time by step (CPU seconds of one slot), summed over tasks in the run's summary
    return {"group": group, "clusters": len(todo), "skipped": len(clusters) - len(todo), "rows": rows,
            "pairs": pairs, "member_pairs": member_pairs, "seconds": seconds}
