"""The global pass of dedup: SemDeDup's greedy rule over the rows whose fate their cluster's walk left pending."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.curate.similarity import keep_order

# An edge as the global pass holds it: the later row's rank, the earlier row's id and rank (-1: kept for sure in
# its walk), their similarity.
EDGE = np.dtype([("later", "<i8"), ("earlier", "<i8"), ("erank", "<i8"), ("sim", "<f4")])
# Edges of one rank range held at once; the rest wait in files (the edges of dense data can far outnumber rows).
DEFAULT_EDGE_BYTES = 128 << 20
READ_ROWS = 1 << 20
MAX_RANGES = 512  # open spill files at once


def _read(files: list[Path], columns: list[str]) -> dict[str, np.ndarray]:
    tables = [pq.read_table(f, columns=columns) for f in files]
    table = pa.concat_tables(tables) if tables else None
    return {c: (table.column(c).to_numpy() if table is not None else np.zeros(0)) for c in columns}


def _find(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Position of each x in `sorted_values` (clipped; check equality): the queries are sorted first, as random
    probes into a large array miss the cache ~10x more than a merge-like sweep."""
    order = np.argsort(x, kind="stable")
    at = np.empty(len(x), dtype=np.int64)
    at[order] = np.searchsorted(sorted_values, x[order])
    return np.minimum(at, len(sorted_values) - 1)


def _in_sorted(x: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    if not len(sorted_values):
        return np.zeros(len(x), dtype=bool)
    return sorted_values[_find(sorted_values, x)] == x


def resolve_pending(kept_files: list[Path], pending_files: list[Path], edge_files: list[Path], keep: str,
                    seed: int, folder: Path, edge_bytes: int = DEFAULT_EDGE_BYTES) -> tuple[int, int, list[Path]]:
    """Decide every pending row in the global keep order: removed when an edge joins it to an earlier kept row
    (kept for sure in its cluster, or pending and kept here), its `duplicate_of` the most similar such row.

    The walks found every edge (each is found in a walk holding both rows); a pending row's edges to earlier rows
    removed for sure were left out (they cannot remove it). Out of core: the edges are read in batches and spilled
    to files by rank range, then each range is decided in rank order, about `edge_bytes` of edges in memory at a
    time. Writes `folder/kept-pending.parquet` and `folder/duplicates-pending.parquet`; returns (rows kept, rows
    removed, the files). Holds the ids of the rows kept for sure (8 bytes each) and ~30 bytes a pending row."""
    pend = _read(pending_files, ["id", "centroid_sim", "cluster"])
    n = len(pend["id"])
    if not n:
        return 0, 0, []
    # rank = position in the global keep order, the order every walk used
    order = keep_order(pend["id"].astype(np.int64), None, None, keep, seed, 0, centroid_sims=pend["centroid_sim"])
    pid, pcluster = pend["id"].astype(np.int64)[order], pend["cluster"].astype(np.int32)[order]
    del pend, order
    sorter = np.argsort(pid)
    sorted_ids = pid[sorter]

    def rank_of(x: np.ndarray) -> np.ndarray:
        at = _find(sorted_ids, x)
        return np.where(sorted_ids[at] == x, sorter[at], -1)

    kept_ids = np.sort(_read(kept_files, ["id"])["id"].astype(np.int64))
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in edge_files)
    ranges = min(MAX_RANGES, max(1, math.ceil(total * EDGE.itemsize / edge_bytes)))
    folder.mkdir(exist_ok=True)
    spill = [folder / f"edges-{r:05d}.bin" for r in range(ranges)]
    handles = [open(p, "wb") for p in spill]  # noqa: SIM115 (closed below, all together)
    try:
        for f in edge_files:
            for batch in pq.ParquetFile(f).iter_batches(READ_ROWS, columns=["id", "earlier", "similarity"]):
                later = rank_of(batch.column("id").to_numpy().astype(np.int64))
                on = later >= 0  # edges of guests whose home decided them for sure are not needed
                earlier = batch.column("earlier").to_numpy().astype(np.int64)[on]
                e = np.empty(int(on.sum()), EDGE)
                e["later"], e["earlier"], e["erank"] = later[on], earlier, rank_of(earlier)
                e["sim"] = batch.column("similarity").to_numpy()[on]
                # an earlier row neither pending nor kept for sure was removed for sure: it removes nothing
                e = e[(e["erank"] >= 0) | _in_sorted(e["earlier"], kept_ids)]
                if (e["erank"] >= e["later"]).any():
                    raise RuntimeError("dedup: an edge joins a pending row to a later one; the walks' keep orders "
                                       "differ")
                r = e["later"] * ranges // n
                for b in np.unique(r):
                    handles[b].write(e[r == b].tobytes())
    finally:
        for h in handles:
            h.close()
    del kept_ids

    removed = np.zeros(n, dtype=bool)
    dup_file = folder / "duplicates-pending.parquet"
    schema = pa.schema([("id", pa.int64()), ("duplicate_of", pa.int64()), ("similarity", pa.float32()),
                        ("cluster", pa.int32())])
    n_removed = 0
    with storage.atomic_path(dup_file) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for path in spill:
            e = np.fromfile(path, dtype=EDGE)
            path.unlink()
            n_removed += _decide_range(e, removed, pid, pcluster, writer)
    if n_removed != int(removed.sum()):
        raise RuntimeError("dedup: a row removed in the global pass has no kept partner")
    kept_file = folder / "kept-pending.parquet"
    with storage.atomic_path(kept_file) as tmp:
        pq.write_table(pa.table({"id": pa.array(pid[~removed], pa.int64())}), tmp)
    return int((~removed).sum()), n_removed, [kept_file, dup_file]


def _decide_range(e: np.ndarray, removed: np.ndarray, pid: np.ndarray, pcluster: np.ndarray,
                  writer: pq.ParquetWriter) -> int:
    """Decide the rows of one rank range from its edges (every earlier range decided already: `removed` is final
    below it), in rank order; writes the removed rows with their most similar kept partner; returns how many."""
    if not len(e):
        return 0
    e = e[np.argsort(e["later"], kind="stable")]
    lr, er = e["later"], e["erank"]
    open_edge = er >= 0
    # Edges to rows kept for sure, or to open rows of earlier ranges, decide at once; only edges inside the range
    # need the walk in rank order.
    lo = int(lr[0])
    hit = ~open_edge | (open_edge & (er < lo) & ~removed[np.maximum(er, 0)])
    removed[np.unique(lr[hit])] = True
    inner = np.flatnonzero(open_edge & (er >= lo))
    if len(inner):
        il, ie = lr[inner], er[inner]
        starts = np.searchsorted(il, np.arange(lo, int(lr[-1]) + 2))
        todo = np.unique(il)
        for r in todo[~removed[todo]]:  # rows removed above need no visit; the others in rank order
            s = starts[r - lo]
            if (~removed[ie[s:starts[r - lo + 1]]]).any():
                removed[r] = True
    partner_kept = ~open_edge | ~removed[np.maximum(er, 0)]
    pick = np.flatnonzero(removed[lr] & partner_kept)
    # the most similar kept partner of each removed row (ties: the smaller id)
    pick = pick[np.lexsort((e["earlier"][pick], -e["sim"][pick], lr[pick]))]
    first = pick[np.r_[True, lr[pick][1:] != lr[pick][:-1]]] if len(pick) else pick
    gone = lr[first]
    if len(gone):
        writer.write_table(pa.table({"id": pa.array(pid[gone], pa.int64()),
                                     "duplicate_of": pa.array(e["earlier"][first], pa.int64()),
                                     "similarity": pa.array(e["sim"][first], pa.float32()),
                                     "cluster": pa.array(pcluster[gone], pa.int32())}))
    return len(gone)
