"""The default `dce run` (digits) over several seeds, beside k-means on the raw pixels, in one Ray session."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import append_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=None, help="config (default: configs/digits.yaml)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.datasets import load_digits
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from engine.config import load_config
    from engine.metrics import clustering_accuracy
    from engine.pipeline import run_pipeline
    from engine.runtime import init_ray

    init_ray()
    results = []
    for seed in range(args.seeds):
        # Peer: scikit-learn k-means on the raw pixels (the same /16 scaling), same k and restarts.
        x, y = load_digits(return_X_y=True)
        cfg = load_config(args.config, [*args.overrides, f"seed={seed}"])
        t0 = time.perf_counter()
        pred = SKKMeans(cfg.cluster.k, n_init=cfg.cluster.n_init, random_state=seed).fit_predict(x / 16.0)
        peer = {"bench": "pipeline_digits", "impl": "sklearn_kmeans_pixels", "seed": seed,
                "acc": clustering_accuracy(y, pred), "nmi": normalized_mutual_info_score(y, pred),
                "ari": adjusted_rand_score(y, pred), "seconds": time.perf_counter() - t0}
        print(json.dumps(peer), flush=True)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = run_pipeline(cfg, Path(out) / "run")
            seconds = time.perf_counter() - t0
        steps = [cfg.model.name, *([cfg.cluster.manifold] if cfg.cluster.manifold != "none" else []),
                 cfg.cluster.method]
        ours = {"bench": "pipeline_digits", "impl": "dce " + " + ".join(steps), "seed": seed,
                "epochs": cfg.train.epochs, "workers": cfg.train.num_workers, "seconds": seconds,
                "stage_seconds": result.seconds, **{k: result.metrics[k] for k in ("acc", "nmi", "ari")},
                "acc_ratio_to_peer": result.metrics["acc"] / peer["acc"]}
        print(json.dumps(ours), flush=True)
        results.append((peer, ours))

    if args.record:
        def stat(rows, key):
            v = np.array([r[key] for r in rows])
            return f"{v.mean():.3f} ± {v.std():.3f}"

        peers, ours = [p for p, _ in results], [o for _, o in results]
        rows = [
            ["k-means on pixels (scikit-learn)", stat(peers, "acc"), stat(peers, "nmi"), stat(peers, "ari"),
             "-", f"{np.mean([p['seconds'] for p in peers]):.1f}"],
            [f"dce run: {ours[0]['impl']}, {ours[0]['workers']} Ray Train workers", stat(ours, "acc"),
             stat(ours, "nmi"), stat(ours, "ari"), ours[0]["epochs"], f"{np.mean([o['seconds'] for o in ours]):.1f}"],
        ]
        append_section(f"Digits pipeline (`dce run {args.config or ''}`), seeds 0..{args.seeds - 1}",
                       ["method", "ACC", "NMI", "ARI", "epochs", "seconds (mean, whole pipeline)"], rows,
                       notes="Seconds for `dce run` include Ray Train start-up, embedding and assignment "
                             "through Ray Data; the Ray session is started once, before the first seed.")


if __name__ == "__main__":
    main()
