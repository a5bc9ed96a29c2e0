"""Clustering: k-means estimators built on one Lloyd-step reduction that every mode shares."""

from engine.cluster._kmeans import KMeans
from engine.cluster._sharded import ShardActor, ShardedKMeans, fit_sample_then_assign
from engine.cluster._stats import PartialStats, assign, kmeans_plusplus, partial_stats, stats_from_assignment
from engine.cluster._two_level import TwoLevelKMeans

__all__ = [
    "KMeans",
    "PartialStats",
    "ShardActor",
    "ShardedKMeans",
    "TwoLevelKMeans",
    "assign",
    "fit_sample_then_assign",
    "kmeans_plusplus",
    "partial_stats",
    "stats_from_assignment",
]
