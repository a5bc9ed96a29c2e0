"""Ray job entry point for semantic deduplication: `ray job submit -- python -m jobs.dedup EMBEDDINGS --out DIR`.

Writes DIR/kept/, DIR/duplicates/, DIR/summary.json; a resubmitted job continues from the finished clusters.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import run_job


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs.dedup", description=__doc__)
    p.add_argument("embeddings", help="Parquet embeddings: a run's embeddings/, a folder, file, glob or URI")
    p.add_argument("--out", required=True)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--probes", type=int, default=5,  # = engine.curate.dedup.DEFAULT_PROBES
                   help="at most this many clusters each row is compared in (1: its own only)")
    p.add_argument("--keep", default="hard", choices=["hard", "easy", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--column", default="z")
    p.add_argument("--id-column", default="id")
    p.add_argument("--state-dir", default=None,
                   help="local folder for the unfinished run's state; on a cluster, one every node mounts")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    def job() -> dict:
        from engine.curate import dedup
        from engine.runtime import curation_cpus, init_ray

        init_ray(num_cpus=curation_cpus())  # [1] join the job's cluster (RAY_ADDRESS) or start a local Ray
        # [2] validation, k-means, assignment and the within-cluster pass are Ray tasks; the driver holds ids only.
        return dedup(args.embeddings, args.out, eps=args.eps, k=args.k, probes=args.probes, keep=args.keep,
                     seed=args.seed, column=args.column, id_column=args.id_column, overwrite=args.overwrite,
                     state_dir=args.state_dir,
                     on_progress=lambda stage, info: print({"stage": stage, **info}, flush=True))

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
