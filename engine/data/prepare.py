"""Write any configured source as input Parquet shards (`id, x, label`), streaming: no process holds it all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.data.shards import write_dataset
from engine.data.sources import open_source, read_dataset

STAGE = "input"


def prepare_source(data_cfg: Any, out_dir: str | Path, *, config_hash: str = "") -> dict[str, Any]:
    """Read `data_cfg` (a `data:` section) with Ray Data tasks and write it into `out_dir`, atomically.

    Every shard spec is read (or generated, for blobs) by its own task and written as its own file while
    the next ones are read: memory is bounded by the blocks in flight, not by the data set, so 10M x 64
    blobs stream through a small driver. The folder is a `data.source: parquet` input for later runs.
    Returns the manifest (rows, files, schema).
    """
    source = open_source(data_cfg)
    ds = read_dataset(source)
    return write_dataset(ds, out_dir, stage=STAGE, config_hash=config_hash, expected_rows=source.n_rows,
                         source=data_cfg.source, dim=source.dim,
                         image_shape=list(source.image_shape) if source.image_shape else None)
