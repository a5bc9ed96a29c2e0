"""Out-of-core k-means: 10M x 64 blobs in Parquet shards, ShardedKMeans and sample_assign, with peak memory.

Generates the data once with `prepare_source` (Ray Data tasks, streaming) unless --data already holds it,
then runs, in one Ray session:
  sharded        ShardedKMeans over --num-actors shard actors (k-means|| init, exact Lloyd);
  sample_assign  KMeans on a seeded --sample-size sample, then every row assigned by Ray Data tasks;
  in_memory      engine.KMeans in the driver on a --subset rows subset (the reference; run last, so its memory
                 does not count against the out-of-core runs).
A sampler thread polls (/proc, Linux) the RSS of the driver and of every process Ray started for this session
(actors, tasks) every 0.2 s; each result reports the driver's peak and the largest other process's peak in that phase,
against its share (bytes of data / number of actors), and the same peaks of private memory (RSS less its shared
pages: mostly the pages of Ray's object store a process has mapped, which stay in its RSS after the objects are
freed and are held once, by the store). Inertia is compared on the subset: the SSE of the subset's rows to each
method's centroids over the SSE to the in-memory centroids.

    python benchmarks/kmeans_out_of_core.py --n 10000000 --d 64 --k 1024 --iters 20 --record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import append_section  # noqa: E402

GIB = 1 << 30


def _processes() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (parent pid, RSS bytes, private bytes, command) of every process, from /proc (Linux)."""
    page = os.sysconf("SC_PAGE_SIZE")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/statm") as f:
                fields = f.read().split()
            rss, shared = int(fields[1]) * page, int(fields[2]) * page
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")[:60]
        except (OSError, IndexError, ValueError):
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        out[int(entry.name)] = (ppid, rss, rss - shared, cmd)
    return out


class PeakRSS:
    """Peak resident memory of this process and of every process below it (Ray's workers), per phase."""

    def __init__(self, interval: float = 0.2):
        self._pid = os.getpid()
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._driver = self._driver_private = 0
        self._others: dict[int, tuple[int, str]] = {}
        self._others_private: dict[int, tuple[int, str]] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = _processes()
            below, frontier = set(), [self._pid]
            while frontier:
                parent = frontier.pop()
                kids = [pid for pid, (ppid, *_) in procs.items() if ppid == parent and pid not in below]
                below.update(kids)
                frontier.extend(kids)
            with self._lock:
                _, rss, private, _ = procs.get(self._pid, (0, 0, 0, ""))
                self._driver, self._driver_private = max(self._driver, rss), max(self._driver_private, private)
                for pid in below:
                    _, rss, private, cmd = procs[pid]
                    if rss > self._others.get(pid, (0, ""))[0]:
                        self._others[pid] = (rss, cmd)
                    if private > self._others_private.get(pid, (0, ""))[0]:
                        self._others_private[pid] = (private, cmd)
            self._stop.wait(self._interval)

    def phase(self) -> dict:
        """Peaks since the last call, then reset."""
        time.sleep(2 * self._interval)
        with self._lock:
            top = max(self._others.values(), default=(0, ""))
            top_private = max(self._others_private.values(), default=(0, ""))
            out = {"driver_peak_rss_gib": self._driver / GIB, "largest_worker_peak_rss_gib": top[0] / GIB,
                   "largest_worker": top[1], "driver_peak_private_gib": self._driver_private / GIB,
                   "largest_worker_peak_private_gib": top_private[0] / GIB, "largest_private_worker": top_private[1]}
            self._driver = self._driver_private = 0
            self._others, self._others_private = {}, {}
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _short(command: str) -> str:
    """'ray::ShardActor.partial_stats' -> 'ShardActor': which kind of process, for the table."""
    return command.removeprefix("ray::").split(".")[0].split("(")[0]


def subset_inertia(X: np.ndarray, centroids: np.ndarray) -> float:
    from engine.cluster import assign

    _, sq = assign(X, centroids)
    return float(sq.astype(np.float64).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rows-per-shard", type=int, default=250_000)
    parser.add_argument("--num-actors", type=int, default=2)
    parser.add_argument("--sample-size", type=int, default=1_000_000)
    parser.add_argument("--subset", type=int, default=1_000_000, help="rows of the in-memory reference")
    parser.add_argument("--data", default=None, help="folder for the blobs shards (kept; default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="sharded,sample_assign,reference",
                        help="which to run, comma-separated (the reference gives the subset inertia ratios)")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    if steps - {"sharded", "sample_assign", "reference"}:
        parser.error(f"--steps: unknown {sorted(steps - {'sharded', 'sample_assign', 'reference'})}; "
                     "choose among sharded, sample_assign, reference")

    from engine.cluster import KMeans, ShardedKMeans, fit_sample_then_assign
    from engine.config import BlobsSource
    from engine.data import read_manifest, read_table
    from engine.data.folders import shard_paths
    from engine.data.prepare import prepare_source
    from engine.data.schema import X, vectors_to_numpy
    from engine.runtime import init_ray

    monitor = PeakRSS()
    init_ray()
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="dce-blobs-"))
    shard_bytes = args.n * args.d * 4
    results = []

    def report(name: str, seconds: float, **fields) -> None:
        r = {"bench": "kmeans_out_of_core", "impl": name, "n": args.n, "d": args.d, "k": args.k,
             "iters": args.iters, "seconds": round(seconds, 2), **monitor.phase(), **fields}
        r["data_gib"] = shard_bytes / GIB
        r["share_gib"] = shard_bytes / GIB / args.num_actors
        results.append(r)
        print(json.dumps(r), flush=True)

    cfg = BlobsSource(n_samples=args.n, n_features=args.d, centers=args.k, seed=args.seed,
                      rows_per_shard=args.rows_per_shard)
    try:
        manifest = read_manifest(data, stage="input")
        if manifest["rows"] != args.n:
            raise ValueError(f"{data} holds {manifest['rows']} rows, not {args.n}")
    except Exception:  # noqa: BLE001 - no usable data there yet: generate it
        monitor.phase()
        t0 = time.perf_counter()
        prepare_source(cfg, data)
        report("generate", time.perf_counter() - t0)

    models = {}
    monitor.phase()
    t0 = time.perf_counter()
    if "sharded" in steps:
        sharded = ShardedKMeans(args.k, init="k-means||", max_iter=args.iters, tol=0, seed=args.seed,
                                num_actors=args.num_actors, column=X).fit(data)
        report("sharded", time.perf_counter() - t0, inertia_per_row=sharded.inertia_ / args.n)
        models["sharded"] = sharded

    if "sample_assign" in steps:
        out = Path(tempfile.mkdtemp(prefix="dce-assign-")) / "assignments"
        monitor.phase()
        t0 = time.perf_counter()
        sampled, _ = fit_sample_then_assign(data, out, args.k, args.sample_size, max_iter=args.iters, tol=0,
                                            seed=args.seed, num_actors=args.num_actors, column=X, stage="input")
        seconds = time.perf_counter() - t0
        distance = read_table(out, stage="assign", columns=["distance"]).column("distance").to_numpy()
        report("sample_assign", seconds,
               inertia_per_row=float(np.square(distance.astype(np.float64)).sum()) / args.n,
               sample_size=args.sample_size)
        models["sample_assign"] = sampled
        shutil.rmtree(out.parent, ignore_errors=True)

    # The reference: the first --subset rows in this process.
    if "reference" in steps:
        parts, rows = [], 0
        for path in shard_paths(data, stage="input"):
            import pyarrow.parquet as pq

            parts.append(vectors_to_numpy(pq.read_table(path, columns=[X]).column(X)))
            rows += len(parts[-1])
            if rows >= args.subset:
                break
        sub = np.concatenate(parts)[: args.subset]
        t0 = time.perf_counter()
        ref = KMeans(args.k, max_iter=args.iters, tol=0, seed=args.seed).fit(sub)
        ref_sse = subset_inertia(sub, ref.cluster_centers_)
        report("in_memory_subset", time.perf_counter() - t0, rows=len(sub), inertia_per_row=ref_sse / len(sub))
        for r in results:
            if r["impl"] in ("sharded", "sample_assign"):
                model = models[r["impl"]]
                r["subset_inertia_ratio"] = subset_inertia(sub, model.cluster_centers_) / ref_sse
                print(json.dumps({"impl": r["impl"], "subset_inertia_ratio": r["subset_inertia_ratio"]}), flush=True)
    monitor.close()

    if args.record:
        header = ["step", "seconds", "driver peak RSS (GiB)", "largest worker peak RSS (GiB)",
                  "driver / largest worker peak private (GiB)", "share (GiB)", "inertia / row",
                  "subset inertia / in-memory"]
        table = [[r["impl"], f"{r['seconds']:.1f}", f"{r['driver_peak_rss_gib']:.2f}",
                  f"{r['largest_worker_peak_rss_gib']:.2f} ({_short(r['largest_worker'])})",
                  f"{r['driver_peak_private_gib']:.2f} / {r['largest_worker_peak_private_gib']:.2f}",
                  f"{r['share_gib']:.2f}",
                  f"{r['inertia_per_row']:.3f}" if "inertia_per_row" in r else "",
                  f"{r['subset_inertia_ratio']:.4f}" if "subset_inertia_ratio" in r else ""] for r in results]
        notes = (f"n={args.n}, d={args.d}, k={args.k}, {args.iters} Lloyd iterations (tol 0), "
                 f"{args.rows_per_shard} rows per shard, {args.num_actors} shard actors, sample_assign sample "
                 f"{args.sample_size}; reference: engine.KMeans (k-means++) in memory on the first {args.subset} "
                 f"rows. `python benchmarks/kmeans_out_of_core.py {' '.join(sys.argv[1:])}`. RSS sampled every "
                 "0.2 s per process (/proc); private = RSS less shared pages (Ray's object store mapped in); "
                 "'share' = data bytes / actors.")
        append_section("k-means out of core (ShardedKMeans, sample_assign)", header, table, notes)
    if not args.data:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
