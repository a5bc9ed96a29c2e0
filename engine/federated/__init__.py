"""Federated k-means: partitions clustered where they live, only centroids, counts and sums aggregated."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_attributes

if TYPE_CHECKING:
    from engine.federated.client import FederatedClient, Release
    from engine.federated.partitions import (
        ParquetPartition,
        label_counts,
        partitions_from_column,
        partitions_from_folders,
        read_partition,
        split_indices,
    )
    from engine.federated.privacy import Accountant, Noise
    from engine.federated.server import FederatedKMeans
    from engine.federated.transport import QuorumError

# Imported on first use (PEP 562): a Flower SuperNode starts a fresh process for every message, and its ClientApp
# needs the client side only, not the server's scikit-learn estimator or the privacy accountant.
_WHERE = {
    "FederatedClient": "client", "Release": "client",
    "ParquetPartition": "partitions", "label_counts": "partitions", "partitions_from_column": "partitions",
    "partitions_from_folders": "partitions", "read_partition": "partitions", "split_indices": "partitions",
    "Accountant": "privacy", "Noise": "privacy",
    "FederatedKMeans": "server",
    "QuorumError": "transport",
}

__all__ = [
    "Accountant",
    "FederatedClient",
    "FederatedKMeans",
    "Noise",
    "ParquetPartition",
    "QuorumError",
    "Release",
    "label_counts",
    "partitions_from_column",
    "partitions_from_folders",
    "read_partition",
    "split_indices",
]


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
