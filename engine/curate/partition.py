"""Spherical k-means on a sample, then every row (and its guest copies) written, sorted by cluster, into the bucket
of its row group by Ray tasks; cluster groups planned from the counts."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.feather  # noqa: F401  (pa.feather)

from engine import storage
from engine.curate.source import Embeddings, Piece, read_unit_piece

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


def _fit(k: int, seed: int, max_iter: int, threads: int, *parts: np.ndarray) -> np.ndarray:
    from engine.cluster import KMeans

    x = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    with use_threads(threads):
        model = KMeans(k, spherical=True, seed=seed, max_iter=max_iter).fit(x)
    return model.cluster_centers_.astype(np.float32)


def fit_centroids(sample_refs: list, k: int, seed: int, max_iter: int = 25, rows: int = 0) -> np.ndarray:
    """Unit centroids (k, d): `KMeans(spherical=True)` in one Ray task, so the sample goes from the reading tasks to
    it without passing through the driver. Nothing else runs meanwhile, so a large fit (`rows` in the sample) takes
    every CPU of the largest node (threads for its GEMMs)."""
    import ray

    cpus = fit_cpus(rows, k)
    task = ray.remote(num_cpus=cpus, max_retries=3)(_fit)
    return ray.get(task.remote(k, seed, max_iter, cpus, *sample_refs))


def plan_groups(counts: np.ndarray, dim: int, *, memory_bytes: int, cpus: int) -> list[list[int]]:
    """Clusters packed, in index order, into groups of at most `memory_bytes` of vectors (`counts`: the rows each
    cluster's walk holds, guests included, as assigned): a multiple of `cpus` groups (at least 2 per CPU where there
    are that many clusters) of about equal rows, so the CPUs finish together. Each group is a contiguous range of
    clusters, so its rows are one contiguous slice of every bucket file.

    A cluster larger than the budget is a group alone; its task then works from a memory-mapped file in blocks.
    """
    cap = max(1.0, memory_bytes / (4 * dim))
    small = counts <= cap
    total = float(counts[small].sum())
    n_groups = -(-max(2 * cpus, math.ceil(total / cap)) // cpus) * cpus
    # Each cluster's place by the middle of its rows among the clusters that fit: n_groups ranges of equal rows
    middle = np.cumsum(np.where(small, counts, 0)) - np.where(small, counts, 0) / 2
    share = np.minimum(n_groups - 1, (middle / max(1.0, total / n_groups)).astype(np.int64))
    groups, current, size = [], [], 0.0
    for c in range(len(counts)):
        if current and (not small[c] or not small[current[-1]] or share[c] != share[current[-1]]
                        or size + counts[c] > cap):
            groups.append(current)
            current, size = [], 0.0
        current.append(c)
        size += counts[c]
    groups.append(current)
    return groups


# Direct I/O moves whole blocks between the disk and page-aligned memory: offsets and lengths in these units.
ALIGN = 4096


# Memory reused by every task a worker process runs (by name): fresh pages cost ~0.75 ms a MB of kernel time here
# (faulted in and zeroed), and the assign pass allocated ~300 MB a piece, a third of its CPU time.
_SCRATCH: dict[str, mmap.mmap] = {}


def scratch(name: str, nbytes: int) -> mmap.mmap:
    """Page-aligned memory of at least `nbytes` (whole `ALIGN` blocks), kept by this process for the next task that
    asks for `name`: what a caller had in it is overwritten then."""
    size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    buf = _SCRATCH.get(name)
    if buf is None or len(buf) < size:
        buf = _SCRATCH[name] = mmap.mmap(-1, size)  # an old one is freed with the last array on it
    return buf


def scratch_rows(name: str, rows: int, dim: int) -> np.ndarray:
    """A (rows, dim) float32 array at the start of `scratch(name, ...)`."""
    return np.frombuffer(scratch(name, rows * dim * 4), dtype=np.float32, count=rows * dim).reshape(rows, dim)


def _open_direct(path: Path, flags: int) -> int:
    """A file descriptor opened with O_DIRECT where the platform and file system allow it, else a plain one."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct)
        except OSError as e:
            if e.errno != errno.EINVAL:  # some file systems refuse O_DIRECT: buffered then
                raise
    return os.open(path, flags)


def write_vectors(x: np.ndarray, path: Path) -> None:
    """`x`, rows at the start of a `scratch` buffer, as raw float32 rows padded to whole blocks, bypassing the page
    cache where the file system allows: buffered writes of the 10 GB of buckets of a 10M-row run cost ~7 s of
    kernel CPU a GB here (page cache and writeback), direct ones ~0.03 s."""
    buf = x
    while buf is not None and not isinstance(buf, mmap.mmap):
        buf = buf.obj if isinstance(buf, memoryview) else getattr(buf, "base", None)
    if buf is None or x.ctypes.data != np.frombuffer(buf, np.uint8, count=1).ctypes.data:
        raise TypeError("write_vectors writes rows at the start of a `scratch` buffer (page-aligned memory)")
    view = memoryview(buf)[:max(ALIGN, -(-x.nbytes // ALIGN) * ALIGN)]
    with storage.atomic_path(path) as tmp:
        fd = _open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        finally:
            os.close(fd)


def read_vectors(path: Path, row0: int, row1: int, dim: int, buffer: str = "read") -> np.ndarray:
    """Rows row0..row1-1 of a `write_vectors` file, read directly (whole blocks around them, into aligned memory)
    where the file system allows, else buffered. The rows are in this process's `scratch(buffer)`: valid until its
    next use."""
    start, stop = row0 * dim * 4, row1 * dim * 4
    first = start // ALIGN * ALIGN
    whole = max(ALIGN, -(-(stop - first) // ALIGN) * ALIGN)  # the blocks holding the rows, no more
    buf = scratch(buffer, whole)
    fd = _open_direct(path, os.O_RDONLY)
    try:
        got = 0
        while got < stop - first:
            n = os.preadv(fd, [memoryview(buf)[got:whole]], first + got)
            if n <= 0:
                raise OSError(f"{path}: {stop - first - got} bytes short of rows {row0}..{row1 - 1}")
            got += n
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.float32, count=(stop - start) // 4, offset=start - first).reshape(-1, dim)


def write_bucket(table: pa.Table, path: Path) -> None:
    """A bucket's rows other than their vectors: Arrow IPC, uncompressed (an internal file, written once and read
    once memory-mapped; Parquet's encoding and compression cost more than the rest of the assign pass)."""
    with storage.atomic_path(path) as tmp:
        pa.feather.write_feather(table, str(tmp), compression="uncompressed")


def read_bucket(path: Path) -> pa.Table:
    """A bucket file, memory-mapped (its columns are read when touched)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def piece_ranges(folder: Path, groups: list[list[int]]) -> list[list[tuple[str, int, int]]]:
    """For each group of `plan_groups`, the rows of its clusters in every piece's bucket (rows sorted by cluster,
    `_assign_piece`): (piece, first row, stop row), one contiguous range a piece, empty ones left out."""
    bounds = [g[0] for g in groups] + [groups[-1][-1] + 1]
    out: list[list[tuple[str, int, int]]] = [[] for _ in groups]
    for counts in sorted((folder / "assigned").glob("p*.npy")):
        at = np.concatenate([[0], np.cumsum(np.load(counts))])[bounds]
        for g in np.flatnonzero(at[1:] > at[:-1]):
            out[g].append((counts.stem, int(at[g]), int(at[g + 1])))
    return out


def bucket_slices(folder: Path, ranges: list[tuple[str, int, int]]) -> list[tuple[Path, pa.Table, int, int]]:
    """(vector file, its other columns memory-mapped and sliced, first row, stop row) of each range of
    `piece_ranges` (see `read_vectors`)."""
    root = folder / "buckets"
    return [(root / f"{piece}.f32", read_bucket(root / f"{piece}.arrow").slice(r0, r1 - r0), r0, r1)
            for piece, r0, r1 in ranges]


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


# Rows whose centroid similarities are computed at once in the assign pass (its memory: CHUNK x k floats).
CHUNK = 4096


def _assign_piece(index: int, piece: Piece, column: str, id_column: str, dim: int, centroids: np.ndarray,
                  folder: str, probes: int = 1, margin: float = 0.0, reach: float = math.inf) -> int:
    import torch

    ids, x = read_unit_piece(piece, column, id_column, dim, out=lambda n: scratch_rows("unit", n, dim))
    # Unit rows and centroids: the nearest centroid is the one of highest cosine similarity. In chunks of rows,
    # into reused memory (see `scratch`).
    p, c = min(probes, len(centroids)), torch.from_numpy(np.array(centroids)).T  # a writable copy (small)
    top_sims, top = np.empty((len(x), p), np.float32), np.empty((len(x), p), np.int64)
    sims = torch.from_numpy(scratch_rows("sims", CHUNK, len(centroids)))
    for i in range(0, len(x), CHUNK):
        j = min(len(x), i + CHUNK)
        s = torch.matmul(torch.from_numpy(x[i:j]), c, out=sims[:j - i]).topk(p, dim=1)
        top_sims[i:j], top[i:j] = s.values.numpy(), s.indices.numpy()
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
    # One file a piece, its copies sorted by cluster: a group of clusters reads one slice of it (`bucket_slices`).
    order = np.argsort(clusters_all, kind="stable")
    r, cl = rows_all[order], clusters_all[order]
    root = Path(folder)
    v = scratch_rows("bucket", len(r), dim)
    np.take(x, r, axis=0, out=v)
    write_vectors(v, root / "buckets" / f"p{index:06d}.f32")
    write_bucket(pa.table({"id": ids[r], "cluster": cl.astype(np.int32), "home": home[r].astype(np.int32),
                           "centroid_sim": best[r].astype(np.float32), "guest_elsewhere": away[r]}),
                 root / "buckets" / f"p{index:06d}.arrow")
    storage.write_npy(root / "assigned" / f"p{index:06d}.npy", np.bincount(cl, minlength=len(centroids)))
    # The record comes last: a piece without one is assigned again, rewriting the same file names.
    storage.write_text(root / "assigned" / f"p{index:06d}.json",
                       json.dumps({"rows": len(ids), "guests": int(len(rows_all) - len(ids))}))
    return len(ids)


def assign_to_buckets(emb: Embeddings, centroids: np.ndarray, folder: Path, *, probes: int = 1,
                      margin: float = 0.0, reach: float = math.inf, strategy: Any = None) -> dict[str, Any]:
    """Every row's nearest centroid, written with its unit vector into `folder/buckets/p<piece>.f32` (raw rows)
    and `.arrow` (id, cluster, ...), sorted by cluster (the rows of each cluster counted in
    `folder/assigned/p<piece>.npy`), by one Ray task per piece; and a guest copy for each of its next `probes - 1`
    nearest centroids within `margin` and `reach` of it (see `guest_margin`, `bisector_reach`); `strategy`: the
    tasks' Ray scheduling strategy (`nodes.place_tasks`). Pieces recorded as
    done by an earlier, interrupted run are skipped. Returns the counts, among others: the rows of each cluster,
    guests included."""
    import ray

    (folder / "buckets").mkdir(parents=True, exist_ok=True)
    (folder / "assigned").mkdir(exist_ok=True)
    done = {p.stem for p in (folder / "assigned").glob("p*.json")}
    task = ray.remote(num_cpus=1, max_retries=3)(_assign_piece).options(scheduling_strategy=strategy)
    c_ref = ray.put(np.ascontiguousarray(centroids, dtype=np.float32))
    refs = [task.remote(i, p, emb.column, emb.id_column, emb.dim, c_ref, str(folder), probes, margin, reach)
            for i, p in enumerate(emb.pieces) if f"p{i:06d}" not in done]
    rows = sum(ray.get(refs))
    records = sorted((folder / "assigned").glob("p*.json"))
    guests = sum(json.loads(p.read_text()).get("guests", 0) for p in records)
    counts = sum(np.load(p.with_suffix(".npy")) for p in records)
    return {"pieces": len(emb.pieces), "pieces_resumed": len(emb.pieces) - len(refs), "rows": rows,
            "guests": guests, "counts": counts}
