"""Semantic dedup quality on MNIST with planted, lightly transformed copies: the engine's within-cluster pass
against an exact all-pairs faiss range search, for several k; one JSON line per result, --record appends RESULTS.md."""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def mnist() -> np.ndarray:
    parts = []
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        raw = gzip.open(DATA / name).read()
        parts.append(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28))
    return np.concatenate(parts).astype(np.float32) / 255


def planted_set(n_images: int, n_sources: int, seed: int, shift: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (n, 784), group: the source index for planted copies and their source, -1 otherwise) of a seeded
    subset of `n_images` MNIST images. Copies are shifted by up to `shift` pixels, brightness-scaled by 0.9-1.1 and
    given 0.02 Gaussian noise."""
    rng = np.random.default_rng(seed)
    images = mnist()
    images = images[np.sort(rng.choice(len(images), min(n_images, len(images)), replace=False))]
    group = np.full(len(images), -1)
    sources = rng.choice(len(images), n_sources, replace=False)
    group[sources] = sources
    copies, copy_group = [], []
    for s in sources:
        for _ in range(rng.integers(1, 4)):
            img = np.roll(images[s], tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1)) * rng.uniform(0.9, 1.1)
            copies.append(np.clip(img + 0.02 * rng.normal(size=img.shape), 0, None))
            copy_group.append(s)
    x = np.concatenate([images, np.array(copies)]).reshape(-1, 784).astype(np.float32)
    return x, np.concatenate([group, copy_group])


def exact_pass(u: np.ndarray, eps: float, configs: list[dict], chunk: int = 512) -> tuple[dict, float]:
    """One exact all-pairs pass (faiss IndexFlatIP range search, similarity > 1 - eps), query chunk by query chunk
    so the pairs are never all held; for each result of `configs` (home cluster, guest clusters, kept mask) the
    counts of exact pairs split across clusters, visible to the search (same cluster, or one row a guest in the
    other's cluster) and left with both rows kept."""
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(u.shape[1])
    index.add(u)
    counts = {"pairs": 0, **{i: {"split": 0, "visible": 0, "both_kept": 0} for i in range(len(configs))}}
    for q0 in range(0, len(u), chunk):
        lims, _, labels = index.range_search(u[q0:q0 + chunk], 1 - eps)
        rows = q0 + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = rows < labels
        a, b = rows[keep], labels[keep]
        counts["pairs"] += len(a)
        for i, c in enumerate(configs):
            home, guests, kept = c["home"], c["guests"], c["kept"]
            same = home[a] == home[b]
            seen = same | (guests[a] == home[b][:, None]).any(axis=1) | (guests[b] == home[a][:, None]).any(axis=1)
            counts[i]["split"] += int((~same).sum())
            counts[i]["visible"] += int(seen.sum())
            counts[i]["both_kept"] += int((kept[a] & kept[b]).sum())
    return counts, time.perf_counter() - t0


def guests_of(u: np.ndarray, centroids: np.ndarray, probes: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(home cluster, guest clusters or -1 (n, probes - 1)) of every row, as the engine assigns them."""
    from engine.curate.partition import bisector_reach, guest_margin

    sims = u @ centroids.T
    top = np.argsort(-sims, axis=1)[:, :probes]
    top_sims = np.take_along_axis(sims, top, axis=1)
    limit = np.cos(np.minimum(np.arccos(np.clip(top_sims[:, 0], -1, 1)) + guest_margin(eps), np.pi))
    gap = np.linalg.norm(centroids[top[:, :1]] - centroids[top[:, 1:]], axis=2)
    near = (top_sims[:, 1:] >= limit[:, None]) & (top_sims[:, :1] - top_sims[:, 1:] <= bisector_reach(eps) * gap)
    guests = np.where(near, top[:, 1:], -1)
    return top[:, 0], guests if guests.shape[1] else np.full((len(u), 1), -1)


def encode(x: np.ndarray, run: Path) -> np.ndarray:
    """The trained encoder of run directory `run` applied to the pixels."""
    from engine.embed import Embedder
    from engine.train.checkpoint import load_checkpoint

    model = Embedder(load_checkpoint(run / "model"), one_thread=False)
    return np.concatenate([model.encode(x[i:i + 8192]) for i in range(0, len(x), 8192)])


def quality(x: np.ndarray, group: np.ndarray, name: str, ks: list[int], probes: list[int], eps: float,
            tmp: Path) -> tuple[list[dict], dict]:
    """Dedup of `x` for every k and probes, scored against the planted copies and the exact pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.curate import dedup
    from engine.data.schema import vector_array

    u = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(len(x))
    emb = tmp / f"emb-{name}"
    emb.mkdir()
    for i, part in enumerate(np.array_split(ids, 8)):
        pq.write_table(pa.table({"id": ids[part], "z": vector_array(x[part])}), emb / f"part-{i}.parquet")
    planted_extra = int(sum(np.bincount(group[group >= 0]).clip(min=1) - 1))
    rows, configs = [], []
    for k in ks:
        for p in probes:
            out = tmp / f"out-{name}-{k}-{p}"
            t0 = time.perf_counter()
            s = dedup(emb, out, eps=eps, k=k, keep="hard", probes=p)
            seconds = time.perf_counter() - t0
            home, guests = guests_of(u, np.load(out / "centroids.npy"), p, eps)
            kept_ids = pq.read_table(out / "kept").column("id").to_numpy()
            dups = pq.read_table(out / "duplicates").to_pydict()
            rid, did = np.array(dups["id"], dtype=np.int64), np.array(dups["duplicate_of"], dtype=np.int64)
            kept = np.zeros(len(x), dtype=bool)
            kept[kept_ids] = True
            true_sim = (u[rid] * u[did]).sum(axis=1)
            precision = float(((true_sim > 1 - eps) & kept[did]).mean()) if len(rid) else 1.0
            right = int(((group[rid] >= 0) & (group[rid] == group[did])).sum())
            rows.append({"impl": "engine", "embedding": name, "dim": x.shape[1], "k": k, "probes": p,
                         "rows": len(x), "removed": len(rid), "guests": s["guests"], "pending": s["pending"],
                         "edges": s["edges"],
                         "seconds": round(seconds, 1), "precision_vs_exact": round(precision, 4),
                         "stages": {a: round(b, 1) for a, b in s["seconds"].items() if isinstance(b, float)},
                         "planted_recall": round(right / planted_extra, 4),
                         "planted_precision": round(right / max(1, len(rid)), 4)})
            configs.append({"home": home, "guests": guests, "kept": kept})
            print(json.dumps(rows[-1]), flush=True)
    counts, exact_s = exact_pass(u, eps, configs)
    for i, r in enumerate(rows):
        c, n = counts[i], max(1, counts["pairs"])
        r.update(exact_pairs=counts["pairs"], pairs_split=c["split"], pairs_missed=counts["pairs"] - c["visible"],
                 pair_recall=round(c["visible"] / n, 4), kept_pairs=c["both_kept"],
                 kept_pair_recall=round(1 - c["both_kept"] / n, 4))
        print(json.dumps(r), flush=True)
    return rows, {"embedding": name, "pairs": counts["pairs"], "seconds": round(exact_s, 1)}


def make_scale_data(folder: Path, rows: int, dim: int) -> float:
    """Synthetic embeddings streamed into `folder` (a mixture of 1,000 directions, 1% planted copies), files of
    100,000 rows, never all in memory; returns the seconds it took."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data.schema import vector_array

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(1000, dim)).astype(np.float32)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    for f, start in enumerate(range(0, rows, 100_000)):
        n = min(100_000, rows - start)
        x = centers[rng.integers(0, 1000, n)] + rng.standard_normal(size=(n, dim), dtype=np.float32) * 0.3
        copies = rng.choice(n, n // 100, replace=False)
        half = len(copies) // 2
        x[copies[:half]] = x[copies[half:2 * half]] + 0.01 * rng.standard_normal(size=(half, dim), dtype=np.float32)
        pq.write_table(pa.table({"id": np.arange(start, start + n), "z": vector_array(x)}),
                       folder / f"part-{f:05d}.parquet", row_group_size=50_000)
    return time.perf_counter() - t0


def _matmul_peak_apart() -> float:
    """The machine's float32 matmul rate (`kmeans_inmemory.matmul_peak`), measured in a child process so that its
    matrices do not count in the driver's peak memory."""
    import subprocess
    import sys

    code = "from kmeans_inmemory import matmul_peak; print(matmul_peak(repeats=3))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.split()[-1])


def scale(rows: int, dim: int, k: int | None, record: bool, data: Path | None = None,
          probes: int | None = None) -> None:
    """Out-of-core dedup of synthetic embeddings (`make_scale_data`, made in a temp folder unless `data` holds
    them already); time per stage, the driver's peak memory, and the ratio the issue's target is stated in: total /
    (k-means + one exact within-cluster pass at the machine's float32 matmul rate, measured in the same run)."""
    import resource

    from engine.curate import dedup
    from engine.runtime import curation_cpus, init_ray

    with tempfile.TemporaryDirectory(dir=data.parent if data else None) as tmp:
        made = 0.0
        if data is None or not data.is_dir():
            data = data or Path(tmp, "emb")
            made = make_scale_data(data, rows, dim)
        peak = _matmul_peak_apart()
        init_ray(num_cpus=curation_cpus())
        t0 = time.perf_counter()
        extra = {} if probes is None else {"probes": probes}
        s = dedup(data, f"{tmp}/out", eps=0.05, k=k, **extra)
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # One exact pass: every pair of rows of each cluster once (n_c (n_c - 1) / 2 dot products of 2 d flop).
    exact = s["group_tasks"]["member_pairs"] * 2 * dim / (peak * 1e9)
    row = {"impl": "engine-scale", "rows": rows, "dim": dim, "k": s["k"], "probes": s.get("probes"),
           "seconds": round(seconds, 1),
           "stages": {a: round(b, 1) for a, b in s["seconds"].items() if isinstance(b, float)},
           "removed": s["removed"], "guests": s["guests"], "pending": s["pending"], "edges": s["edges"],
           "pairs_compared": s["group_tasks"]["pairs"], "member_pairs": s["group_tasks"]["member_pairs"],
           "group_task_seconds": s["group_tasks"].get("task_seconds"),
           "matmul_gflops": round(peak, 1), "exact_pass_seconds": round(exact, 1),
           "ratio": round(seconds / (s["seconds"]["kmeans"] + exact), 2),
           "driver_peak_mib": round(rss), "data_seconds": round(made, 1)}
    print(json.dumps(row), flush=True)
    if record:
        from record import append_section

        st = row["stages"]
        append_section("Semantic dedup out of core (synthetic embeddings)",
                       ["rows x dim", "k", "probes", "validate", "k-means", "assign", "within-cluster", "global",
                        "write", "total s", "exact pass s", "ratio", "driver peak MiB", "removed"],
                       [[f"{rows} x {dim}", row["k"], row["probes"], st.get("validate"), st.get("kmeans"),
                         st.get("assign"), st.get("similarity"), st.get("resolve"), st.get("write"), row["seconds"],
                         row["exact_pass_seconds"], row["ratio"], row["driver_peak_mib"], row["removed"]]],
                       notes="Parquet files of 100,000 rows (row groups of 50,000); eps 0.05, keep hard, defaults "
                             "otherwise; `python benchmarks/curate.py --scale ROWS --record`. Driver peak = the "
                             "driver process's max RSS (Ray's workers not included); shared 2-core machine. Exact "
                             f"pass = {row['member_pairs']:,} within-cluster pairs x 2 d flop at the float32 "
                             f"matmul rate measured in the same run ({row['matmul_gflops']} GFLOP/s, 4096^2, 2 "
                             "threads); ratio = total / (k-means + exact pass), the issue's target is 2.")


def scale_sample(data: Path, n: int, levels: int, ks: list[int] | None, record: bool) -> None:
    """`sample` of the --scale rows: time per stage and the driver's peak memory."""
    import resource

    from engine.curate import sample
    from engine.runtime import curation_cpus, init_ray

    init_ray(num_cpus=curation_cpus())
    with tempfile.TemporaryDirectory(dir=data.parent) as tmp:
        t0 = time.perf_counter()
        s = sample(data, f"{tmp}/out", n=n, levels=levels, **({"k": ks} if ks else {}))
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"impl": "engine-sample-scale", "rows": s.get("rows"), "n": n, "levels": levels, "k": s.get("k"),
           "seconds": round(seconds, 1), "stages": {a: round(b, 1) for a, b in s.get("seconds", {}).items()
                                                    if isinstance(b, float)},
           "driver_peak_mib": round(peak)}
    print(json.dumps(row), flush=True)
    if record:
        from record import append_section

        append_section("Cluster-balanced sampling out of core (synthetic embeddings)",
                       ["rows", "n", "levels", "k per level", "seconds per stage", "total s", "driver peak MiB"],
                       [[row["rows"], n, levels, row["k"], row["stages"], row["seconds"], row["driver_peak_mib"]]],
                       notes="The rows of the dedup scale run above; defaults otherwise; `python benchmarks/curate.py "
                             "--scale ROWS --scale-data DIR --sample N --record`. Driver peak = the driver process's "
                             "max RSS; shared 2-core machine.")


def global_pass(pending: int, edges: int, kept_sure: int) -> None:
    """The global pass alone (`resolve_pending`) on synthetic pending rows, edges (each to an earlier pending row,
    2% to a row kept for sure) and kept ids, as dense embeddings leave them; run in a child process so its peak RSS
    is the pass's own."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ids = rng.permutation(pending + kept_sure).astype(np.int64)
        pend, kept = ids[:pending], ids[pending:]
        cs = rng.random(pending).astype(np.float32)
        ranked = pend[np.lexsort((pend, cs))]  # the hard keep order
        pq.write_table(pa.table({"id": kept}), d / "kept.parquet")
        pq.write_table(pa.table({"id": pend, "centroid_sim": cs, "cluster": np.zeros(pending, np.int32)}),
                       d / "pending.parquet")
        for f, start in enumerate(range(0, edges, 5_000_000)):
            m = min(5_000_000, edges - start)
            later = rng.integers(1, pending, m)
            earlier = np.where(rng.random(m) < 0.02, kept[rng.integers(0, kept_sure, m)],
                               ranked[(later * rng.random(m)).astype(np.int64)])
            pq.write_table(pa.table({"id": ranked[later], "earlier": earlier,
                                     "similarity": rng.random(m).astype(np.float32)}), d / f"edges-{f}.parquet")
        del ids, pend, kept, cs, ranked
        code = (
            "import json, resource, sys, time; from pathlib import Path\n"
            "from engine.curate.resolve import resolve_pending\n"
            "d = Path(sys.argv[1]); t = time.perf_counter()\n"
            "k, r, _ = resolve_pending([d / 'kept.parquet'], [d / 'pending.parquet'], sorted(d.glob('edges-*')),"
            " 'hard', 0, d / 'global')\n"
            "print(json.dumps({'kept': k, 'removed': r, 'seconds': round(time.perf_counter() - t, 1),"
            " 'peak_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))\n")
        out = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, check=True)
    row = {"impl": "engine-global-pass", "pending": pending, "edges": edges, "kept_sure": kept_sure,
           **json.loads(out.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=70000, help="MNIST images (of 70,000); the exact all-pairs "
                   "reference costs rows^2 x dim multiply-adds")
    p.add_argument("--sources", type=int, default=15000, help="images planted with 1-3 copies each (70,000 images "
                   "and 15,000 sources: about 100,000 rows)")
    p.add_argument("--shift", type=int, default=1, help="largest pixel shift of a planted copy")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--k", default="10,50,200")
    p.add_argument("--probes", default="1,2,3")
    p.add_argument("--encoder", type=Path, default=None, help="a run directory: also its encoder's embeddings")
    p.add_argument("--no-pixels", action="store_true", help="only the encoder's embeddings")
    p.add_argument("--record", action="store_true")
    p.add_argument("--scale", type=int, default=0, help="instead: out-of-core dedup of this many synthetic rows")
    p.add_argument("--scale-data", type=Path, default=None, help="folder of the --scale rows (made when absent)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--sample", type=int, default=0, help="with --scale-data: time `sample` of n rows instead")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--global-pass", default="", help="PENDING,EDGES,KEPT: time the global pass alone on synthetic "
                   "pending rows and edges (driver memory on dense data)")
    args = p.parse_args()
    if args.global_pass:
        return global_pass(*(int(v) for v in args.global_pass.split(",")))
    if args.scale and args.sample:
        ks = [int(v) for v in args.k.split(",")] if args.k != "10,50,200" else None
        return scale_sample(args.scale_data, args.sample, args.levels, ks, args.record)
    if args.scale:
        probes = int(args.probes) if "," not in args.probes else None
        # --k: one k, else the engine's default k
        return scale(args.scale, args.dim, int(args.k) if "," not in args.k else None, args.record,
                     args.scale_data, probes)
    from engine.runtime import curation_cpus, init_ray

    x, group = planted_set(args.images, args.sources, seed=0, shift=args.shift)
    ks, probes = [int(v) for v in args.k.split(",")], [int(v) for v in args.probes.split(",")]
    init_ray(num_cpus=curation_cpus())
    sets = [] if args.no_pixels else [("pixels", x)]
    if args.encoder:
        z = encode(x, args.encoder)
        # Centred: an autoencoder's codes share an offset far larger than their spread (here ~100x), and cosine
        # on raw codes would call nearly every pair a duplicate.
        sets.append((f"encoder:{args.encoder.name} (centred)", z - z[:args.images].mean(axis=0)))
    results, exact = [], []
    with tempfile.TemporaryDirectory(dir=args.encoder.parent if args.encoder else None) as tmp:
        for name, data in sets:
            rows, ex = quality(data, group, name, ks, probes, args.eps, Path(tmp))
            print(json.dumps({"impl": "faiss-range-search", **ex}), flush=True)
            results += rows
            exact.append(ex)
    if args.record:
        from record import append_section

        planted_extra = int(sum(np.bincount(group[group >= 0]).clip(min=1) - 1))
        append_section(
            "Semantic dedup on MNIST with planted copies: probes against the exact faiss range search",
            ["embedding", "k", "probes", "rows", "removed", "guests", "pending", "seconds", "exact pairs",
             "pairs split",
             "pairs missed", "pair recall", "pairs left kept", "precision vs exact", "planted recall",
             "planted precision"],
            [[r["embedding"], r["k"], r["probes"], r["rows"], r["removed"], r["guests"], r["pending"], r["seconds"],
              r["exact_pairs"],
              r["pairs_split"], r["pairs_missed"], r["pair_recall"], r["kept_pairs"], r["precision_vs_exact"],
              r["planted_recall"], r["planted_precision"]] for r in results],
            notes=(f"{args.images} MNIST images (train + t10k) plus {planted_extra} planted copies of "
                   f"{args.sources} of them (shift <= {args.shift} px, brightness x0.9-1.1, noise 0.02), "
                   f"{len(x)} rows; embedded as raw pixels (/255, 784-d) and by the trained encoder named. "
                   f"eps={args.eps}, keep=hard, seed 0. Exact reference: faiss IndexFlatIP range search, similarity "
                   "> 1 - eps, all pairs (" + ", ".join(f"{e['embedding']}: {e['pairs']} pairs, {e['seconds']} s"
                                                       for e in exact) + "). Pairs split: exact pairs whose rows "
                   "have different nearest centroids. Pairs missed: exact pairs the search never compares (not "
                   "the same cluster, neither row a guest in the other's). Pair recall = 1 - missed / exact. Pairs "
                   "left kept: exact pairs with both rows in kept/ (0 for an exact greedy pass). Guests: copies of"
                   " rows compared in another cluster; pending: rows decided by the global pass. Precision vs exact:"
                   " removed rows whose duplicate_of is kept and above the threshold. Planted precision counts "
                   "MNIST's own near-identical images as wrong, so it is a lower bound. "
                   "`python benchmarks/curate.py --encoder RUN --record`; seconds: whole dedup through local "
                   "Ray on the shared 2-core machine."))


if __name__ == "__main__":
    main()
