"""Ray job entry point for the embedding stage: `ray job submit -- python -m jobs.embed RUN_DIR`.

Reads RUN_DIR/model/ (refined/ for dec / idec), writes RUN_DIR/embeddings/.
"""

from __future__ import annotations

import sys

from jobs._common import parser, run_job, stage_run


def main(argv: list[str] | None = None) -> int:
    args = parser("embed", __doc__, run_dir="positional").parse_args(argv)

    def job() -> dict:
        from engine.pipeline import embed_stage
        from engine.progress import JsonProgress

        with stage_run(args.run_dir, args.config, args.overrides) as (cfg, run):
            # [3] A Ray Data actor pool of embed.concurrency encoders streams the input into Parquet shards.
            manifest = embed_stage(cfg, run, JsonProgress(sys.stdout))
        return {"run_dir": args.run_dir, "rows": manifest["rows"], "latent_dim": manifest["latent_dim"]}

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
