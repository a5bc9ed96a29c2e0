"""Input sources, the shard schema and atomic result folders."""

from typing import Any

from engine.data.folders import read_manifest, read_shards, read_table, staged_folder, write_dataset

__all__ = [
    "SOURCES",
    "Source",
    "open_source",
    "read_dataset",
    "read_manifest",
    "read_shard",
    "read_shards",
    "read_table",
    "staged_folder",
    "write_dataset",
]

_SOURCES = ("SOURCES", "Source", "open_source", "read_dataset", "read_shard")


def __getattr__(name: str) -> Any:
    # The sources are imported on first use: they take their settings from the pydantic configs, which
    # what only needs shards (the k-means and the training loop, run alone by benchmarks/gpu.py) does not.
    if name in _SOURCES:
        from engine.data import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
