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
    python benchmarks/federated.py --sweep --record         # one_shot / rounds over separated Gaussian mixtures
    python benchmarks/federated.py --scale 250,500,1000     # per-round time and memory vs virtual clients
    python benchmarks/federated.py --feddp --sweep-seeds 0,1,2,3,4 --record   # client-level DP, FedDP-KMeans's shape
    python benchmarks/federated.py --feddp --privacy-unit row --record           # data-point-level DP, same shape

--sweep measures the algorithms alone: the clients run in this process (FederatedKMeans(transport=
"in_process")), no Ray, so a cell costs what the k-means costs. Data: k centres drawn N(0, 3^2 I_d) (pairwise
distance ~4.2 sqrt(d), within-cluster spread ~1.4 sqrt(d): separated), 100 k unit-variance rows; partitions IID or
Dirichlet(0.1) over the mixture labels (each partition at least k rows); centralised k-means: k-means++, 10
restarts, 100 iterations.
    python benchmarks/federated.py --n 3000 --partitions 2,4 --splits iid,dirichlet-0.1 --epsilons 10   # quick
"""

from __future__ import annotations

import argparse
import itertools
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


def mixture(k: int, d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A separated Gaussian mixture: k centres N(0, 3^2 I_d), n unit-variance rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (k, d))
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.standard_normal((n, d))).astype(np.float32), labels


def sweep(args: argparse.Namespace) -> list[dict]:
    """one_shot and rounds against centralised k-means over the grid, in-process (no Ray)."""
    from engine.cluster import KMeans
    from engine.federated import FederatedKMeans, split_indices

    results = []
    grid = [(k, d) for k in _ints(args.sweep_k) for d in _ints(args.sweep_d)]
    for (k, d), parts_n, split, seed in itertools.product(grid, _ints(args.sweep_partitions), ("iid", "dirichlet-0.1"),
                                                          _ints(args.sweep_seeds)):
        X, y = mixture(k, d, 100 * k, seed)
        ref = KMeans(k, n_init=10, max_iter=100, tol=1e-4, seed=seed).fit(X)
        rows = split_indices(len(X), parts_n, split="iid" if split == "iid" else "dirichlet", labels=y, alpha=0.1,
                             seed=seed, min_rows=k)
        parts = {name: X[i] for name, i in rows.items()}
        for method in ("one_shot", "rounds"):
            start = time.perf_counter()
            km = FederatedKMeans(k, mode=method, max_rounds=50, tol=1e-4, seed=seed, transport="in_process",
                                 local_max_iter=50).fit(parts)
            result = {"bench": "federated-sweep", "k": k, "d": d, "partitions": parts_n, "split": split,
                      "seed": seed, "method": method, "rounds": int(km.n_rounds_),
                      **pooled_metrics(X, km.cluster_centers_, ref.inertia_, ref.labels_),
                      "seconds": time.perf_counter() - start}
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def scale(args: argparse.Namespace) -> list[dict]:
    """Per-round seconds, bytes and the server's peak memory of secure federated Lloyd vs the client count."""
    from engine.federated import FederatedKMeans

    results = []
    rng = np.random.default_rng(0)
    C = rng.normal(0.0, 3.0, (8, 8)).astype(np.float32)
    for n in _ints(args.scale):
        parts = {f"c{i:05d}": (C[rng.integers(0, 8, 10)] + rng.standard_normal((10, 8))).astype(np.float32)
                 for i in range(n)}
        start = time.perf_counter()
        km = FederatedKMeans(8, init=C, max_rounds=3, tol=0, secure_aggregation=True, clients_per_actor=250,
                             transport=args.scale_transport).fit(parts)
        lloyd = [r for r in km.history_ if r["kind"] == "lloyd"]
        result = {"bench": "federated-scale", "clients": n, "transport": args.scale_transport,
                  "degree": km.secure_graph_["degree"], "seconds_total": time.perf_counter() - start,
                  "seconds_per_round": float(np.mean([r["seconds"] for r in lloyd])),
                  "kib_up_per_round": float(np.mean([r["bytes_up"] for r in lloyd])) / 1024,
                  "server_peak_rss_mb": lloyd[-1]["server_peak_rss_mb"]}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def feddp(args: argparse.Namespace) -> list[dict]:
    """FedDP-KMeans's data shape (100 clients x 1,000 rows of a Gaussian mixture, total epsilon 1 at delta 1e-6),
    secure aggregation (the Gaussian noise split over the clients), 500 server-side points.

    --privacy-unit row: data-point-level DP, rows clipped to 1.2 x the largest server-side row norm, init from
    the 500 server-side points as candidates weighted by the clients (one counts release), 2 and 5 rounds.
    --privacy-unit client: client-level DP. Bounds from public facts only: the server-side points' mean squared
    distance s2 to their own k-means centroids (10 restarts) and the rows per client m: clip_norm = 2 sqrt(m s2),
    the norm of a client's centred sums when its rows spread as the server's do, with room for the init's bias;
    count_clip = m / sqrt(k), a balanced client's count vector (L2, Gaussian counts). Init: those server-side
    centroids (no release), or the candidates weighted by the clients (one counts release); 1 and 2 rounds.
    """
    from engine.cluster import KMeans, assign
    from engine.federated import FederatedKMeans

    results = []
    k, d, m = 10, args.feddp_d, 1000
    client = args.privacy_unit == "client"
    runs = ([("server k-means", 1), ("server k-means", 2), ("candidates", 1)] if client
            else [("candidates", 2), ("candidates", 5)])
    for seed, (init_kind, rounds) in itertools.product(_ints(args.sweep_seeds), runs):
        if args.server_data == "paper":
            # FedDP-KMeans's GaussianMixtureUniform server data: 20 rows of each component and 100 rows uniform
            # over the box the components span (+- 3 sd): small, and partly out of distribution.
            X, y = mixture(k, d, 100 * m + 40 * k, seed)
            X, spare, spare_y = X[:100 * m], X[100 * m:], y[100 * m:]
            mixed = np.concatenate([spare[spare_y == j][:20] for j in range(k)])
            lo, hi = mixed.min(axis=0) - 3, mixed.max(axis=0) + 3
            uniform = np.random.default_rng(seed + 1).uniform(lo, hi, (100, d)).astype(np.float32)
            server = np.concatenate([mixed, uniform])
        else:
            X, _ = mixture(k, d, 100 * m + 500, seed)
            server, X = X[:500], X[500:]
        parts = {f"c{i:03d}": X[i * m:(i + 1) * m] for i in range(100)}
        ref = KMeans(k, n_init=10, max_iter=100, seed=seed).fit(X).inertia_
        server_km = KMeans(k, n_init=10, max_iter=100, seed=seed).fit(server)
        init = server_km.cluster_centers_ if init_kind == "server k-means" else server
        if client:
            spread = float(server_km.inertia_) / server.shape[0]
            privacy = {"unit": "client", "clip_norm": 2 * float(np.sqrt(m * spread)), "count_clip": m / np.sqrt(k)}
        else:
            privacy = {"unit": "row", "clip_norm": 1.2 * float(np.linalg.norm(server, axis=1).max())}
        start = time.perf_counter()
        km = FederatedKMeans(k, init=init, max_rounds=rounds, tol=0, transport="in_process",
                             secure_aggregation=True, clients_per_actor=100, seed=seed,
                             privacy={"epsilon": 1.0, "delta": 1e-6, "count_noise": "gaussian", **privacy}).fit(parts)
        seconds = time.perf_counter() - start
        inertia = float(assign(X, km.cluster_centers_)[1].astype(np.float64).sum())
        init_inertia = float(assign(X, km.init_centers_)[1].astype(np.float64).sum())
        lloyd = [r for r in km.history_ if r["kind"] == "lloyd"]
        result = {"bench": "federated-feddp", "unit": args.privacy_unit, "server_data": args.server_data,
                  "k": k, "d": d, "seed": seed,
                  "init": init_kind, "rounds": rounds, "inertia_ratio": inertia / ref,
                  "init_ratio": init_inertia / ref, "epsilon_spent": km.privacy_spent_["epsilon"],
                  "epsilon_per_round": lloyd[0]["privacy"]["epsilon"],
                  "clip_norm": privacy["clip_norm"], "count_clip": privacy.get("count_clip"), "seconds": seconds}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def record_feddp(args: argparse.Namespace, results: list[dict]) -> None:
    header = ["unit", "d", "seed", "init", "DP rounds", "inertia / centralised non-private", "init / centralised",
              "epsilon of one round", "epsilon total (delta 1e-6)", "target (FedDP-KMeans, client-level)"]
    table = [[r["unit"], r["d"], r["seed"], r["init"], r["rounds"], f"{r['inertia_ratio']:.4f}",
              f"{r['init_ratio']:.4f}", f"{r['epsilon_per_round']:.3f}", f"{r['epsilon_spent']:.3f}", "<= 1.10"]
             for r in results]
    print("\n".join(" | ".join(map(str, row)) for row in [header, *table]))
    if args.record:
        command = f"python benchmarks/federated.py {' '.join(sys.argv[1:])}"
        if args.privacy_unit == "client":
            clips = sorted({round(r["clip_norm"], 1) for r in results})
            unit = (f"client-level DP (privacy.unit client: a client's centred per-cluster sums and counts scaled "
                    f"by one factor to clip_norm 2 sqrt(m s2) = {clips[0]}-{clips[-1]} and count_clip m / sqrt(k) = "
                    f"{results[0]['count_clip']:.1f}, from the server-side points' spread s2 and the rows per client "
                    "m); server k-means init: k-means of the server-side points (no release, its ratio in the "
                    "init column); candidates: those points weighted by the clients (one counts release)")
        else:
            unit = "data-point-level DP (one row clipped to clip_norm, 1.2 x the largest server-side row norm)"
        server = ("500 server-side rows of the same mixture" if args.server_data == "same" else
                  "FedDP-KMeans's server data: 20 rows of each component and 100 uniform over their box")
        append_section(f"Federated DP in FedDP-KMeans's data shape: 100 clients x 1,000 rows, total epsilon 1 "
                       f"({args.privacy_unit}-level, server data: {args.server_data})", header, table,
                       f"k 10 Gaussian mixture, d {results[0]['d']}; {server}; {unit}. Secure aggregation, Gaussian "
                       "counts, count_share 0.2. "
                       f"In-process clients; {sum(r['seconds'] for r in results):.0f} s of fitting in all; "
                       f"`{command}`. Python {platform.python_version()}.")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


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
    parser.add_argument("--sweep", action="store_true", help="the one_shot / rounds sweep (in-process, no Ray)")
    parser.add_argument("--sweep-k", default="8,64")
    parser.add_argument("--sweep-d", default="8,128")
    parser.add_argument("--sweep-partitions", default="2,32")
    parser.add_argument("--sweep-seeds", default="0,1,2,3,4")
    parser.add_argument("--scale", default="", help="virtual client counts, comma-separated")
    parser.add_argument("--feddp", action="store_true", help="DP in FedDP-KMeans's shape (in-process)")
    parser.add_argument("--feddp-d", type=int, default=10)
    parser.add_argument("--server-data", choices=["same", "paper"], default="same",
                        help="--feddp: 500 server-side rows of the clients' mixture (same), or FedDP-KMeans's: 20 rows "
                             "of each component and 100 uniform over their box (paper)")
    parser.add_argument("--privacy-unit", default="client", choices=("row", "client"),
                        help="--feddp: data-point-level (row) or client-level (client) DP")
    parser.add_argument("--scale-transport", default="in_process", choices=("in_process", "ray"))
    args = parser.parse_args()
    if args.sweep:
        return record_sweep(args, sweep(args))
    if args.scale:
        return record_scale(args, scale(args))
    if args.feddp:
        return record_feddp(args, feddp(args))

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


def record_sweep(args: argparse.Namespace, results: list[dict]) -> None:
    """Per (k, d, partitions, split): the worst inertia ratio over the seeds, and whether it meets the target."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in results:
        cells.setdefault((r["k"], r["d"], r["partitions"], r["split"]), {}).setdefault(r["method"], []).append(
            r["inertia_ratio"])
    header = ["k", "d", "partitions", "split", "one_shot worst / centralised", "rounds worst / centralised",
              "target one_shot", "met"]
    table = []
    for (k, d, p, split), ratios in cells.items():
        target = 1.01 if split == "iid" else 1.03
        worst_one, worst_rounds = max(ratios["one_shot"]), max(ratios["rounds"])
        table.append([k, d, p, split, f"{worst_one:.4f}", f"{worst_rounds:.4f}", f"<= {target}",
                      "yes" if worst_one <= target and worst_rounds <= 1.001 else "no"])
    print("\n".join(" | ".join(map(str, row)) for row in [header, *table]))
    if args.record:
        command = f"python benchmarks/federated.py {' '.join(sys.argv[1:])}"
        append_section("Federated one_shot (k-FED) and rounds vs centralised over separated Gaussian mixtures",
                       header, table, f"Seeds {args.sweep_seeds} (worst shown); `{command}`; in-process clients (no "
                       f"Ray: the algorithms alone). Python {platform.python_version()}.")


def record_scale(args: argparse.Namespace, results: list[dict]) -> None:
    header = ["clients", "transport", "mask degree", "seconds per round", "KiB up per round", "server peak RSS MiB",
              "seconds total"]
    table = [[r["clients"], r["transport"], r["degree"], f"{r['seconds_per_round']:.2f}",
              f"{r['kib_up_per_round']:.0f}", f"{r['server_peak_rss_mb']:.0f}", f"{r['seconds_total']:.1f}"]
             for r in results]
    print("\n".join(" | ".join(map(str, row)) for row in [header, *table]))
    if args.record:
        command = f"python benchmarks/federated.py {' '.join(sys.argv[1:])}"
        append_section("Federated virtual clients: secure federated Lloyd vs the client count", header, table,
                       f"k 8, d 8, 10 rows per client, 250 clients per host, 3 rounds; `{command}`. Python "
                       f"{platform.python_version()}.")


if __name__ == "__main__":
    main()
