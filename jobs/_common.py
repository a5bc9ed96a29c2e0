"""What the job entry points share: `--config`/`--set` (and the run directory), one-line errors, a JSON result."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from engine.config import PipelineConfig


def parser(name: str, description: str | None, *, config_default: str | None = None,
           run_dir: str = "out") -> argparse.ArgumentParser:
    """`--config` and `--set` for every job; the run directory as `--out` (whole runs, training) or as the
    positional RUN_DIR of a stage that reads an earlier stage's outputs (`run_dir="positional"`)."""
    p = argparse.ArgumentParser(prog=f"python -m jobs.{name}", description=description)
    p.add_argument("--config", default=config_default,
                   help="config file or name in configs/ (default: " + (
                       "the run directory's config.yaml" if run_dir == "positional" else config_default or "digits")
                   + ")")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. cluster.k=12 (repeatable)")
    if run_dir == "positional":
        p.add_argument("run_dir", metavar="RUN_DIR", help="run directory: a shared path or an object store URI")
    else:
        p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the engine's own results in an existing --out; other files are never touched")
    return p


def run_job(job: Callable[[], dict[str, Any]]) -> int:
    """Run `job`, print its result as one JSON line; bad input ends as `error: <message>` and exit code 2, Ctrl-C
    and SIGTERM as `interrupted: ...` and exit code 130 or 143."""
    from engine import interrupt

    interrupt.install()
    try:
        result = job()
    except BaseException as e:
        outcome = interrupt.command_outcome(e)
        if outcome is None:
            raise
        code, line = outcome
        print(line, file=sys.stderr)
        return code
    print(json.dumps(result, default=float))
    return 0


@contextlib.contextmanager
def stage_run(run_dir: str, config: str | None, overrides: list[str]) -> Iterator[tuple[PipelineConfig, Any]]:
    """The config (the run's own unless --config) and the checked run directory of a stage job, on Ray."""
    from engine.config import load_config
    from engine.rundir import check_run_writable, load_run_config, open_run_dir
    from engine.runtime import init_ray

    cfg = load_config(config, overrides) if config else load_run_config(run_dir, overrides)
    check_run_writable(run_dir)
    # [1] Inside `ray job submit`, RAY_ADDRESS is set: init_ray joins that cluster, not a new one.
    res = init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
    # [2] The run directory must be one every node sees; an object-store one is staged and published here.
    with open_run_dir(run_dir, cfg.ray, nodes=res.worker_nodes, fetch=True) as run:
        yield cfg, run
