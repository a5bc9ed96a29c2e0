"""Ray job entry point for the training stage: `ray job submit -- python -m jobs.train_encoder --config C --out RUN`.

Writes RUN/model/ (and RUN/config.yaml, which the later stage jobs read).
"""

from __future__ import annotations

import sys

from jobs._common import parser, run_job


def main(argv: list[str] | None = None) -> int:
    args = parser("train_encoder", __doc__).parse_args(argv)

    def job() -> dict:
        from engine import storage
        from engine.config import load_config
        from engine.pipeline import open_input, train_stage
        from engine.progress import JsonProgress
        from engine.rundir import check_output, guard_output, open_run_dir, run_dir_for
        from engine.runtime import init_ray

        cfg = load_config(args.config, args.overrides)
        location = run_dir_for(cfg, args.out)
        output = check_output(cfg, location, overwrite=args.overwrite, resume_command=None)  # first: no torch import
        open_input(cfg)  # file, column and k checks before Ray starts
        # [1] Inside `ray job submit`, RAY_ADDRESS is set: init_ray joins that cluster, not a new one.
        res = init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
        # [2] Ray Train's workers run on the cluster's nodes: the run directory must be one they all see.
        with guard_output(output, resumable=False), open_run_dir(location, cfg.ray, nodes=res.worker_nodes) as run:
            train_stage(cfg, run, JsonProgress(sys.stdout))
        return {"run_dir": str(location), "model": storage.join(location, "model")}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
