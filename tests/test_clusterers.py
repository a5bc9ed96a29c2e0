"""Clustering beyond k-means (gmm, Ward, HDBSCAN, DBSCAN), the UMAP step, noise, and the pipeline with them."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from engine.cluster import KMeans, cluster_means, fit_labels
from engine.cluster._in_memory import WARD_MAX_ROWS, size_entropy
from engine.config import ClusterConfig, check_installed, config_from_dict
from engine.errors import ConfigError
from engine.metrics import evaluate

HAS_UMAP = importlib.util.find_spec("umap") is not None


@pytest.fixture(scope="module")
def blobs():
    """Four well separated blobs in 5-D, 300 rows."""
    x, y = make_blobs(n_samples=300, n_features=5, centers=4, cluster_std=0.6, center_box=(-10, 10), random_state=3)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def blobs_and_outlier(blobs):
    """The blobs and one row far from all of them, last."""
    x, y = blobs
    return np.vstack([x, np.full((1, x.shape[1]), 100.0, dtype=np.float32)]), np.append(y, 4)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "gmm"},
        {"method": "gmm", "covariance_type": "diag", "n_init": 1},
        {"method": "agglomerative"},
        {"method": "agglomerative", "micro_clusters": 40},
        {"method": "hdbscan", "min_cluster_size": 20},
        {"method": "dbscan", "eps": 1.5},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_each_method_recovers_the_blobs(blobs, settings):
    x, y = blobs
    labels, info = fit_labels(x, ClusterConfig(k=4, **settings), seed=0)
    assert labels.dtype == np.int32 and labels.shape == (len(x),)
    assert adjusted_rand_score(y, labels) > 0.9
    assert info["n_clusters"] == 4 and info["noise_fraction"] < 0.05
    assert set(np.unique(labels[labels >= 0])) == {0, 1, 2, 3}


def test_gmm_is_seeded(blobs):
    x, _ = blobs
    cfg = ClusterConfig(k=4, method="gmm", n_init=1)
    a, info = fit_labels(x, cfg, seed=1)
    np.testing.assert_array_equal(a, fit_labels(x, cfg, seed=1)[0])
    assert info["converged"] and np.isfinite(info["bic"])


@pytest.mark.parametrize("settings", [{"method": "hdbscan", "min_cluster_size": 20},
                                      {"method": "dbscan", "eps": 1.5}], ids=["hdbscan", "dbscan"])
def test_density_methods_label_a_far_outlier_noise(blobs_and_outlier, settings):
    x, y = blobs_and_outlier
    labels, info = fit_labels(x, ClusterConfig(k=4, **settings), seed=0)
    assert labels[-1] == -1
    assert info["n_noise"] == np.count_nonzero(labels == -1) >= 1
    assert info["noise_fraction"] == pytest.approx(info["n_noise"] / len(x))
    assert adjusted_rand_score(y[:-1], labels[:-1]) > 0.9
    # Noise has no centroid: no distance, and it is left out of the centroids and the inertia.
    centroids, distance = cluster_means(x, labels)
    assert np.isnan(distance[-1]) and np.isfinite(distance[labels >= 0]).all()
    assert centroids.shape == (info["n_clusters"], x.shape[1])
    # Metrics over every row: the outlier counts as wrong for acc, and noise_fraction reports it.
    metrics = evaluate(labels, labels_true=y, X=x)
    assert metrics["noise_fraction"] == pytest.approx(info["noise_fraction"])
    assert metrics["acc"] <= 1 - metrics["noise_fraction"] + 1e-9


def test_agglomerative_over_clustering_maps_micro_labels_to_every_row(blobs):
    x, y = blobs
    labels, info = fit_labels(x, ClusterConfig(k=4, method="agglomerative", micro_clusters=40), seed=5)
    assert info["micro_clusters"] == 40
    assert (labels >= 0).all() and len(labels) == len(x)
    # The same seeded over-clustering: every micro-cluster's rows got one and the same label.
    micro = KMeans(n_clusters=40, n_init=1, max_iter=100, tol=1e-4, seed=5).fit(x).labels_
    for m in np.unique(micro):
        assert len(np.unique(labels[micro == m])) == 1
    assert len(np.unique(micro)) == 40 > len(np.unique(labels)) == 4


def test_ward_on_too_many_points_is_refused_before_any_compute():
    z = np.zeros((WARD_MAX_ROWS + 1, 2), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"Ward on the points .* set cluster.micro_clusters \(e.g. 40 = 10\*k\)"):
        fit_labels(z, ClusterConfig(k=4, method="agglomerative"))


def test_cluster_means_are_the_mean_rows():
    z = np.array([[0, 0], [2, 0], [10, 10], [5, 5]], dtype=np.float32)
    centroids, distance = cluster_means(z, np.array([0, 0, 1, -1]))
    np.testing.assert_allclose(centroids, [[1, 0], [10, 10]])
    np.testing.assert_allclose(distance[:3], [1, 1, 0])
    assert np.isnan(distance[3])


# ---- settings and their errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({"method": "spectral"}, r"'cluster.method': Input should be 'kmeans', .*'posterior' \(got 'spectral'\)"),
        ({"method": "gmm", "covariance_type": "round"}, r"'cluster.covariance_type': Input should be 'full'"),
        ({"manifold": "tsne"}, r"'cluster.manifold': Input should be 'none' or 'umap'"),
        ({"umap": {"n_neighbours": 5}}, r"unknown key 'cluster.umap.n_neighbours'"),
        ({"umap": {"min_dist": -1}}, r"'cluster.umap.min_dist': Input should be greater than or equal to 0"),
        ({"method": "agglomerative", "micro_clusters": 5}, r"cluster.micro_clusters=5 should be >= cluster.k=10"),
        ({"method": "sharded", "manifold": "umap"}, r"cluster.manifold=umap needs an in-memory method"),
        ({"method": "hdbscan", "manifold": "umap", "umap": {"n_init": 3}},
         r"cluster.umap.n_init=3 needs a method with k clusters .*cluster.method=hdbscan chooses its own number"),
        ({"umap": {"n_init": 0}}, r"'cluster.umap.n_init': Input should be greater than or equal to 1"),
        ({"umap": {"select": "best"}}, r"'cluster.umap.select': Input should be 'even' or 'consensus'"),
    ],
)
def test_bad_cluster_settings_name_the_key(cluster, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"cluster": cluster})


def test_k_larger_than_the_data_names_the_key(blobs):
    x, _ = blobs
    with pytest.raises(ConfigError, match=r"cluster.k=10 should be <= the number of rows \(5\)"):
        fit_labels(x[:5], ClusterConfig(k=10, method="gmm"))
    with pytest.raises(ConfigError, match=r"cluster.micro_clusters=400 should be <= the number of rows \(300\)"):
        fit_labels(x, ClusterConfig(k=4, method="agglomerative", micro_clusters=400))


def test_a_missing_extra_names_the_key_and_the_install_command():
    # The path taken when umap-learn is not installed, with a module that is certainly absent.
    with pytest.raises(ConfigError, match=r"^cluster.manifold needs the Python module 'dce_absent_module', "
                                          r"which is not installed; .*pip install 'deep-cluster-engine\[umap\]'$"):
        check_installed("dce_absent_module", extra="umap", key="cluster.manifold")


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_umap_then_gmm_recovers_the_blobs(blobs):
    # The pipeline's N2D default (UMAP + GMM on digits, then HDBSCAN on the same run) is tested through `dce run` in
    # test_pipeline.py::test_default_dce_run_quality_and_time.
    x, y = blobs
    cfg = ClusterConfig(k=4, method="gmm", manifold="umap", umap={"n_components": 2, "n_neighbors": 15})
    labels, info = fit_labels(x, cfg, seed=0)
    assert adjusted_rand_score(y, labels) > 0.9
    assert info["umap"]["n_components"] == 2 and info["umap"]["min_dist"] == 0.0
    with pytest.raises(ConfigError, match=r"cluster.umap.n_neighbors=15 should be < the number of rows \(10\)"):
        fit_labels(x[:10], cfg.model_copy(update={"k": 2}))


def test_size_entropy_by_hand():
    assert size_entropy(np.array([0, 0, 1, 1, 2, 2])) == pytest.approx(np.log(3))
    assert size_entropy(np.array([0, 0, 0, 1])) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert size_entropy(np.array([0, 1, -1, -1, -1])) == pytest.approx(np.log(2))  # noise is no cluster
    assert size_entropy(np.array([3, 3, 3])) == 0.0


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_the_layouts_graph_is_the_exact_euclidean_knn(blobs):
    from sklearn.neighbors import NearestNeighbors

    from engine.cluster._manifold import umap_knn
    from engine.config import UmapConfig

    x, _ = blobs
    indices, distances = umap_knn(x, UmapConfig(n_neighbors=7), 2)
    assert indices.shape == distances.shape == (len(x), 7)
    np.testing.assert_array_equal(indices[:, 0], np.arange(len(x)))  # each row its own first neighbour, as UMAP's
    theirs, _ = NearestNeighbors(n_neighbors=7).fit(x).kneighbors(x)
    np.testing.assert_allclose(distances, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_umap_layouts_keep_the_most_even_partition():
    """Six blobs of 60 rows into k=3: every partition merges blobs, and layouts that merge them 2+2+2 are the even
    ones. The run keeps the layout of highest size entropy, and its labels are that layout's, clustered alone."""
    from engine.cluster._manifold import umap_knn, umap_reduce

    x, _ = make_blobs(n_samples=360, n_features=5, centers=6, cluster_std=0.5, center_box=(-10, 10), random_state=7)
    x = x.astype(np.float32)
    cfg = ClusterConfig(k=3, method="kmeans", n_init=1, manifold="umap",
                        umap={"n_components": 2, "n_neighbors": 15, "n_init": 4})
    assert cfg.umap.select == "even"  # the default
    labels, info = fit_labels(x, cfg, seed=7)
    layouts = info["umap"]["layouts"]
    assert [layout["seed"] for layout in layouts] == [7, 8, 9, 10]
    entropies = [layout["size_entropy"] for layout in layouts]
    kept = info["umap"]["kept"]
    # A layout merges the blobs unevenly (a 3-1 split: entropy < log 3; the first one here, on either CPU), another
    # one 2+2+2.
    assert min(entropies) < np.log(3) - 0.01 and max(entropies) == pytest.approx(np.log(3))
    assert kept == int(np.argmax(entropies)) and size_entropy(labels) == pytest.approx(max(entropies))
    assert np.bincount(labels).tolist() == [120, 120, 120]
    knn = umap_knn(x, cfg.umap, 2, seed=7)
    alone, _ = fit_labels(umap_reduce(x, cfg.umap, 2, seed=7 + kept, knn=knn),
                          cfg.model_copy(update={"manifold": "none"}), seed=7)
    np.testing.assert_array_equal(labels, alone)
    assert info["n_clusters"] == 3


def test_consensus_scores_by_hand():
    from engine.cluster._in_memory import consensus_scores

    a, b = np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 0, 0, 2, 2])  # b is a relabelled
    c = np.array([0, 0, 0, 0, 1, 1])  # merges a's first two clusters
    h_c = -(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3)  # c is a function of a: I(a; c) = H(c)
    nmi_ac = h_c / ((np.log(3) + h_c) / 2)
    assert consensus_scores([a, b, c]) == pytest.approx([(1 + nmi_ac) / 2, (1 + nmi_ac) / 2, nmi_ac])
    assert consensus_scores([c]) == [1.0]


def _uneven_blobs() -> tuple[np.ndarray, np.ndarray, ClusterConfig]:
    """Eight blobs of uneven size (240, 120 and six of 40 rows), and k-means (one start) on 4 UMAP layouts of them."""
    x, y = make_blobs(n_samples=[240, 120, 40, 40, 40, 40, 40, 40], n_features=5, cluster_std=1.0,
                      center_box=(-10, 10), random_state=5)
    cfg = ClusterConfig(k=8, method="kmeans", n_init=1, manifold="umap",
                        umap={"n_components": 2, "n_neighbors": 15, "n_init": 4, "select": "consensus"})
    return x.astype(np.float32), y, cfg


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_umap_layouts_keep_the_partition_the_others_agree_with():
    """Eight blobs of uneven size (240, 120 and six of 40 rows) into k=8, k-means with one start on each layout: one
    layout's k-means splits the large blob and merges two small ones, which makes its sizes more even than the
    truth's; the other three find the blobs. The consensus keeps one of those, the size prior the wrong one.

    Which layout goes wrong depends on the CPU (umap-learn's compiled code differs with AVX-512: the first layout on
    one machine here, the last on another), so the test names it by its scores, not by its index."""
    x, y, cfg = _uneven_blobs()
    labels, info = fit_labels(x, cfg, seed=5)
    layouts = info["umap"]["layouts"]
    agreement = [layout["agreement"] for layout in layouts]
    entropies = [layout["size_entropy"] for layout in layouts]
    odd = int(np.argmax(entropies))  # the most even partition is the one the other three disagree with
    assert agreement[odd] < min(a for i, a in enumerate(agreement) if i != odd)
    assert info["umap"]["kept"] == int(np.argmax(agreement)) != odd
    assert adjusted_rand_score(y, labels) == pytest.approx(1.0)
    even, info = fit_labels(x, cfg.model_copy(update={"umap": cfg.umap.model_copy(update={"select": "even"})}), seed=5)
    # The size prior keeps the wrong partition here: the reason consensus exists.
    assert info["umap"]["kept"] == odd and adjusted_rand_score(y, even) < 0.95


@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_umap_layouts_run_as_ray_tasks_and_equal_the_layouts_of_this_process(ray_local):
    """With Ray up, the layouts after the first run as Ray tasks in other processes (single-threaded each, so they
    spread over the cluster's CPUs); each is the layout this process makes from the same graph and seed."""
    from engine.cluster._in_memory import _compact, _kmeans, _layout
    from engine.cluster._manifold import umap_knn

    x, _, cfg = _uneven_blobs()
    labels, info = fit_labels(x, cfg, seed=5)
    pids = [layout["pid"] for layout in info["umap"]["layouts"]]
    assert info["umap"]["layouts_ran_in"] == "ray tasks" and pids[0] == os.getpid() and os.getpid() not in pids[1:]
    knn = umap_knn(x, cfg.umap, 2, seed=5)
    here = [_layout(x, knn, cfg.umap, 2, 5 + i, _kmeans, cfg, 5)[0] for i in range(4)]
    assert [layout["size_entropy"] for layout in info["umap"]["layouts"]] == [size_entropy(h) for h in here]
    # Layouts that differ (one splits a blob, see above): equal entropies are not one layout repeated.
    assert min(adjusted_rand_score(here[0], h) for h in here[1:]) < 0.95
    np.testing.assert_array_equal(labels, _compact(here[info["umap"]["kept"]]))
    # A caller that holds the CPUs (a training worker: VaDE's N2D start) runs them all here: the same partition.
    alone, info = fit_labels(x, cfg, seed=5, ray_tasks=False)
    assert info["umap"]["layouts_ran_in"] == "this process"
    assert {layout["pid"] for layout in info["umap"]["layouts"]} == {os.getpid()}
    np.testing.assert_array_equal(alone, labels)


UMAP_IN_A_FRESH_PROCESS = """
import numpy as np
from engine.cluster._manifold import umap_reduce
from engine.config import UmapConfig
import umap.umap_ as u
umap_reduce(np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32), UmapConfig(n_neighbors=10), 2)
fns = [u.smooth_knn_dist, u.compute_membership_strengths, u.fuzzy_simplicial_set.__globals__["fast_knn_indices"]]
print(sum(sum(f.stats.cache_hits.values()) for f in fns), sum(sum(f.stats.cache_misses.values()) for f in fns))
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_UMAP, reason="umap-learn is not installed (pip install -e '.[umap]')")
def test_a_new_process_loads_umaps_compiled_functions_from_the_cache():
    """umap-learn compiles its kernels without numba's cache: ~20 s in every new process on 2 cores. With the cache
    switched on, the second process of two finds all three kernels of UMAP's graph on disk and compiles none."""
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", UMAP_IN_A_FRESH_PROCESS], capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-3000:]
    hits, misses = map(int, runs[1].stdout.split())
    assert (hits, misses) == (3, 0), runs[1].stdout
