"""Ray job entry point for cluster-balanced sampling: `ray job submit -- python -m jobs.sample EMBEDDINGS --out DIR
--n N`. Writes DIR/sampled/, DIR/hierarchy/, DIR/summary.json.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.sample", description=__doc__)
    p.add_argument("embeddings", help="Parquet embeddings: a run's embeddings/, a folder, file, glob or URI")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--k", default=None, help="clusters per level, bottom up: 1000,200,40")
    p.add_argument("--strategy", default="random", choices=["random", "closest"])
    p.add_argument("--resample-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--column", default="z")
    p.add_argument("--id-column", default="id")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    def job() -> dict:
        from engine.curate import sample
        from engine.runtime import curation_cpus, init_ray

        init_ray(num_cpus=curation_cpus())  # [1] join the job's cluster (RAY_ADDRESS) or start a local Ray
        ks = None if args.k is None else [int(v) for v in args.k.split(",")]
        # [2] the hierarchy is fit in one Ray task; assignment and the draws are one Ray task per Parquet piece.
        return sample(args.embeddings, args.out, n=args.n, levels=args.levels, k=ks, strategy=args.strategy,
                      resample_steps=args.resample_steps, seed=args.seed, column=args.column,
                      id_column=args.id_column, overwrite=args.overwrite)

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
