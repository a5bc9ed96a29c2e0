"""Ray job entry point for federated k-means: `ray job submit -- python -m jobs.federated --config CONFIG`."""

from __future__ import annotations

import sys

from jobs._common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = parser("federated", __doc__, config_default="federated").parse_args(argv)

    def job() -> dict:
        from engine.config import load_config
        from engine.federated.run import run_federated
        from engine.progress import JsonProgress

        cfg = load_config(args.config, args.overrides)
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: run_federated joins that cluster, not a new one.
        # [2] One client actor per partition, pinned by `partition:<name>` resources when federated.placement asks.
        result = run_federated(cfg, args.out, progress=JsonProgress(sys.stdout), overwrite=args.overwrite)
        return {"run_dir": str(result.run_dir), "summary": result.summary}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
