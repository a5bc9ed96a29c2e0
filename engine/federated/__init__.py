"""Federated k-means: partitions clustered where they live, only centroids, counts and sums aggregated."""

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
