"""Semantic deduplication (SemDeDup, Abbas et al. 2023) of Parquet embeddings, out of core on Ray."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from engine import storage
from engine.curate.groups import FLUSH_ROWS, RESULT_FILES, finished_clusters, process_group
from engine.curate.nodes import FolderUnseen, place_tasks
from engine.curate.output import (
    check_result_output,
    check_state_dir,
    drop_state,
    state_folder,
    state_folder_exists,
    subfolder,
    write_json,
    write_result,
)
from engine.curate.partition import (
    ROWS_PER_CENTROID,
    assign_to_buckets,
    bisector_reach,
    default_sample_size,
    fit_centroids,
    guest_margin,
    piece_ranges,
    plan_groups,
)
from engine.curate.resolve import resolve_pending
from engine.curate.similarity import BLOCK, KEEP_MODES
from engine.curate.source import open_embeddings, validate
from engine.errors import ConfigError, DataError
from engine.runtime import cancel_running

STAGE = "dedup"
# Set in the task a run moved into (`_relocated`): it stays there.
_MOVED: ContextVar[bool] = ContextVar("dce_dedup_moved", default=False)
DEFAULT_SUMMARY_EPS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
# Vectors of one cluster group a task holds in memory; a larger group is memory-mapped and read in blocks.
DEFAULT_MEMORY_BYTES = 256 << 20
# At most this many clusters each row is compared in: its own and its next-nearest where the bounds allow a pair
# (`guest_margin`, `bisector_reach`). 5 is the smallest cap measured with pair recall >= 0.99 against the exact
# search on both MNIST pixels and a trained encoder's codes at k = 10, 50 and 200 (docs/curation.md; 3 gave 0.95
# on the codes at k = 200, 8 no more than 5 but up to 1.7x the guests).
DEFAULT_PROBES = 5


def check_settings(eps: float, k: int | None, keep: str, summary_eps: Sequence[float], block: int,
                   sample_size: int | None, probes: int = 1) -> None:
    """Every setting, named, before any file is read."""
    for name, value in (("--eps", eps), *((f"--summary-eps {e}", e) for e in summary_eps)):
        if not (isinstance(value, int | float) and 0 < value < 2):
            raise ConfigError(f"{name}={value} is outside (0, 2): eps is a cosine distance (1 - similarity); rows "
                              "closer than eps to a kept row are removed")
    if k is not None and k < 1:
        raise ConfigError(f"--k={k} should be >= 1")
    if keep not in KEEP_MODES:
        raise ConfigError(f"--keep={keep!r} should be one of {', '.join(KEEP_MODES)}")
    if not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"--probes={probes} should be an integer >= 1 (1: within-cluster only)")
    if block < 1:
        raise ConfigError(f"block={block} should be >= 1")
    if sample_size is not None and sample_size < 1:
        raise ConfigError(f"sample_size={sample_size} should be >= 1")


def default_k(n_rows: int, max_iter: int = 25) -> int:
    """The k that makes k-means and the within-cluster pass cost least together: k-means on the sample of
    `ROWS_PER_CENTROID` rows a centroid costs ~2 * 256 k * k * d * max_iter flop, one exact within-cluster pass
    ~n^2 d / k, so the sum is least at k^3 = n^2 / (1024 max_iter): 340 clusters for 1M rows, 1,575 for 10M. (The
    earlier rows / 1000 made k-means alone ~30 minutes at 10M rows here; larger clusters also split fewer pairs.)"""
    return max(1, min(n_rows, round((n_rows**2 / (4 * ROWS_PER_CENTROID * max_iter)) ** (1 / 3))))


def dedup(embeddings: str | os.PathLike[str], out: str | os.PathLike[str], *, eps: float = 0.05,
          k: int | None = None, keep: str = "hard", seed: int = 0, column: str = "z", id_column: str = "id",
          summary_eps: Sequence[float] = DEFAULT_SUMMARY_EPS, sample_size: int | None = None,
          probes: int = DEFAULT_PROBES,
          max_iter: int = 25, block: int = BLOCK, memory_bytes: int = DEFAULT_MEMORY_BYTES,
          flush_rows: int = FLUSH_ROWS, overwrite: bool = False, state_dir: str | os.PathLike[str] | None = None,
          on_progress: Callable[[str, dict[str, Any]], None] | None = None,
          ) -> dict[str, Any]:
    """Remove near-duplicates: spherical k-means, then within each cluster every row whose cosine similarity to an
    already kept row exceeds 1 - eps is removed, the keep order being SemDeDup's (hard: farthest from the
    centroid first, easy: closest first, random: seeded).

    With `probes` > 1 each row is also compared with the rows of its next `probes - 1` nearest clusters (those
    near enough to hold a pair, `guest_margin` and `bisector_reach`), so pairs split across a cluster boundary are
    found; the keep order is global (it depends on the row alone), and rows whose fate one cluster's walk cannot
    decide alone are decided by one global pass in that order (`resolve_pending`): the result is SemDeDup's greedy
    rule over every pair compared, and every removed row's `duplicate_of` is a kept row above the threshold.

    Writes `out/` (atomically, with manifests): `kept/` (id), `duplicates/` (id, duplicate_of, similarity,
    cluster), `summary.json` (rows removed for each of `summary_eps` and `eps`, from the same pass, and the time
    of each stage), `centroids.npy`. Every input id is in exactly one of kept/ and duplicates/.

    An interrupted or killed run keeps its finished stages and clusters in `.NAME.partial` beside `out` (or in
    `state_dir`, or the temp folder for an object-store `out`); running the same call again continues from them (a
    group task records its clusters every `flush_rows` rows). The tasks write and read that folder as local files:
    on a cluster where some node cannot see it or a local input (checked, `place_tasks`), they all run on one node
    that does, the driver's if it can; where none sees the driver's temp folder (an object-store `out`, no
    `state_dir`; a driver on a node without CPUs), this whole function runs from a task on a node that sees the
    input instead, its progress passed back. Ray must be running (the CLI starts it after its checks).
    """
    settings = {name: value for name, value in locals().items() if name != "on_progress"}  # for `_relocated`
    import ray
    summary_eps = sorted({*map(float, summary_eps), float(eps)})
    check_settings(eps, k, keep, summary_eps, block, sample_size, probes)
    source = str(embeddings)
    emb = open_embeddings(source, column=column, id_column=id_column)
    k = default_k(emb.n_rows, max_iter) if k is None else k
    if k > emb.n_rows:
        raise ConfigError(f"--k={k} should be <= the number of rows, {emb.n_rows}")
    sample_size = default_sample_size(k, emb.n_rows) if sample_size is None else min(sample_size, emb.n_rows)
    if sample_size < k:
        raise ConfigError(f"sample_size={sample_size} should be >= --k={k}")
    check_result_output(out, source, overwrite=overwrite)
    check_state_dir(state_dir, out, source)
    key = {"stage": STAGE, "input": emb.fingerprint(), "k": k, "seed": seed, "sample_size": sample_size,
           "max_iter": max_iter, "eps": summary_eps, "main_eps": float(eps), "keep": keep,
           "probes": probes, "format": 5}
    config_hash = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    notify = on_progress or (lambda stage, info: None)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    fresh = not state_folder_exists(out, state_dir)
    state = state_folder(out, key, state_dir)
    move_to = None
    try:
        # [0] which nodes see the state folder and the input; [1] every row checked before any work is kept
        place = place_tasks(state, emb.local_files())
        ids, sample_refs = validate(emb, sample_size, seed, place.strategy)
    except FolderUnseen as e:
        if fresh:
            drop_state(state)
        if _MOVED.get() or state_dir is not None or storage.is_local(out):
            raise
        # No node sees the driver's temp folder: the run moves to the node that sees the input with the most CPUs,
        # its state in that node's temp folder (a rerun moves to the same node, and resumes there).
        move_to = max(sorted(e.readers), key=e.readers.__getitem__)
    except BaseException:
        if fresh:  # refused, or bad input: nothing left behind
            drop_state(state)
        raise
    if move_to is not None:
        return _relocated(move_to, settings, on_progress)
    times["validate"] = time.perf_counter() - t0
    notify("validate", {"rows": emb.n_rows, "seconds": times["validate"],
                        **({"nodes_left_out": list(place.pinned)} if place.pinned else {})})

    t0 = time.perf_counter()
    plan_path = state / "plan.json"
    if plan_path.is_file():
        centroids = np.load(state / "centroids.npy")
        times["kmeans_resumed"] = True
    else:
        centroids = fit_centroids(sample_refs, k, seed, max_iter, sample_size)  # [2] one Ray task
        np.save(state / "centroids.npy", centroids)
        plan_path.write_text(json.dumps({"k": k}))  # last: k-means is done with it (groups are planned after [3])
    del sample_refs
    times["kmeans"] = time.perf_counter() - t0
    notify("kmeans", {"k": k, "seconds": times["kmeans"]})

    t0 = time.perf_counter()
    # [3] one Ray task per piece
    assigned = assign_to_buckets(emb, centroids, state, probes=probes, margin=guest_margin(eps),
                                 reach=bisector_reach(eps), strategy=place.strategy)
    counts = assigned.pop("counts")
    times["assign"] = time.perf_counter() - t0
    notify("assign", {**assigned, "seconds": times["assign"]})
    # From the rows each cluster really holds, guests included (a resumed run gets the same counts, so the same plan)
    groups_plan = plan_groups(counts, emb.dim, memory_bytes=memory_bytes, cpus=place.cpus)

    t0 = time.perf_counter()
    resumed = len(finished_clusters(state))
    groups = _run_groups(groups_plan, piece_ranges(state, groups_plan), centroids, state, emb.dim, summary_eps,
                         summary_eps.index(float(eps)), keep, seed, block, memory_bytes, flush_rows,
                         notify, place.strategy)  # [4] one Ray task per cluster group
    times["similarity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = {json.dumps(r["clusters"]): r for r in finished_clusters(state).values()}.values()
    kept_rows = sum(r["kept_rows"] for r in records)
    dup_rows = sum(r["duplicate_rows"] for r in records)
    results = state / "results"
    files = {what: [results / r[what] for r in records] for what in RESULT_FILES}
    # [5] the rows a walk could not decide alone, decided in the global keep order over every walk's edges
    p_kept, p_removed, p_files = resolve_pending(files["kept"], files["pending"], files["edges"], keep, seed,
                                                 state / "global")
    times["resolve"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept_files = files["kept"] + p_files[:1]
    dup_files = files["duplicates"] + p_files[1:]
    kept_rows, dup_rows = kept_rows + p_kept, dup_rows + p_removed
    _check_every_id_once(ids, kept_files + dup_files, source)
    main = summary_eps.index(float(eps))
    removed = [sum(r["removed_per_eps"][e] for r in records) for e in range(len(summary_eps))]
    removed[main] += p_removed
    summary = {
        "rows": emb.n_rows, "kept": kept_rows, "removed": dup_rows, "eps": float(eps), "k": k, "keep": keep,
        "seed": seed, "sample_size": sample_size, "groups": len(groups_plan), "probes": probes,
        "guests": assigned["guests"], "pending": p_kept + p_removed,
        "edges": sum(r["edge_rows"] for r in records),
        "nodes_left_out": list(place.pinned), "coordinator_node": ray.get_runtime_context().get_node_id(),
        "clusters_resumed": resumed,
        "pieces_resumed": assigned["pieces_resumed"],
        "summary": [{"eps": e, "removed": r, "fraction": r / emb.n_rows}
                    for e, r in zip(summary_eps, removed, strict=True)],
        "group_tasks": groups, "seconds": times,
    }
    if removed[main] != dup_rows:
        raise RuntimeError(f"summary count {removed[main]} differs from the duplicates written, {dup_rows}")

    def build(tmp: Path) -> list[str]:
        subfolder(tmp, "kept", kept_files, stage="dedup-kept", config_hash=config_hash, rows=kept_rows)
        subfolder(tmp, "duplicates", dup_files, stage="dedup-duplicates", config_hash=config_hash, rows=dup_rows,
                  eps=float(eps))
        np.save(tmp / "centroids.npy", centroids)
        times["write"] = time.perf_counter() - t0
        write_json(tmp / "summary.json", summary)
        return ["kept", "duplicates", "centroids.npy", "summary.json"]

    write_result(out, build, stage=STAGE, config_hash=config_hash, rows=emb.n_rows, eps=float(eps), k=k)
    drop_state(state)
    notify("write", {"kept": kept_rows, "removed": dup_rows, "seconds": times["write"]})
    return summary


def _relocated(node: str, settings: dict[str, Any],
               on_progress: Callable[[str, dict[str, Any]], None] | None) -> dict[str, Any]:
    """`dedup(**settings)` in a task on `node` (no CPU of its own: its tasks take them), its progress passed back
    through a queue; interrupted or failed, the task is stopped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine.train.trainer import progress_queue

    with progress_queue(None if on_progress is None else (lambda item: on_progress(*item))) as queue:
        task = ray.remote(num_cpus=0, max_retries=0)(_dedup_task)
        ref = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(settings, queue)
        try:
            return ray.get(ref)
        finally:
            cancel_running([ref])


def _dedup_task(settings: dict[str, Any], queue: Any) -> dict[str, Any]:
    notify = None if queue is None else (lambda stage, info: queue.put_nowait((stage, info)))
    moved = _MOVED.set(True)  # it does not move again
    try:
        return dedup(**settings, on_progress=notify)
    finally:
        _MOVED.reset(moved)


def _run_groups(groups: list[list[int]], ranges: list[list[tuple[str, int, int]]], centroids: np.ndarray,
                state: Path, dim: int, eps: list[float], main: int, keep: str, seed: int, block: int,
                memory_bytes: int, flush_rows: int, notify: Callable[[str, dict[str, Any]], None],
                strategy: Any = None) -> dict:
    import ray

    # Retries: a task whose worker dies starts again and skips the clusters its records already hold.
    task = ray.remote(num_cpus=1, max_retries=3)(process_group).options(scheduling_strategy=strategy)
    c_ref = ray.put(centroids)
    pending = [task.remote(g, members, ranges[g], c_ref, str(state), dim, eps, main, keep, seed, block, memory_bytes,
                           flush_rows)
               for g, members in enumerate(groups)]
    done, clusters, skipped, pairs, member_pairs, seconds = 0, 0, 0, 0, 0, {}
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            info = ray.get(ready[0])
            done += 1
            clusters += info["clusters"]
            skipped += info["skipped"]
            pairs += info["pairs"]
            member_pairs += info["member_pairs"]
            for step, t in info["seconds"].items():
                seconds[step] = seconds.get(step, 0.0) + t
            notify("similarity", {"groups_done": done, "groups": len(groups), **info})
    finally:
        cancel_running(pending)  # an interrupted driver stops its tasks; their finished clusters stay recorded
    # pairs: compared by this run's walks (guests included); member_pairs: those of one exact within-cluster pass
    return {"tasks": len(groups), "clusters_done": clusters, "clusters_skipped": skipped, "pairs": pairs,
            "member_pairs": member_pairs,
            "task_seconds": {step: round(t, 1) for step, t in seconds.items()}}


def _check_every_id_once(ids: np.ndarray, files: list[Path], where: str) -> None:
    """`ids` sorted (as `validate` returns them); the written ids are gathered into one array and sorted in place."""
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    written, at = np.empty(total, np.int64), 0
    for f in files:
        part = pq.read_table(f, columns=["id"]).column("id").to_numpy()
        written[at:at + len(part)] = part
        at += len(part)
    written.sort()
    if len(written) != len(ids) or not np.array_equal(written, ids):
        raise DataError(f"{where}: the deduplication wrote {len(written)} ids for {len(ids)} input rows; "
                        "every input id must be in kept/ or duplicates/ exactly once")
