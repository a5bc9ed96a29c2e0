"""Clustering: k-means estimators built on one Lloyd-step reduction that every mode shares, and the
in-memory methods beyond k-means (Gaussian mixture, Ward, HDBSCAN, DBSCAN) with an optional UMAP step."""

from engine.cluster._in_memory import check_sizes, cluster_means, fit_labels
from engine.cluster._kmeans import KMeans
from engine.cluster._sample_assign import fit_sample_then_assign
from engine.cluster._shard_actors import ShardActor
from engine.cluster._sharded_kmeans import ShardedKMeans
from engine.cluster._stats import PartialStats, assign, kmeans_plusplus, partial_stats, stats_from_assignment
from engine.cluster._two_level import TwoLevelKMeans

__all__ = [
    "KMeans",
    "PartialStats",
    "ShardActor",
    "ShardedKMeans",
    "TwoLevelKMeans",
    "assign",
    "check_sizes",
    "cluster_means",
    "fit_labels",
    "fit_sample_then_assign",
    "kmeans_plusplus",
    "partial_stats",
    "stats_from_assignment",
]
