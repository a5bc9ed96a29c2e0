"""Ray job entry point for the whole pipeline: `ray job submit -- python -m jobs.pipeline --config CONFIG`."""

from __future__ import annotations

import sys

from jobs._common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = parser("pipeline", __doc__).parse_args(argv)

    def job() -> dict:
        from engine.config import load_config
        from engine.pipeline import run_pipeline
        from engine.progress import JsonProgress

        cfg = load_config(args.config, args.overrides)
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: run_pipeline joins that cluster, not a new one.
        # [2] Training (Ray Train), embedding and assignment (Ray Data) are scheduled on the cluster.
        result = run_pipeline(cfg, args.out, progress=JsonProgress(sys.stdout))
        return {"run_dir": str(result.run_dir), "metrics": result.metrics, "seconds": result.seconds}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
