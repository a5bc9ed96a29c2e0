"""k-means seeding for large k: the engine's seedings beside faiss's (random rows) and scikit-learn's k-means++.

Each seeding runs on the same data (a seeded Gaussian mixture, `kmeans_inmemory.make_data`); reported per
method: seconds, the cost of its seeds (the inertia with the seeds as centroids) and that cost after a few Lloyd
iterations from them (the same engine Lloyd for all), each as a ratio to random rows'. scikit-learn's greedy
k-means++ costs n d k (2 + ln k) multiply-adds and runs on a subsample of `--sklearn-rows` rows only (its time is
scaled to all rows by n / rows), which says what whole-data k-means++ would take.

    python benchmarks/kmeans_seeding.py --n 1000000 --d 256 --k 20000 --record
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kmeans_inmemory import inertia, make_data  # noqa: E402
from record import append_section  # noqa: E402

METHODS = ("random", "partitioned", "k-means||", "sklearn-k-means++")


def seed(method: str, X: np.ndarray, k: int, seed_: int, sklearn_rows: int) -> tuple[np.ndarray, float, int]:
    """(seeds, seconds, rows the seeding saw)."""
    from engine.cluster import KMeans

    rng = np.random.default_rng(seed_)
    start = time.perf_counter()
    if method == "random":
        C, rows = X[np.sort(rng.choice(X.shape[0], k, replace=False))].copy(), X.shape[0]
    elif method == "sklearn-k-means++":
        from sklearn.cluster import kmeans_plusplus

        rows = min(X.shape[0], sklearn_rows)
        sub = X[np.sort(rng.choice(X.shape[0], rows, replace=False))]
        start = time.perf_counter()
        C = kmeans_plusplus(sub, k, random_state=seed_)[0]
    else:
        w = np.ones(X.shape[0], dtype=np.float32)
        C, rows = KMeans(k, init=method)._initial_centroids(X, w, method, rng), X.shape[0]
    return C, time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=20_000)
    p.add_argument("--lloyd", type=int, default=5, help="Lloyd iterations after the seeding")
    p.add_argument("--methods", default="random,partitioned,sklearn-k-means++")
    p.add_argument("--sklearn-rows", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    from engine.cluster import KMeans

    X, _ = make_data(args.n, args.d, args.k, args.seed)
    lines = []
    for method in methods:
        C, seconds, rows = seed(method, X, args.k, args.seed, args.sklearn_rows)
        after = KMeans(args.k, init=C, max_iter=args.lloyd, tol=0).fit(X).inertia_ if args.lloyd else None
        line = {"bench": "kmeans_seeding", "method": method, "n": args.n, "d": args.d, "k": args.k, "rows": rows,
                "seconds": seconds, "seconds_scaled_to_n": seconds * args.n / rows,
                "seed_cost": inertia(X, C), "cost_after_lloyd": after}
        lines.append(line)
        print(json.dumps(line), flush=True)
    base = next((ln for ln in lines if ln["method"] == "random"), lines[0])
    for ln in lines:
        ln["seed_cost_ratio"] = ln["seed_cost"] / base["seed_cost"]
        ln["after_ratio"] = None if ln["cost_after_lloyd"] is None else ln["cost_after_lloyd"] / base[
            "cost_after_lloyd"]
    if args.record:
        rows = [[ln["method"], ln["rows"], f"{ln['seconds']:.1f}", f"{ln['seconds_scaled_to_n']:.1f}",
                 f"{ln['seed_cost_ratio']:.3f}", "" if ln["after_ratio"] is None else f"{ln['after_ratio']:.4f}"]
                for ln in lines]
        append_section(f"k-means seeding, {args.n} x {args.d}, k = {args.k}",
                       ["seeding", "rows seen", "seconds", "seconds for all rows", f"seed cost / {base['method']}",
                        f"cost after {args.lloyd} Lloyd / {base['method']}"], rows,
                       notes=f"`python benchmarks/kmeans_seeding.py --n {args.n} --d {args.d} --k {args.k} "
                             f"--lloyd {args.lloyd} --methods {args.methods} --record`; data: kmeans_inmemory's "
                             "Gaussian mixture of k blobs.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
