"""Federated k-means on blobs: one_shot (k-FED) vs rounds (federated Lloyd) vs centralised, and the cost of DP.

For each partition count and split (IID, Dirichlet(alpha) over the blob labels) the same blobs are divided, and
FederatedKMeans runs with one Ray actor per partition:
  one_shot       k-FED, local_k = k, one round;
  rounds         federated Lloyd from the federated k-means++ init (tol 1e-4, at most --max-rounds);
  rounds-dp-eps  rounds with (eps, 1e-6)-DP over the whole run and secure aggregation (the Gaussian noise is then
                 split over the clients, FedDP-KMeans's setting), rows clipped to the data-independent bound
                 center_box * sqrt(d) + 4 sqrt(d), init from --server-rows server-side points of the same
                 distribution, --dp-rounds rounds.
Every result is compared with centralised k-means on the pooled rows (engine.KMeans, k-means++, 10 restarts):
inertia ratio (federated inertia on the pooled rows / centralised), ARI of the two assignments; rounds also with
centralised Lloyd from its own init (`ratio_same_init`, 1.000 when federated Lloyd is exact). Bytes are the
pickled sizes of the messages each way, summed over clients and rounds.

    python benchmarks/federated.py --record
    python benchmarks/federated.py --n 3000 --partitions 2,4 --splits iid,dirichlet-0.1 --epsilons 10   # quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import append_section  # noqa: E402


def make_blobs(n: int, centers: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n unit-variance rows around the given centres: (X float32, labels)."""
    labels = rng.integers(0, centers.shape[0], n)
    return centers[labels] + rng.standard_normal((n, centers.shape[1]), dtype=np.float32), labels


def pooled_metrics(X: np.ndarray, centroids: np.ndarray, ref_inertia: float, ref_labels: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from engine.cluster import assign

    labels, sq = assign(X, centroids)
    inertia = float(sq.astype(np.float64).sum())
    return {"inertia": inertia, "inertia_ratio": inertia / ref_inertia,
            "ari_to_centralised": float(adjusted_rand_score(ref_labels, labels))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--box", type=float, default=10.0, help="blob centres uniform in [-box, box]^d")
    parser.add_argument("--partitions", default="2,8,32", help="partition counts, comma-separated")
    parser.add_argument("--splits", default="iid,dirichlet-1.0,dirichlet-0.1",
                        help="iid and/or dirichlet-<alpha>, comma-separated")
    parser.add_argument("--epsilons", default="1,10", help="DP budgets (empty: no DP runs)")
    parser.add_argument("--max-rounds", type=int, default=30)
    parser.add_argument("--dp-rounds", type=int, default=5)
    parser.add_argument("--server-rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", default=None, metavar="RUN_DIR",
                        help="cluster a run's embeddings (RUN_DIR/embeddings, with their labels) instead of blobs; "
                             "--n, --d, --box are then ignored and DP clips at the rows' largest norm")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    import ray

    from engine.cluster import KMeans
    from engine.federated import FederatedKMeans, split_indices
    from engine.runtime import init_ray

    init_ray()
    rng = np.random.default_rng(args.seed)
    if args.embeddings:
        from engine.cluster.assignments import load_vectors

        _, X, labels = load_vectors(Path(args.embeddings) / "embeddings")
        if labels is None:
            raise SystemExit(f"{args.embeddings}: the embeddings have no labels to split by")
        # Server-side init points: a held-out random sample, taken out of every partition.
        held, rest = np.split(rng.permutation(X.shape[0]), [args.server_rows])
        server_points, X, labels = X[held], X[rest], labels[rest]
        args.n, args.d = X.shape
        # Read off the data, so not itself private: a benchmark convenience (a deployment fixes it in advance).
        clip_norm = float(np.linalg.norm(X, axis=1).max())
        data = (f"embeddings of `{args.embeddings}` (n={args.n}, d={args.d}, {len(np.unique(labels))} labels; DP "
                "clip_norm = the largest row norm)")
    else:
        centers = rng.uniform(-args.box, args.box, size=(args.k, args.d)).astype(np.float32)
        X, labels = make_blobs(args.n, centers, rng)
        server_points = make_blobs(args.server_rows, centers, rng)[0]  # in-distribution, not part of any partition
        clip_norm = (args.box + 4.0) * np.sqrt(args.d)
        data = (f"Blobs n={args.n}, d={args.d}, k={args.k} (unit variance, centres uniform in "
                f"[-{args.box:g}, {args.box:g}]^d)")
    t0 = time.perf_counter()
    ref = KMeans(args.k, n_init=10, max_iter=300, seed=args.seed).fit(X)
    ref_seconds = time.perf_counter() - t0
    results = [{"bench": "federated", "partitions": 1, "split": "pooled", "method": "centralised", "inertia_ratio": 1.0,
                "ari_to_centralised": 1.0, "rounds": int(ref.n_iter_), "bytes_up": 0, "bytes_down": 0,
                "seconds": ref_seconds, "inertia": float(ref.inertia_)}]
    print(json.dumps(results[0]), flush=True)
    epsilons = [float(e) for e in args.epsilons.split(",") if e]

    for n_parts in (int(p) for p in args.partitions.split(",")):
        for split in args.splits.split(","):
            kind, _, alpha = split.partition("-")
            rows = split_indices(args.n, n_parts, split=kind, labels=labels, alpha=float(alpha or 1.0), seed=args.seed,
                                 min_rows=args.k)
            parts = {name: X[idx] for name, idx in rows.items()}
            runs = [("one_shot", dict(mode="one_shot")), ("rounds", dict(mode="rounds", max_rounds=args.max_rounds))]
            runs += [(f"rounds-dp-eps{e:g}", dict(mode="rounds", max_rounds=args.dp_rounds, init=server_points,
                                                  secure_aggregation=True,
                                                  privacy={"epsilon": e, "delta": 1e-6, "clip_norm": clip_norm}))
                     for e in epsilons]
            for method, kwargs in runs:
                start = time.perf_counter()
                km = FederatedKMeans(args.k, seed=args.seed, **kwargs).fit(parts)
                seconds = time.perf_counter() - start
                result = {"bench": "federated", "partitions": n_parts, "split": split, "method": method,
                          **pooled_metrics(X, km.cluster_centers_, ref.inertia_, ref.labels_),
                          "rounds": int(km.n_rounds_), "bytes_up": int(km.bytes_up_),
                          "bytes_down": int(km.bytes_down_), "seconds": seconds,
                          "sizes": [int(len(i)) for i in rows.values()],
                          "labels_per_partition": float(np.mean([len(np.unique(labels[i])) for i in rows.values()])),
                          "epsilon_spent": (km.privacy_spent_ or {}).get("epsilon")}
                if method == "rounds":
                    same = KMeans(args.k, init=km.init_centers_, max_iter=args.max_rounds, tol=1e-4).fit(X)
                    result["ratio_same_init"] = result["inertia"] / float(same.inertia_)
                results.append(result)
                print(json.dumps(result), flush=True)
    ray.shutdown()

    if args.record:
        def fmt(x, spec: str) -> str:
            return "n/a" if x is None else format(x, spec)

        header = ["partitions", "split", "method", "inertia / centralised", "ARI to centralised", "rounds",
                  "KiB up", "KiB down", "seconds", "inertia / centralised Lloyd, same init"]
        table = [[r["partitions"], r["split"], r["method"], fmt(r["inertia_ratio"], ".4f"),
                  fmt(r["ari_to_centralised"], ".4f"), r["rounds"], fmt(r["bytes_up"] / 1024, ".1f"),
                  fmt(r["bytes_down"] / 1024, ".1f"), fmt(r["seconds"], ".1f"), fmt(r.get("ratio_same_init"), ".4f")]
                 for r in results]
        command = f"python benchmarks/federated.py {' '.join(sys.argv[1:])}"
        notes = (
            f"{data}, seed {args.seed}; `{command}`. One Ray actor per partition on one "
            "machine; seconds include starting the actors. DP: (eps, 1e-6) over the whole run, secure aggregation, "
            f"clip_norm {clip_norm:.1f}, init from {args.server_rows} server-side points, {args.dp_rounds} rounds. "
            f"Python {platform.python_version()}."
        )
        append_section(f"Federated k-means on {'embeddings' if args.embeddings else 'blobs'} (one_shot vs rounds vs "
                       "centralised, DP)", header, table, notes)


if __name__ == "__main__":
    main()
