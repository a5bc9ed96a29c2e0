"""Ray job entry point for the whole pipeline: `ray job submit -- python -m jobs.pipeline --config CONFIG`."""

from __future__ import annotations

import sys

from jobs._common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    p = parser("pipeline", __doc__)
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run with its saved config; finished stages are skipped")
    args = p.parse_args(argv)

    def job() -> dict:
        from engine.config import load_config
        from engine.pipeline import config_for_resume, run_pipeline
        from engine.progress import JsonProgress

        if args.resume:
            cfg = config_for_resume(args.resume, overrides=args.overrides, config=args.config, out=args.out)
        else:
            cfg = load_config(args.config, args.overrides)
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: run_pipeline joins that cluster, not a new one.
        # [2] Training (Ray Train), embedding and assignment (Ray Data) are scheduled on the cluster.
        result = run_pipeline(cfg, args.resume or args.out, progress=JsonProgress(sys.stdout),
                              resume=bool(args.resume), overwrite=args.overwrite)
        return {"run_dir": str(result.run_dir), "metrics": result.metrics, "seconds": result.seconds}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
