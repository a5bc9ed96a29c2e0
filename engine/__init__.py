"""Deep Cluster Engine: train an encoder, embed, cluster and evaluate at scale on Ray."""

from __future__ import annotations

from typing import Any

from engine.errors import CheckpointError, ConfigError, DataError, EngineError, IncompleteResultError
from engine.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EngineError",
    "IncompleteResultError",
    "KMeans",
    "__version__",
    "load_run",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import engine` (and the CLI's --help) stays fast.
    if name == "KMeans":
        from engine.cluster import KMeans

        return KMeans
    if name == "load_run":
        from engine.predict import load_run

        return load_run
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
