"""TwoLevelKMeans (coarse k-means, then k-means inside each part) and its allocation of the k centroids."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from engine.cluster import KMeans, TwoLevelKMeans
from engine.cluster._two_level import allocate
from engine.errors import CheckpointError, ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def many_blobs() -> np.ndarray:
    """30 overlapping blobs of 400 rows in 8-D, to be cut into 120 clusters: continuous structure, as
    embeddings have (on k exactly separated blobs proportional allocation can give a part one centroid too
    many or too few, a limit of the method that the docstring states)."""
    rng = np.random.default_rng(3)
    centers = rng.uniform(-6, 6, size=(30, 8)).astype(np.float32)
    return rng.standard_normal((12_000, 8), dtype=np.float32) + centers[np.arange(12_000) % 30]


def test_allocate_is_proportional_bounded_and_exact():
    counts = allocate(np.array([10.0, 1.0, 1.0, 0.0]), np.array([100, 100, 1, 5]), 10)
    assert counts.sum() == 10 and (counts >= 1).all()
    assert counts[2] == 1  # its capacity
    assert counts[0] > counts[1] >= 1
    # A part with fewer rows than its share keeps all its rows as centroids; the rest go elsewhere.
    counts = allocate(np.array([1.0, 1.0]), np.array([3, 100]), 50)
    assert counts.tolist() == [3, 47]
    with pytest.raises(ValueError, match="cannot split 9"):
        allocate(np.ones(2), np.array([2, 3]), 9)


def test_two_level_is_close_to_flat_kmeans(many_blobs):
    X = many_blobs
    flat = KMeans(120, max_iter=30, seed=0).fit(X)
    two = TwoLevelKMeans(120, max_iter=30, seed=0).fit(X)
    assert two.cluster_centers_.shape == (120, 8)
    assert two.n_coarse_ == 11  # round(sqrt(120))
    assert two.inertia_ <= 1.02 * flat.inertia_
    refined = TwoLevelKMeans(120, max_iter=30, seed=0, refine_iter=3).fit(X)
    assert refined.inertia_ <= two.inertia_ * (1 + 1e-6)
    assert refined.inertia_ <= 1.01 * flat.inertia_
    # labels_ and inertia_ are the exact assignment to the final centroids.
    d = ((X[:, None, :] - refined.cluster_centers_[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(refined.labels_, d.argmin(1))
    np.testing.assert_allclose(refined.inertia_, d.min(1).sum(), rtol=1e-4)


def test_history_has_each_level_and_subclusters_add_up(many_blobs):
    seen = []
    two = TwoLevelKMeans(120, n_coarse=4, max_iter=5, tol=0, refine_iter=2, callback=seen.append).fit(many_blobs)
    levels = [r["level"] for r in two.history_]
    assert levels.count("coarse") == 5 and levels.count("refine") == 2
    subs = [r for r in two.history_ if r["level"] == "sub"]
    assert len(subs) == 4 and sum(r["k"] for r in subs) == 120 and sum(r["rows"] for r in subs) == 12_000
    assert [r["level"] for r in seen] == levels  # the callback saw every record, in order


def test_seeded_and_sklearn_conventions(many_blobs, tmp_path):
    X = many_blobs[:3000]
    a = TwoLevelKMeans(30, seed=5).fit(X)
    b = clone(a).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.get_params()["n_coarse"] is None and "refine_iter" in a.get_params()
    np.testing.assert_array_equal(a.predict(X), a.labels_)
    path = tmp_path / "two.npz"
    a.save(path)
    loaded = TwoLevelKMeans.load(path)
    np.testing.assert_array_equal(loaded.predict(X), a.labels_)
    with pytest.raises(CheckpointError, match="holds a TwoLevelKMeans; load it with TwoLevelKMeans.load"):
        KMeans.load(path)


def test_spherical_and_weights(many_blobs):
    X = many_blobs[:3000]
    sph = TwoLevelKMeans(20, spherical=True).fit(X)
    np.testing.assert_allclose(np.linalg.norm(sph.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    w = np.zeros(len(X))
    w[:1500] = 1.0
    weighted = TwoLevelKMeans(20).fit(X, sample_weight=w)
    # Zero-weight rows pull no centroid: every centroid is a mean of the first half's rows only.
    first = TwoLevelKMeans(20).fit(X[:1500])
    assert abs(weighted.inertia_ - first.inertia_) / first.inertia_ < 0.2


def test_bad_settings(many_blobs):
    X = many_blobs[:500]
    with pytest.raises(ConfigError, match=r"n_coarse=30 should be <= n_clusters=20"):
        TwoLevelKMeans(20, n_coarse=30).fit(X)
    with pytest.raises(ConfigError, match=r"n_coarse=0 should be >= 1"):
        TwoLevelKMeans(20, n_coarse=0).fit(X)
    with pytest.raises(ConfigError, match=r"refine_iter=-1 should be >= 0"):
        TwoLevelKMeans(20, refine_iter=-1).fit(X)
    with pytest.raises(ConfigError, match="not an array of centroids"):
        TwoLevelKMeans(2, init=X[:2]).fit(X)
    with pytest.raises(ConfigError, match=r"n_samples=500 should be >= n_clusters=501"):
        TwoLevelKMeans(501).fit(X)
