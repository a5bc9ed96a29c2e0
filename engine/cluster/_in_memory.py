"""Clustering beyond k-means for embeddings held in memory: Gaussian mixture, Ward, HDBSCAN, DBSCAN.

`fit_labels(z, cfg.cluster, seed)` is what the pipeline calls: the optional manifold step (UMAP), then the
configured method, giving one label per row (int32, -1 = noise for the density-based methods). The
centroids and distances the assignments carry are then computed in the latent space by `cluster_means`,
the same way for every method, so `distance` and `inertia` compare across methods.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import ConfigError, DataError
from engine.methods import IN_MEMORY_METHODS
from engine.metrics import NOISE

if TYPE_CHECKING:  # engine.config needs pydantic, which k-means alone does not (benchmarks/gpu.py runs without it)
    from engine.config import ClusterConfig

# Ward on the points keeps a condensed n x n distance matrix (float64): 20,000 rows are 1.6 GB.
WARD_MAX_ROWS = 20_000
DBSCAN_MIN_SAMPLES = 5  # scikit-learn's default


def fit_labels(z: np.ndarray, cfg: ClusterConfig, seed: int = 0, *,
               ray_tasks: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Labels (n,) int32 of every row of z for `cfg.method` after `cfg.manifold`, and facts about the fit.

    Cluster labels are 0..n_clusters-1 with no gaps (a Gaussian component that wins no row is dropped);
    noise is -1. The facts (a JSON-able dict) hold n_clusters, n_noise, noise_fraction, seconds, and the
    method's own figures (gmm: converged, n_iter, lower_bound, bic; agglomerative: micro_clusters).
    `ray_tasks` False runs every UMAP layout in this process even where Ray is up (a caller holding the CPUs).
    """
    if cfg.method not in IN_MEMORY_METHODS:
        raise ConfigError(f"cluster.method={cfg.method} is not an in-memory method ({', '.join(IN_MEMORY_METHODS)})")
    z = np.ascontiguousarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[0] == 0:
        raise DataError(f"expected a non-empty (rows, dims) matrix of embeddings, got shape {z.shape}")
    n = z.shape[0]
    check_sizes(cfg, n)
    info: dict[str, Any] = {"method": cfg.method, "manifold": cfg.manifold}
    fit = {"kmeans": _kmeans, "gmm": _gmm, "agglomerative": _agglomerative, "hdbscan": _hdbscan,
           "dbscan": _dbscan}[cfg.method]
    if cfg.manifold == "umap":
        labels, method_info, info["umap"], fit_seconds = _umap_then_fit(z, cfg, fit, seed, ray_tasks)
    else:
        fit_started = time.perf_counter()
        raw, method_info = fit(z, cfg, seed)
        labels, fit_seconds = _compact(raw), time.perf_counter() - fit_started
    n_noise = int(np.count_nonzero(labels == NOISE))
    info.update(method_info)
    info.update({"n_clusters": int(labels.max()) + 1 if n_noise < n else 0, "n_noise": n_noise,
                 "noise_fraction": n_noise / n, "fit_seconds": round(fit_seconds, 3)})
    return labels, info


def check_sizes(cfg: ClusterConfig, n: int, what: str = "rows") -> None:
    """The cluster settings that depend on the number of rows, checked against it before any work (and, in a
    pipeline, before anything is written): k, the UMAP neighbourhood and dimensions, Ward's size limit,
    HDBSCAN's min_cluster_size. `what` names the rows in the message ("rows", "embeddings")."""
    if cfg.method not in ("hdbscan", "dbscan") and cfg.k > n:
        raise ConfigError(f"cluster.k={cfg.k} should be <= the number of {what} ({n})")
    if cfg.manifold == "umap":
        from engine.cluster._manifold import check_umap_sizes

        check_umap_sizes(n, cfg.umap, cfg.umap.n_components or cfg.k)
    if cfg.method == "agglomerative":
        _check_ward_size(cfg, n)
        if cfg.micro_clusters is not None and cfg.micro_clusters > n:
            raise ConfigError(f"cluster.micro_clusters={cfg.micro_clusters} should be <= the number of {what} "
                              f"({n})")
    if cfg.method == "hdbscan" and cfg.min_cluster_size > n:
        raise ConfigError(f"cluster.min_cluster_size={cfg.min_cluster_size} should be <= the number of {what} "
                          f"({n})")


def size_entropy(labels: np.ndarray) -> float:
    """Entropy (nats) of the cluster-size distribution of labels (noise, -1, left out): log(k) when the k clusters
    are of one size, lower the more uneven they are."""
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels != NOISE]).astype(np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1.0)
    return float(-(p * np.log(p)).sum())


def consensus_scores(partitions: list[np.ndarray]) -> list[float]:
    """Each partition's mean normalised mutual information (arithmetic normalisation) to the other partitions of
    the same rows: the member of a cluster ensemble with the highest score is the one nearest the ensemble's
    consensus (Strehl & Ghosh 2002). Noise (-1) counts as one more cluster. One partition scores 1."""
    from sklearn.metrics import normalized_mutual_info_score

    m = len(partitions)
    if m == 1:
        return [1.0]
    pair = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            pair[i, j] = pair[j, i] = normalized_mutual_info_score(partitions[i], partitions[j])
    return (pair.sum(axis=1) / (m - 1)).tolist()


def _umap_then_fit(z: np.ndarray, cfg: ClusterConfig, fit, seed: int, ray_tasks: bool = True):
    """`fit` on UMAP layouts of z: one (seed), or cluster.umap.n_init (seeds seed, seed+1, ...) over one k-NN graph,
    of which one partition is kept by cluster.umap.select (ties: the earliest): the one agreeing best with the
    others (consensus) or the most even in cluster sizes (even). Returns its labels and method facts, the UMAP
    facts (with every layout's scores when there are several) and the seconds spent in `fit`."""
    from engine.cluster._manifold import umap_knn

    u = cfg.umap
    n_components = u.n_components or cfg.k
    started = time.perf_counter()
    knn = umap_knn(z, u, n_components, seed=seed) if u.n_init > 1 else None
    knn_seconds = time.perf_counter() - started
    args = [(u, n_components, seed + i, fit, cfg, seed) for i in range(u.n_init)]
    on_ray = ray_tasks and u.n_init > 1 and _ray_is_up()
    if on_ray:
        # Each layout is single-threaded (seeded): the first here, each other one in a Ray task meanwhile, on
        # whatever CPUs the cluster has; each is the computation this process would make (the same rows, graph and
        # seeds, so the same partitions).
        import ray

        from engine.runtime import cancel_running

        task = ray.remote(num_cpus=1)(_layout)
        z_ref, knn_ref = ray.put(z), ray.put(knn)
        refs = [task.remote(z_ref, knn_ref, *a) for a in args[1:]]
        try:
            results = [_layout(z, knn, *args[0]), *ray.get(refs)]
        finally:
            cancel_running(refs)  # interrupted, or a layout failed
    else:
        results = [_layout(z, knn, *a) for a in args]
    fits = [(labels, method_info) for labels, method_info, _, _, _ in results]
    fit_seconds = sum(r[3] for r in results)
    info = {**u.model_dump(), "n_components": n_components}
    kept = 0
    if u.n_init > 1:
        info["layouts_ran_in"] = "ray tasks" if on_ray else "this process"
        entropies = [size_entropy(labels) for labels, _ in fits]
        agreement = consensus_scores([labels for labels, _ in fits])
        scores = agreement if u.select == "consensus" else entropies
        kept = int(np.argmax(scores))  # the first of equal scores
        info.update(layouts=[{"seed": seed + i, "size_entropy": e, "agreement": a, "pid": r[4]}
                             for i, (e, a, r) in enumerate(zip(entropies, agreement, results, strict=True))],
                    kept=kept)
    # UMAP's own time: the graph, and each layout's (added up, wherever the layouts ran), without the fits'.
    info["seconds"] = round(knn_seconds + sum(r[2] for r in results), 3)
    info["wall_seconds"] = round(time.perf_counter() - started, 3)
    return fits[kept][0], fits[kept][1], info, fit_seconds


def _layout(z: np.ndarray, knn: tuple | None, u, n_components: int, layout_seed: int, fit, cfg: ClusterConfig,
            seed: int) -> tuple[np.ndarray, dict[str, Any], float, float, int]:
    """One UMAP layout of z (seed `layout_seed`, over the graph `knn`) and `fit` on it: (labels 0..n-1 and -1,
    the method's facts, UMAP's seconds, the fit's seconds, the id of the process it ran in)."""
    import os

    from engine.cluster._manifold import umap_reduce

    started = time.perf_counter()
    # From Ray's object store the arrays are read-only views, and umap-learn writes into its inputs.
    z = z if z.flags.writeable else z.copy()
    knn = None if knn is None else tuple(a if a.flags.writeable else a.copy() for a in knn)
    x = umap_reduce(z, u, n_components, seed=layout_seed, knn=knn)
    fit_started = time.perf_counter()
    raw, method_info = fit(x, cfg, seed)
    return _compact(raw), method_info, fit_started - started, time.perf_counter() - fit_started, os.getpid()


def _ray_is_up() -> bool:
    """Ray is initialised in this process (the pipeline's driver, or a Ray worker): never started here for this."""
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def cluster_means(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (n_clusters, d) float32 = the mean row of each cluster, and each row's Euclidean distance
    (float32) to its cluster's centroid; NaN for noise, which belongs to no cluster."""
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels)
    kept = labels != NOISE
    k = int(labels[kept].max()) + 1 if kept.any() else 0
    counts = np.bincount(labels[kept], minlength=k).astype(np.float64)
    if k and (counts == 0).any():
        raise DataError(f"cluster {int(np.flatnonzero(counts == 0)[0])} has no rows; labels must be 0..k-1")
    sums = np.zeros((k, z.shape[1]))
    np.add.at(sums, labels[kept], z[kept])
    centroids = sums / np.maximum(counts, 1)[:, None]
    distance = np.full(len(labels), np.nan, dtype=np.float32)
    distance[kept] = np.linalg.norm(z[kept] - centroids[labels[kept]], axis=1)
    return centroids.astype(np.float32), distance


# ---- the methods: (x, cfg, seed) -> (labels with -1 for noise, facts) -------------------------------


def _kmeans(x: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from engine.cluster._kmeans import KMeans

    km = KMeans(n_clusters=cfg.k, init=cfg.init, n_init=cfg.n_init, max_iter=cfg.max_iter, tol=cfg.tol, seed=seed,
                backend=cfg.backend).fit(x)
    return km.labels_, {"n_iter": int(km.n_iter_), "fitted_inertia": float(km.inertia_)}


def _gmm(x: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=cfg.k, covariance_type=cfg.covariance_type, tol=cfg.tol,
                         max_iter=cfg.max_iter, n_init=cfg.n_init, random_state=seed)
    # fit_predict, not fit then predict: its labels agree with the final EM step.
    labels = gm.fit_predict(x)
    return labels, {"covariance_type": cfg.covariance_type, "converged": bool(gm.converged_),
                    "n_iter": int(gm.n_iter_), "lower_bound": float(gm.lower_bound_), "bic": float(gm.bic(x))}


def _agglomerative(x: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.cluster import AgglomerativeClustering

    ward = AgglomerativeClustering(n_clusters=cfg.k, linkage="ward")
    if cfg.micro_clusters is None:
        return ward.fit_predict(x), {"linkage": "ward", "micro_clusters": None}
    from engine.cluster._kmeans import KMeans

    if cfg.micro_clusters > x.shape[0]:
        raise ConfigError(f"cluster.micro_clusters={cfg.micro_clusters} should be <= the number of rows "
                          f"({x.shape[0]})")
    # Ward merges the micro-cluster centroids unweighted: each micro-cluster counts once, whatever its size.
    micro = KMeans(n_clusters=cfg.micro_clusters, n_init=1, max_iter=cfg.max_iter, tol=cfg.tol, seed=seed,
                   backend=cfg.backend).fit(x)
    merged = ward.fit_predict(micro.cluster_centers_)
    return merged[micro.labels_], {"linkage": "ward", "micro_clusters": cfg.micro_clusters}


def _hdbscan(x: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(min_cluster_size=cfg.min_cluster_size, min_samples=cfg.min_samples, copy=False).fit_predict(x)
    return labels, {"min_cluster_size": cfg.min_cluster_size, "min_samples": cfg.min_samples}


def _dbscan(x: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.cluster import DBSCAN

    min_samples = cfg.min_samples or DBSCAN_MIN_SAMPLES
    labels = DBSCAN(eps=cfg.eps, min_samples=min_samples).fit_predict(x)
    return labels, {"eps": cfg.eps, "min_samples": min_samples}


def _check_ward_size(cfg: ClusterConfig, n: int) -> None:
    if cfg.micro_clusters is None and n > WARD_MAX_ROWS:
        raise ConfigError(
            f"cluster.method=agglomerative on {n} rows: Ward on the points needs O(n^2) memory and is refused "
            f"above {WARD_MAX_ROWS} rows; set cluster.micro_clusters (e.g. {10 * cfg.k} = 10*k) to run Ward on "
            "the centroids of a k-means over-clustering"
        )


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..m-1 in their sorted order, without gaps (noise stays -1), as int32."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, NOISE, dtype=np.int32)
    kept = labels != NOISE
    _, out[kept] = np.unique(labels[kept], return_inverse=True)
    return out
