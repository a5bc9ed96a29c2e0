"""Clustering: k-means estimators built on one Lloyd-step reduction that every mode shares, and the
in-memory methods beyond k-means (Gaussian mixture, Ward, HDBSCAN, DBSCAN) with an optional UMAP step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.lazy import lazy_attributes

if TYPE_CHECKING:
    from engine.cluster._in_memory import check_sizes, cluster_means, fit_labels
    from engine.cluster._kmeans import KMeans
    from engine.cluster._sample_assign import fit_sample_then_assign
    from engine.cluster._shard_actors import ShardActor
    from engine.cluster._sharded_kmeans import ShardedKMeans
    from engine.cluster._stats import PartialStats, assign, kmeans_plusplus, partial_stats, stats_from_assignment
    from engine.cluster._two_level import TwoLevelKMeans

# Each name is imported from its module on first use (PEP 562): a federated client that needs only the Lloyd
# statistics (torch) then skips scikit-learn, SciPy's optimisers and Ray, which a Flower SuperNode would otherwise
# import again in the fresh process it starts for every message.
_WHERE = {
    "check_sizes": "_in_memory", "cluster_means": "_in_memory", "fit_labels": "_in_memory",
    "KMeans": "_kmeans",
    "fit_sample_then_assign": "_sample_assign",
    "ShardActor": "_shard_actors",
    "ShardedKMeans": "_sharded_kmeans",
    "PartialStats": "_stats", "assign": "_stats", "kmeans_plusplus": "_stats", "partial_stats": "_stats",
    "stats_from_assignment": "_stats",
    "TwoLevelKMeans": "_two_level",
}

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


__getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
