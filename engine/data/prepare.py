"""Write any configured source as input Parquet shards (`id, x, label`), streaming: no process holds it all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data.folders import write_dataset
from engine.data.sources import open_source, read_dataset

STAGE = "input"


def check_prepare_output(data_cfg: Any, out_dir: str | Path, *, overwrite: bool = False) -> None:
    """`out_dir` may take the shards (engine.rundir's output-path policy): new, empty, or with `overwrite` a result
    of the engine; never the source's own files or a folder holding them."""
    from engine.rundir import check_folder_output, input_paths

    check_folder_output(out_dir, overwrite=overwrite, inputs=input_paths(data_cfg))


def prepare_source(data_cfg: Any, out_dir: str | Path, *, config_hash: str = "",
                   overwrite: bool = False) -> dict[str, Any]:
    """Read `data_cfg` (a `data:` section) with Ray Data tasks and write it into `out_dir`, atomically.

    Every shard spec is read (or generated, for blobs) by its own task and written as its own file while
    the next ones are read: memory is bounded by the blocks in flight, not by the data set, so 10M x 64
    blobs stream through a small driver. The folder is a `data.source: parquet` input for later runs.
    Returns the manifest (rows, files, schema). `out_dir` is checked first (`check_prepare_output`).
    """
    check_prepare_output(data_cfg, out_dir, overwrite=overwrite)
    source = open_source(data_cfg)
    ds = read_dataset(source)
    return write_dataset(ds, out_dir, stage=STAGE, config_hash=config_hash, expected_rows=source.n_rows,
                         source=data_cfg.source, dim=source.dim,
                         image_shape=list(source.image_shape) if source.image_shape else None)
