"""The clustering methods and what each leaves: the one registry that the config, the cluster stage and
assignment read (no imports, so any module can)."""

# The clustering methods, the one list every module reads: those that leave centroids (each row's label is its
# nearest centroid, so new rows can be assigned without refitting), those fitted on all rows in one process, and
# those that cluster the embeddings where they lie (shard actors, Ray Data) or at a scale where UMAP is no option.
CENTROID_METHODS = ("kmeans", "sharded", "sample_assign", "two_level")
IN_MEMORY_METHODS = ("kmeans", "gmm", "agglomerative", "hdbscan", "dbscan")
NO_MANIFOLD_METHODS = ("sharded", "sample_assign", "two_level")
# DEC / IDEC: the partition whose mean codes are the initial centres, fitted in one process (after the manifold step,
# if any); a method with k clusters, not a density-based one.
REFINE_INIT_METHODS = ("kmeans", "gmm", "agglomerative")
# posterior: each row takes the most probable cluster under the trained model's own q(c|x), for the models that
# have one (a mixture prior); the cluster stage fits nothing.
POSTERIOR_MODELS = ("vade",)
CLUSTER_METHODS = tuple(dict.fromkeys(CENTROID_METHODS + IN_MEMORY_METHODS + ("posterior",)))
