"""Ray job entry point for the clustering stage: `ray job submit -- python -m jobs.cluster RUN_DIR`.

Reads RUN_DIR/embeddings/, writes centroids.npy, cluster.json and assignments/, then evaluates into metrics.json.
"""

from __future__ import annotations

import sys

from jobs._common import parser, run_job, stage_run


def main(argv: list[str] | None = None) -> int:
    args = parser("cluster", __doc__, run_dir="positional").parse_args(argv)

    def job() -> dict:
        from engine.pipeline import cluster_stage, evaluate_stage
        from engine.progress import JsonProgress

        progress = JsonProgress(sys.stdout)
        with stage_run(args.run_dir, args.config, args.overrides) as (cfg, run):
            # [3] cluster.method picks where k-means runs: in the driver, over shard actors, or sample + Ray Data.
            summary = cluster_stage(cfg, run, progress)
            metrics = evaluate_stage(cfg, run, progress)
        return {"run_dir": args.run_dir, "cluster": {k: v for k, v in summary.items() if k != "history"},
                "metrics": metrics}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
