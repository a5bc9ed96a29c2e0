"""Ray job entry point for the whole pipeline: `ray job submit -- python -m jobs.pipeline --config CONFIG`."""

from __future__ import annotations

import argparse
import json
import sys

from engine.config import load_config
from engine.errors import find_engine_error, user_message
from engine.pipeline import config_for_resume, run_pipeline
from engine.progress import JsonProgress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__)
    parser.add_argument("--config", default=None, help="config file or name in configs/ (default: digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. cluster.k=12 (repeatable)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue a killed run with its saved config; finished stages are skipped")
    args = parser.parse_args(argv)
    try:
        if args.resume:
            cfg = config_for_resume(args.resume, overrides=args.overrides, config=args.config, out=args.out)
        else:
            cfg = load_config(args.config, args.overrides)
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: run_pipeline joins that cluster, not a new one.
        # [2] Training (Ray Train), embedding and assignment (Ray Data) are scheduled on the cluster.
        result = run_pipeline(cfg, args.resume or args.out, progress=JsonProgress(sys.stdout),
                              resume=bool(args.resume))
    except Exception as e:
        err = find_engine_error(e)
        if err is None:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": str(result.run_dir), "metrics": result.metrics, "seconds": result.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
