"""Input sources, the shard schema and atomic result folders."""

from engine.data.shards import read_manifest, read_shards, read_table, staged_folder, write_dataset
from engine.data.sources import SOURCES, Source, open_source, read_dataset, read_shard

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
