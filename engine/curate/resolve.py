"""The global pass of dedup: SemDeDup's greedy rule over the rows whose fate their cluster's walk left pending."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.curate.similarity import keep_order


def _read(files: list[Path], columns: list[str]) -> dict[str, np.ndarray]:
    tables = [pq.read_table(f, columns=columns) for f in files]
    table = pa.concat_tables(tables) if tables else None
    return {c: (table.column(c).to_numpy() if table is not None else np.zeros(0)) for c in columns}


def resolve_pending(kept_files: list[Path], pending_files: list[Path], edge_files: list[Path], keep: str,
                    seed: int, folder: Path) -> tuple[int, int, list[Path]]:
    """Decide every pending row in the global keep order: removed when an edge joins it to an earlier kept row
    (kept for sure in its cluster, or pending and kept here), its `duplicate_of` the most similar such row.

    The walks found every edge (each is found in a walk holding both rows); a pending row's edges to earlier rows
    removed for sure were left out (they cannot remove it). Writes `folder/kept-pending.parquet` and
    `folder/duplicates-pending.parquet`; returns (rows kept, rows removed, the files). Holds the ids of kept rows
    (8 bytes each), the pending rows and their edges (20 bytes an edge)."""
    pend = _read(pending_files, ["id", "centroid_sim", "cluster"])
    n = len(pend["id"])
    if not n:
        return 0, 0, []
    # rank = position in the global keep order, the order every walk used
    order = keep_order(pend["id"].astype(np.int64), None, None, keep, seed, 0, centroid_sims=pend["centroid_sim"])
    pid, pcluster = pend["id"].astype(np.int64)[order], pend["cluster"][order]
    sorter = np.argsort(pid)
    sorted_ids = pid[sorter]

    def rank_of(x: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(sorted_ids, x), n - 1)
        return np.where(sorted_ids[at] == x, sorter[at], -1)

    edges = _read(edge_files, ["id", "earlier", "similarity"])
    later_rank = rank_of(edges["id"])
    on = later_rank >= 0  # edges of guests whose home decided them for sure are not needed
    later_rank = later_rank[on]
    earlier, sim = edges["earlier"][on].astype(np.int64), edges["similarity"][on]
    del edges
    kept_ids = np.sort(_read(kept_files, ["id"])["id"].astype(np.int64))
    to_sure = np.isin(earlier, kept_ids)
    earlier_rank = rank_of(earlier)
    removed = np.zeros(n, dtype=bool)
    removed[later_rank[to_sure]] = True
    open_edge = earlier_rank >= 0
    lr, er = later_rank[open_edge], earlier_rank[open_edge]
    if (er >= lr).any():
        raise RuntimeError("dedup: an edge joins a pending row to a later one; the walks' keep orders differ")
    by_later = np.argsort(lr, kind="stable")
    lr, er = lr[by_later], er[by_later]
    starts = np.searchsorted(lr, np.arange(n + 1))
    # In rank order, so every earlier row's fate is final when a row is decided.
    for r in np.unique(lr):
        if not removed[r] and (~removed[er[starts[r]:starts[r + 1]]]).any():
            removed[r] = True
    partner_kept = to_sure | (open_edge & ~removed[np.maximum(earlier_rank, 0)])
    pick = np.flatnonzero(removed[later_rank] & partner_kept)
    # the most similar kept partner of each removed row (ties: the smaller id)
    pick = pick[np.lexsort((earlier[pick], -sim[pick], later_rank[pick]))]
    first = pick[np.r_[True, later_rank[pick][1:] != later_rank[pick][:-1]]] if len(pick) else pick
    gone = later_rank[first]
    if len(gone) != int(removed.sum()):
        raise RuntimeError("dedup: a row removed in the global pass has no kept partner")
    folder.mkdir(exist_ok=True)
    kept_file, dup_file = folder / "kept-pending.parquet", folder / "duplicates-pending.parquet"
    with storage.atomic_path(kept_file) as tmp:
        pq.write_table(pa.table({"id": pa.array(pid[~removed], pa.int64())}), tmp)
    with storage.atomic_path(dup_file) as tmp:
        pq.write_table(pa.table({"id": pa.array(pid[gone], pa.int64()),
                                 "duplicate_of": pa.array(earlier[first], pa.int64()),
                                 "similarity": pa.array(sim[first], pa.float32()),
                                 "cluster": pa.array(pcluster[gone], pa.int32())}), tmp)
    return int((~removed).sum()), int(removed.sum()), [kept_file, dup_file]
