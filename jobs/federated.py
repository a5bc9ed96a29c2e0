"""Ray job entry point for federated k-means: `ray job submit -- python -m jobs.federated --config CONFIG`."""

from __future__ import annotations

import argparse
import json
import sys

from engine.config import load_config
from engine.errors import find_engine_error, user_message
from engine.federated.run import run_federated
from engine.progress import JsonProgress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.federated", description=__doc__)
    parser.add_argument("--config", default="federated", help="config file or name in configs/ (default: federated)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. federated.mode=one_shot (repeatable)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: run_federated joins that cluster, not a new one.
        # [2] One client actor per partition, pinned by `partition:<name>` resources when federated.placement asks.
        result = run_federated(cfg, args.out, progress=JsonProgress(sys.stdout))
    except Exception as e:
        err = find_engine_error(e)
        if err is None:
            raise
        print(f"error: {user_message(err)}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": str(result.run_dir), "summary": result.summary}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
