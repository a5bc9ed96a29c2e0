"""KMeans and the Lloyd-step math: parity with FAISS and scikit-learn, stats algebra, API and errors."""

from __future__ import annotations

import inspect
import tracemalloc

import faiss
import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.base import clone
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import check_estimator

from engine.cluster import KMeans, PartialStats, assign, kmeans_plusplus, partial_stats, stats_from_assignment
from engine.cluster._stats import _assign_and_stats, resolve_backend
from engine.errors import CheckpointError, ConfigError, DataError

K = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=5000, n_features=16, centers=K, random_state=0)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def init_rows(blobs) -> np.ndarray:
    """K random rows: a weak start, so any difference between Lloyd implementations would show."""
    X, _ = blobs
    return X[np.random.default_rng(0).choice(len(X), K, replace=False)].copy()


def brute_force(X: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, C = X.astype(np.float64), C.astype(np.float64)
    d = np.maximum((X**2).sum(axis=1)[:, None] - 2 * X @ C.T + (C**2).sum(axis=1), 0)
    return d.argmin(axis=1), d.min(axis=1)


def sse(X: np.ndarray, C: np.ndarray) -> float:
    return float(brute_force(X, C)[1].sum())


# --- parity with reference implementations, from the same initial centroids --------------------------


def test_inertia_matches_faiss_kmeans(blobs, init_rows):
    X, _ = blobs
    ours = KMeans(K, init=init_rows, max_iter=25, tol=0).fit(X)
    ref = faiss.Kmeans(X.shape[1], K, niter=25, seed=1, max_points_per_centroid=len(X))
    ref.train(X, init_centroids=init_rows)
    ref_inertia = sse(X, ref.centroids)
    assert ours.inertia_ <= 1.01 * ref_inertia
    assert adjusted_rand_score(brute_force(X, ref.centroids)[0], ours.labels_) > 0.99


def test_inertia_matches_sklearn_lloyd(blobs, init_rows):
    X, _ = blobs
    ours = KMeans(K, init=init_rows, max_iter=25, tol=0).fit(X)
    ref = SklearnKMeans(n_clusters=K, init=init_rows, n_init=1, algorithm="lloyd", max_iter=25, tol=0).fit(X)
    assert ours.inertia_ <= 1.01 * ref.inertia_
    assert adjusted_rand_score(ref.labels_, ours.labels_) > 0.99


def test_kmeans_plusplus_finds_every_blob_from_the_start(blobs):
    X, y = blobs
    seeds = kmeans_plusplus(X, K, seed=0)
    # Each seed is a row of X; its blob is that row's label. Uniform picks cover ~13 of 20 blobs.
    rows = brute_force(seeds, X)[0]
    assert np.array_equal(X[rows], seeds)
    assert len(set(y[rows])) == K


def test_kmeans_plusplus_is_seeded_and_skips_zero_weight_rows(blobs):
    X, y = blobs
    w = np.where(y < 5, 0.0, 1.0)  # five blobs carry no weight
    seeds = kmeans_plusplus(X, 10, sample_weight=w, seed=3)
    assert np.array_equal(seeds, kmeans_plusplus(X, 10, sample_weight=w, seed=3))
    assert not np.array_equal(seeds, kmeans_plusplus(X, 10, sample_weight=w, seed=4))
    assert (w[brute_force(seeds, X)[0]] > 0).all()


# --- assign and partial stats ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch", "auto"])
def test_assign_matches_brute_force(backend):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((5000, 16)).astype(np.float32)
    # k=1000 makes the torch backend's CPU block 1048 rows: several blocks and a ragged last one.
    C = rng.standard_normal((1000, 16)).astype(np.float32)
    labels, sq = assign(X, C, backend=backend)
    ref_labels, ref_sq = brute_force(X, C)
    assert labels.dtype == np.int64 and sq.dtype == np.float32
    assert (labels == ref_labels).mean() > 0.999  # float32 rounding may flip near-ties
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-4, atol=1e-4)
    assert (sq >= 0).all()


def test_torch_cpu_assignment_splits_rows_over_threads():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((5003, 8)).astype(np.float32)
    C = rng.standard_normal((1000, 8)).astype(np.float32)
    ref_labels, ref_sq = brute_force(X, C)
    w = rng.uniform(0, 2, len(X))
    torch.set_num_threads(3)  # three row ranges of several blocks each, run in a thread pool
    try:
        labels, sq = assign(X, C, backend="torch")
        fused_labels, fused_sq, fused = _assign_and_stats(X, C, "torch", w)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)
    assert (labels == ref_labels).mean() > 0.999
    np.testing.assert_allclose(sq, ref_sq, rtol=1e-4, atol=1e-4)
    # Each thread's stats of its own rows add up to the stats of the whole assignment.
    np.testing.assert_array_equal(fused_labels, labels)
    np.testing.assert_array_equal(fused_sq, sq)
    whole = stats_from_assignment(X, labels, sq, len(C), w)
    np.testing.assert_allclose(fused.sums, whole.sums, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fused.counts, whole.counts, rtol=1e-12)
    assert fused.sse == pytest.approx(whole.sse, rel=1e-10)


def test_torch_backend_agrees_with_faiss_on_labels(blobs, init_rows):
    X, _ = blobs
    faiss_labels, faiss_sq = assign(X, init_rows, backend="faiss")
    torch_labels, torch_sq = assign(X, init_rows, backend="torch")
    assert (faiss_labels == torch_labels).mean() > 0.999
    np.testing.assert_allclose(torch_sq, faiss_sq, rtol=1e-4, atol=1e-2)
    a = KMeans(K, init=init_rows, max_iter=10, tol=0, backend="faiss").fit(X)
    b = KMeans(K, init=init_rows, max_iter=10, tol=0, backend="torch").fit(X)
    assert b.inertia_ == pytest.approx(a.inertia_, rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_agrees_with_faiss_cpu(blobs, init_rows):
    X, _ = blobs
    faiss_labels, _ = assign(X, init_rows, backend="faiss")
    torch_labels, _ = assign(X, init_rows, backend="torch")
    assert (faiss_labels == torch_labels).mean() > 0.999


@pytest.mark.parametrize("weighted", [False, True])
def test_pruned_lloyd_passes_equal_full_passes_and_skip_most_rows_late(weighted):
    """HostRows' bounds (torch on CPU, k >= PRUNE_MIN_K) skip rows whose label cannot change: at every Lloyd step
    the labels, and the squared distances up to rounding, equal a full pass's; and late steps skip most rows."""
    from engine.cluster._stats import PRUNE_MIN_K, HostRows, nearest_on_host

    X, _ = make_blobs(n_samples=20_000, n_features=8, centers=48, cluster_std=1.5, random_state=3)
    X = X.astype(np.float32)
    rng = np.random.default_rng(0)
    w = rng.uniform(0.5, 2.0, X.shape[0]).astype(np.float32) if weighted else None
    k = max(PRUNE_MIN_K, 48)
    rows = HostRows(X, w, "torch")
    assert rows.prune
    C = X[rng.choice(X.shape[0], k, replace=False)].copy()
    skipped = []
    for _ in range(12):
        stats = rows.stats(C)
        labels, sq = rows.assign(C)  # the same centroids again: every row is skipped but near-ties within rounding
        assert rows.pruned_ >= 0.99 * X.shape[0]
        full_labels, full_sq = nearest_on_host(X, C, "torch")
        assert np.array_equal(labels, full_labels)
        np.testing.assert_allclose(sq, full_sq, rtol=1e-4, atol=1e-3)
        reference = stats_from_assignment(X, full_labels, full_sq, k, w)
        np.testing.assert_allclose(stats.sums, reference.sums, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(stats.counts, reference.counts)
        C, _ = stats.centroids(C)
        C = C + rng.normal(0, 0.02, C.shape).astype(np.float32)  # no fixed point: the bounds keep working
        rows.assign(C)
        skipped.append(rows.pruned_)
    assert skipped[0] < X.shape[0] and max(skipped[-3:]) > 0.5 * X.shape[0], skipped


def test_partial_stats_match_direct_computation(blobs, init_rows):
    X, _ = blobs
    w = np.random.default_rng(2).uniform(0, 3, len(X))
    stats = partial_stats(X, init_rows, w)
    labels, sq = brute_force(X, init_rows)
    for j in range(K):
        np.testing.assert_allclose(
            stats.sums[j], (X[labels == j] * w[labels == j, None]).sum(axis=0), rtol=1e-5, atol=1e-3
        )
    np.testing.assert_allclose(stats.counts, np.bincount(labels, weights=w, minlength=K))
    assert stats.sse == pytest.approx(float(sq @ w), rel=1e-5)
    assert stats.sums.dtype == np.float64 and stats.counts.dtype == np.float64


def test_partial_stats_of_blocks_add_up_to_the_whole(blobs, init_rows):
    X, _ = blobs
    w = np.random.default_rng(3).uniform(0, 2, len(X))
    whole = partial_stats(X, init_rows, w)
    cuts = [0, 1234, 3000, len(X)]
    parts = [partial_stats(X[a:b], init_rows, w[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    summed = parts[0] + parts[1] + parts[2]
    np.testing.assert_allclose(summed.sums, whole.sums, rtol=1e-10)
    np.testing.assert_allclose(summed.counts, whole.counts, rtol=1e-12)
    assert summed.sse == pytest.approx(whole.sse, rel=1e-10)


def test_weight_two_equals_a_duplicated_row(blobs, init_rows):
    X, _ = blobs
    X = X[:300]
    w = np.ones(len(X))
    w[7] = 2.0
    duplicated = np.vstack([X, X[7:8]])
    a, b = partial_stats(X, init_rows, w), partial_stats(duplicated, init_rows)
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12)
    np.testing.assert_allclose(a.counts, b.counts)
    assert a.sse == pytest.approx(b.sse, rel=1e-12)

    init = X[:5].copy()
    fa = KMeans(5, init=init, tol=0, max_iter=10).fit(X, sample_weight=w)
    fb = KMeans(5, init=init, tol=0, max_iter=10).fit(duplicated)
    np.testing.assert_allclose(fa.cluster_centers_, fb.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert fa.inertia_ == pytest.approx(fb.inertia_, rel=1e-5)


def test_centroids_keep_previous_row_for_empty_clusters(blobs, init_rows):
    X, _ = blobs
    previous = init_rows.copy()
    previous[4] = 1e4  # nothing is near it
    stats = partial_stats(X, previous)
    new, empty = stats.centroids(previous)
    assert empty.tolist() == [4]
    np.testing.assert_array_equal(new[4], previous[4])
    filled = np.arange(K) != 4
    np.testing.assert_allclose(new[filled], stats.sums[filled] / stats.counts[filled, None], rtol=1e-6)
    assert new.dtype == np.float32


def test_stats_from_assignment_equals_partial_stats(blobs, init_rows):
    X, _ = blobs
    labels, sq = assign(X, init_rows)
    a, b = stats_from_assignment(X, labels, sq, K), partial_stats(X, init_rows)
    np.testing.assert_array_equal(a.sums, b.sums)
    assert a.sse == b.sse


def test_unweighted_stats_allocate_nothing_of_n_rows():
    """Without weights the stats of an assignment cost a block of work memory, however many rows: a shard
    actor's pass once added a float64 array of ones and a float64 copy of the distances, 16 bytes a row."""
    n, k = 400_000, 8
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 4)).astype(np.float32)
    labels, sq = rng.integers(k, size=n), rng.random(n, dtype=np.float32)
    tracemalloc.start()
    try:
        stats = stats_from_assignment(X, labels, sq, k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * n  # 16 * n before; a block of rows (8192) in float64 and its CSC matrix is ~0.5 MB
    weighted = stats_from_assignment(X, labels, sq, k, np.ones(n))
    np.testing.assert_array_equal(stats.sums, weighted.sums)
    np.testing.assert_array_equal(stats.counts, weighted.counts)
    assert stats.sse == pytest.approx(weighted.sse, rel=1e-12)


def test_input_check_allocates_a_block_and_names_a_late_row():
    """The NaN / inf check of X goes over blocks: a mask of the whole input would be a quarter of its bytes
    (0.3 GiB for a 5M x 64 shard) on every call; the row it names is still counted from the first row."""
    from engine.cluster._stats import as_float32_matrix

    X = np.zeros((1_000_000, 16), dtype=np.float32)
    tracemalloc.start()
    try:
        as_float32_matrix(X)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.size // 2  # the whole mask is X.size bytes (16 MB), a block 4 MiB
    X[900_001, 3] = np.inf
    with pytest.raises(DataError, match=r"^X contains NaN or infinity \(row 900001\)\.$"):
        as_float32_matrix(X)


def test_adding_stats_of_different_k_is_an_error(blobs, init_rows):
    X, _ = blobs
    with pytest.raises(DataError, match=r"cannot add partial stats of shape \(20, 16\) and \(5, 16\)"):
        partial_stats(X, init_rows) + partial_stats(X, init_rows[:5])
    assert isinstance(partial_stats(X, init_rows), PartialStats)


# --- the estimator ---------------------------------------------------------------------------------------


def test_empty_cluster_takes_half_of_the_cluster_with_the_largest_sse(blobs, init_rows):
    X, _ = blobs
    init = init_rows.copy()
    init[3] = 1e3
    model = KMeans(K, init=init, max_iter=1, tol=0).fit(X)
    assert model.history_[0]["empty"] == model.history_[0]["empty_repaired"] == 1
    # Documented rule: the empty centroid and the cluster with the largest SSE both start at that cluster's mean,
    # moved apart by a relative 1/1024, with alternating signs over the dimensions.
    labels, sq = assign(X, init)
    donor = np.bincount(labels, weights=sq, minlength=K).argmax()
    mean = X[labels == donor].astype(np.float64).mean(axis=0)
    sign = np.where(np.arange(X.shape[1]) % 2 == 0, 1, -1)
    np.testing.assert_allclose(model.cluster_centers_[3], mean * (1 + sign / 1024), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.cluster_centers_[donor], mean * (1 - sign / 1024), rtol=1e-5, atol=1e-5)

    full = KMeans(K, init=init, max_iter=30, tol=0).fit(X)
    assert np.bincount(full.labels_, minlength=K).min() > 0


def many_empty_clusters(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows where Lloyd from random rows empties many clusters: fewer true centres than k, half the rows exact
    copies of their centre (ties empty the duplicated centroids), half spread around them; and k random rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (k * 3 // 4, d)).astype(np.float32)
    X = centres[rng.integers(0, len(centres), n)]
    X[: n // 2] += 0.3 * rng.standard_normal((n // 2, d), dtype=np.float32)
    return X, X[rng.choice(n, k, replace=False)].copy()


def test_repair_is_at_least_as_good_as_scikit_learn_and_faiss_from_the_same_init():
    X, init = many_empty_clusters(20_000, 16, 64)
    iters = 20
    ours = KMeans(64, init=init, max_iter=iters, tol=0).fit(X)
    assert sum(h["empty"] for h in ours.history_) >= 5  # the data does empty clusters
    theirs = SklearnKMeans(64, init=init, n_init=1, max_iter=iters, tol=0, algorithm="lloyd").fit(X)
    km = faiss.Kmeans(16, 64, niter=iters, seed=0, max_points_per_centroid=len(X))
    km.train(X, init_centroids=init)
    best_peer = min(sse(X, theirs.cluster_centers_), sse(X, km.centroids))
    assert sse(X, ours.cluster_centers_) <= 1.005 * best_peer


def test_two_empty_clusters_are_both_repaired(blobs, init_rows):
    X, _ = blobs
    init = init_rows.copy()
    init[3], init[9] = 1e3, -1e3
    model = KMeans(K, init=init, max_iter=10, tol=0).fit(X)
    assert model.history_[0]["empty_repaired"] == 2
    assert sum(h["empty_repaired"] for h in model.history_) >= 2
    assert np.bincount(model.labels_, minlength=K).min() > 0


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_same_seed_same_result(blobs, init):
    X, _ = blobs
    a = KMeans(K, init=init, seed=5).fit(X)
    b = KMeans(K, init=init, seed=5).fit(X)
    c = KMeans(K, init=init, seed=6).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    assert not np.array_equal(a.cluster_centers_, c.cluster_centers_)


def test_n_init_keeps_the_best_run(blobs):
    X, _ = blobs
    # Run 1 of n_init=5 is the only run of n_init=1 (same spawned seed); random init from seed 0 gets
    # stuck there, and a later run does better.
    one = KMeans(K, init="random", n_init=1, seed=0).fit(X)
    five = KMeans(K, init="random", n_init=5, seed=0).fit(X)
    assert five.inertia_ < 0.9 * one.inertia_
    # The fitted attributes all come from the kept run.
    assert five.score(X) == pytest.approx(-five.inertia_, rel=1e-6)
    np.testing.assert_array_equal(five.predict(X), five.labels_)
    assert len(five.history_) == five.n_iter_


def test_kmeans_parallel_init_seeds_as_well_as_kmeans_plusplus(blobs):
    X, y = blobs
    pp = KMeans(K, init="k-means++", max_iter=1, tol=0).fit(X)
    par = KMeans(K, init="k-means||", max_iter=1, tol=0).fit(X)
    assert adjusted_rand_score(y, par.labels_) > 0.9
    assert par.inertia_ <= 1.1 * pp.inertia_
    # Weighted: rows of weight 0 are never candidates, so no centroid lands on the far-away zero-weight rows.
    far = np.full((50, X.shape[1]), 1e4, dtype=np.float32)
    w = np.r_[np.ones(len(X)), np.zeros(50)]
    model = KMeans(K, init="k-means||", max_iter=1, tol=0).fit(np.r_[X, far], sample_weight=w)
    assert np.abs(model.cluster_centers_).max() < 1e3


def test_auto_init_is_kmeans_parallel_above_256_clusters():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3000, 4), dtype=np.float32)
    for k, expected in ((256, "k-means++"), (257, "k-means||")):
        auto = KMeans(k, max_iter=1, tol=0).fit(X)
        explicit = KMeans(k, init=expected, max_iter=1, tol=0).fit(X)
        np.testing.assert_array_equal(auto.cluster_centers_, explicit.cluster_centers_)


def test_auto_init_is_partitioned_above_4096_clusters(monkeypatch):
    from engine.cluster import _kmeans

    monkeypatch.setattr(_kmeans, "PARTITIONED_ABOVE_K", 40)  # the rule, at a size a test affords
    X = np.random.default_rng(0).standard_normal((3000, 4), dtype=np.float32)
    auto = KMeans(41, max_iter=1, tol=0).fit(X)
    explicit = KMeans(41, init="partitioned", max_iter=1, tol=0).fit(X)
    np.testing.assert_array_equal(auto.cluster_centers_, explicit.cluster_centers_)


@pytest.mark.parametrize("centers", [60, 3000])
def test_partitioned_seeding_is_close_to_greedy_kmeans_plusplus(centers):
    """Fewer blobs than k (several seeds per blob) and more (a seed per several blobs): the seeds' cost is within
    15% of greedy k-means++'s, within 2% after 10 Lloyd iterations; seeded, and no zero-weight row is a seed."""
    from engine.cluster._stats import nearest_on_host

    X, _ = make_blobs(n_samples=20_000, n_features=12, centers=centers, center_box=(-10, 10), random_state=1)
    X = X.astype(np.float32)
    w = np.ones(X.shape[0], dtype=np.float32)
    w[::7] = 0.0
    k = 400

    def seeds(init: str, seed: int) -> np.ndarray:
        return KMeans(k, init=init)._initial_centroids(X, w, init, np.random.default_rng(seed))

    def cost(C: np.ndarray) -> float:
        return float(nearest_on_host(X, C, "faiss-cpu")[1].astype(np.float64) @ w)

    partitioned, greedy = seeds("partitioned", 0), seeds("k-means++", 0)
    assert partitioned.shape == (k, 12) and len(np.unique(partitioned, axis=0)) == k
    assert not (np.isin(partitioned.view([("", np.float32)] * 12), X[w == 0].view([("", np.float32)] * 12))).any()
    np.testing.assert_array_equal(partitioned, seeds("partitioned", 0))
    assert cost(partitioned) <= 1.15 * cost(greedy)
    after = [KMeans(k, init=C, max_iter=10, tol=0).fit(X, sample_weight=w).inertia_ for C in (partitioned, greedy)]
    assert after[0] <= 1.02 * after[1]


def test_partitioned_allocation_is_proportional_and_capped():
    from engine.cluster._seeding import _allocate

    share = _allocate(10, np.array([1.0, 1.0, 2.0, 0.0]), np.array([10, 10, 10, 10]))
    assert share.tolist() == [3, 2, 4, 1]  # one each, then 6 by mass: 1.5 / 1.5 / 3, the remainder to the first
    share = _allocate(3, np.array([1.0, 1.0, 2.0, 0.0]), np.array([10, 10, 10, 10]))
    assert share.tolist() == [1, 1, 1, 0]  # fewer than the cells: by mass alone, largest remainders
    share = _allocate(10, np.array([100.0, 1.0, 1.0]), np.array([3, 20, 20]))
    assert share.sum() == 10 and share[0] == 3 and abs(int(share[1]) - int(share[2])) <= 1
    share = _allocate(5, np.zeros(3), np.array([1, 2, 2]))  # no potential anywhere: by room
    assert share.sum() == 5 and (share <= [1, 2, 2]).all()


def test_random_init_picks_distinct_rows_by_weight():
    X = np.arange(60, dtype=np.float32).reshape(30, 2) ** 1.5
    w = np.zeros(30)
    w[::3] = 1.0  # 10 rows carry all the weight
    for seed in range(3):
        # With k = the number of weighted rows, only distinct weighted seeds put a centroid on every
        # weighted row, so the first assignment already costs nothing.
        model = KMeans(10, init="random", max_iter=1, tol=0, seed=seed).fit(X, sample_weight=w)
        assert model.history_[0]["objective"] == 0.0
        assert model.inertia_ == 0.0
        assert sorted(map(tuple, model.cluster_centers_)) == sorted(map(tuple, X[w > 0]))


def test_tol_stops_at_the_first_small_relative_decrease(blobs):
    X, _ = blobs
    model = KMeans(K, init="random", max_iter=100, tol=1e-4, seed=2).fit(X)
    changes = [h["rel_change"] for h in model.history_]
    assert model.n_iter_ == len(model.history_) < 100
    assert changes[0] is None
    assert changes[-1] < 1e-4 and all(c >= 1e-4 for c in changes[1:-1])
    objectives = [h["objective"] for h in model.history_]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objectives, objectives[1:], strict=False))
    assert set(model.history_[0]) == {"iter", "objective", "rel_change", "shift", "empty", "empty_repaired", "seconds"}


def test_tol_zero_runs_max_iter(blobs):
    X, _ = blobs
    model = KMeans(K, max_iter=7, tol=0).fit(X)
    assert model.n_iter_ == 7 and [h["iter"] for h in model.history_] == list(range(1, 8))


def test_fitted_attributes_and_methods(blobs):
    X, _ = blobs
    model = KMeans(K).fit(X.astype(np.float64))
    assert model.cluster_centers_.dtype == np.float32 and model.cluster_centers_.shape == (K, 16)
    assert model.n_features_in_ == 16 and model.labels_.shape == (len(X),)
    assert isinstance(model.inertia_, float)
    assert model.inertia_ == pytest.approx(sse(X, model.cluster_centers_), rel=1e-5)
    distances = model.transform(X[:50])
    expected = np.sqrt(((X[:50, None].astype(np.float64) - model.cluster_centers_[None]) ** 2).sum(axis=2))
    assert distances.shape == (50, K)
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(distances.argmin(axis=1), model.predict(X[:50]))
    np.testing.assert_array_equal(KMeans(K).fit_predict(X), model.labels_)
    np.testing.assert_allclose(KMeans(K).fit_transform(X), model.transform(X), rtol=1e-5)
    w = np.full(len(X), 2.0)
    assert model.score(X, sample_weight=w) == pytest.approx(-2 * model.inertia_, rel=1e-6)


def test_sklearn_api_conventions(blobs):
    X, _ = blobs
    model = KMeans(5, init="random", n_init=2, max_iter=9, tol=1e-3, seed=4, backend="torch")
    params = model.get_params()
    assert params == {
        "n_clusters": 5,
        "init": "random",
        "n_init": 2,
        "max_iter": 9,
        "tol": 1e-3,
        "seed": 4,
        "backend": "torch",
        "verbose": False,
        "spherical": False,
        "max_points_per_centroid": None,
        "callback": None,
        "checkpoint": None,
        "checkpoint_every": 10,
        "precision": "fp32",
        "device": None,
    }
    copy = clone(model)
    assert copy is not model and copy.get_params() == params
    assert KMeans().set_params(**params).get_params() == params
    for method in (model.predict, model.transform, model.score):
        with pytest.raises(NotFittedError):
            method(X)
    assert model.fit(X) is model


@pytest.mark.skipif(
    "expected_failed_checks" not in inspect.signature(check_estimator).parameters,
    reason="expected_failed_checks needs scikit-learn >= 1.6",
)
def test_sklearn_estimator_checks():
    check_estimator(
        KMeans(n_clusters=2, max_iter=5),
        expected_failed_checks={
            # Deliberate: our messages, not scikit-learn's exact wording or exception types.
            "check_n_features_in_after_fitting": "message says 'was fitted with N features'",
            "check_dtype_object": "non-numeric X raises DataError (a ValueError), not TypeError",
            # Seeding draws differ between weights and repeats; scikit-learn's KMeans xfails this too.
            # Exact equivalence from fixed centroids is tested in test_weight_two_equals_a_duplicated_row.
            "check_sample_weight_equivalence_on_dense_data": "seeding is random",
        },
    )


def test_save_load_round_trip(blobs, tmp_path):
    X, _ = blobs
    model = KMeans(K, n_init=2, seed=3).fit(X)
    path = tmp_path / "model.npz"
    model.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    loaded = KMeans.load(path)
    np.testing.assert_array_equal(loaded.predict(X), model.labels_)
    np.testing.assert_array_equal(loaded.cluster_centers_, model.cluster_centers_)
    assert loaded.get_params() == model.get_params()
    assert (loaded.inertia_, loaded.n_iter_, loaded.n_features_in_) == (model.inertia_, model.n_iter_, 16)
    assert loaded.history_ == model.history_


def test_save_load_with_array_init(blobs, init_rows, tmp_path):
    X, _ = blobs
    model = KMeans(K, init=init_rows, max_iter=3).fit(X)
    model.save(tmp_path / "m.npz")
    loaded = KMeans.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(loaded.init, init_rows)
    np.testing.assert_array_equal(loaded.predict(X), model.labels_)


def test_load_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a saved KMeans model"):
        KMeans.load(path)
    with pytest.raises(NotFittedError):
        KMeans().save(tmp_path / "unfitted.npz")


# --- spherical k-means, training subsample, progress callback --------------------------------------------


def cones(n_per: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three directions in 2-D, each with norms spread over [0.2, 10]: direction is the cluster, length noise."""
    rng = np.random.default_rng(seed)
    angles = np.repeat([0.0, 2.1, 4.2], n_per) + rng.normal(0, 0.08, 3 * n_per)
    radii = rng.uniform(0.2, 10.0, 3 * n_per)
    X = np.c_[np.cos(angles), np.sin(angles)] * radii[:, None]
    return X.astype(np.float32), np.repeat([0, 1, 2], n_per)


def test_spherical_clusters_by_direction_with_unit_centroids():
    X, y = cones()
    spherical = KMeans(3, spherical=True, seed=0, n_init=3).fit(X)
    np.testing.assert_allclose(np.linalg.norm(spherical.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    assert adjusted_rand_score(y, spherical.labels_) > 0.99
    # Plain k-means splits by length too (near the origin every direction is close), so it mixes cones.
    plain = KMeans(3, seed=0, n_init=3).fit(X)
    assert adjusted_rand_score(y, plain.labels_) < 0.9
    # Scaling a row does not move it to another cluster, and inertia is the SSE of the unit rows.
    np.testing.assert_array_equal(spherical.predict(X * 7.5), spherical.labels_)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert spherical.inertia_ == pytest.approx(sse(unit, spherical.cluster_centers_), rel=1e-4)
    assert spherical.score(X * 3) == pytest.approx(-spherical.inertia_, rel=1e-4)


def test_spherical_centroid_is_the_normalised_mean_direction():
    X, _ = cones()
    init = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]], dtype=np.float32)
    model = KMeans(3, init=init, spherical=True, max_iter=1, tol=0).fit(X)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = brute_force(unit, init / np.linalg.norm(init, axis=1, keepdims=True))[0]
    for j in range(3):
        mean = unit[labels == j].mean(axis=0)
        np.testing.assert_allclose(model.cluster_centers_[j], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_max_points_per_centroid_trains_on_an_announced_subsample(blobs, caplog):
    X, _ = blobs
    with caplog.at_level("WARNING", logger="engine.cluster._kmeans"):
        sub = KMeans(K, max_points_per_centroid=50, seed=1).fit(X)
    assert sub.n_training_samples_ == K * 50 == 1000
    assert "subsample of 1000 of 5000 rows" in caplog.text and "max_points_per_centroid=50" in caplog.text
    # labels_ and inertia_ cover every row, for the centroids trained on the subsample.
    assert sub.labels_.shape == (len(X),)
    np.testing.assert_array_equal(sub.labels_, brute_force(X, sub.cluster_centers_)[0])
    assert sub.inertia_ == pytest.approx(sse(X, sub.cluster_centers_), rel=1e-5)
    full = KMeans(K, seed=1).fit(X)
    assert full.n_training_samples_ == len(X)
    assert sub.inertia_ <= 1.05 * full.inertia_
    # Seeded: the same subsample and result again; another seed draws another subsample.
    np.testing.assert_array_equal(KMeans(K, max_points_per_centroid=50, seed=1).fit(X).cluster_centers_,
                                  sub.cluster_centers_)
    assert not np.array_equal(KMeans(K, max_points_per_centroid=50, seed=2).fit(X).cluster_centers_,
                              sub.cluster_centers_)


def test_max_points_per_centroid_large_enough_uses_every_row(blobs, caplog, init_rows):
    X, _ = blobs
    with caplog.at_level("WARNING", logger="engine.cluster._kmeans"):
        capped = KMeans(K, init=init_rows, max_points_per_centroid=250, max_iter=5, tol=0).fit(X)
    assert caplog.text == ""
    plain = KMeans(K, init=init_rows, max_iter=5, tol=0).fit(X)
    assert capped.n_training_samples_ == len(X)
    np.testing.assert_array_equal(capped.cluster_centers_, plain.cluster_centers_)


def test_callback_gets_each_iteration_record(blobs):
    X, _ = blobs
    seen = []
    model = KMeans(K, init="random", n_init=2, max_iter=6, tol=0, seed=0, callback=seen.append).fit(X)
    assert [(r["run"], r["iter"]) for r in seen] == [(run, it) for run in (1, 2) for it in range(1, 7)]
    runs = [[{k: v for k, v in r.items() if k != "run"} for r in seen if r["run"] == run] for run in (1, 2)]
    assert model.history_ in runs  # the kept run's history is what the callback saw, record for record
    assert runs[0] != runs[1]


def test_save_load_with_callback_and_new_settings(blobs, tmp_path):
    X, _ = blobs
    model = KMeans(K, spherical=True, max_points_per_centroid=100, callback=lambda r: None, max_iter=3).fit(X)
    model.save(tmp_path / "m.npz")
    loaded = KMeans.load(tmp_path / "m.npz")
    assert loaded.callback is None and loaded.spherical and loaded.max_points_per_centroid == 100
    assert loaded.n_training_samples_ == 2000
    np.testing.assert_array_equal(loaded.predict(X), model.labels_)


# --- bad input ---------------------------------------------------------------------------------------------

X12 = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_clusters": 20}, r"^n_samples=12 should be >= n_clusters=20\.$"),
        ({"n_clusters": 0}, r"^n_clusters=0 should be >= 1\.$"),
        ({"n_clusters": "3"}, r"^n_clusters should be an int, got '3'\.$"),
        ({"n_init": 0}, r"^n_init=0 should be >= 1\.$"),
        ({"max_iter": 0}, r"^max_iter=0 should be >= 1\.$"),
        ({"tol": -0.1}, r"^tol=-0.1 should be a finite number >= 0\.$"),
        ({"tol": "small"}, r"^tol should be a number, got 'small'\.$"),
        ({"seed": -1}, r"^seed=-1 should be >= 0\.$"),
        ({"verbose": "yes"}, r"^verbose should be True or False, got 'yes'\.$"),
        ({"spherical": 1}, r"^spherical should be True or False, got 1\.$"),
        ({"max_points_per_centroid": 0}, r"^max_points_per_centroid=0 should be >= 1\.$"),
        ({"max_points_per_centroid": 2.5}, r"^max_points_per_centroid should be an int, got 2\.5\.$"),
        ({"callback": "print"}, r"^callback should be a callable or None, got 'print'\.$"),
        ({"init": "kmeans"}, r"^init='kmeans' should be 'auto', 'k-means\+\+', 'k-means\|\|', 'partitioned', 'random'"),
        ({"backend": "cuda"}, r"^backend='cuda' should be one of 'auto', 'faiss', 'torch'\.$"),
        (
            {"n_clusters": 3, "init": np.zeros((3, 5))},
            r"^init has shape \(3, 5\), but should be \(n_clusters, n_features\)=\(3, 4\)\.$",
        ),
        (
            {"n_clusters": 2, "init": [[0, 0, 0, 0], [0, np.nan, 0, 0]]},
            r"^init contains NaN or infinity \(row 1\)\.$",
        ),
    ],
)
def test_bad_settings_raise_config_error(params, message):
    with pytest.raises(ConfigError, match=message):
        KMeans(**{"n_clusters": 3, **params}).fit(X12)


def _with(value, row: int, col: int = 1) -> np.ndarray:
    X = X12.copy()
    X[row, col] = value
    return X


@pytest.mark.parametrize(
    ("X", "weights", "message"),
    [
        (_with(np.nan, 3), None, r"^X contains NaN or infinity \(row 3\)\.$"),
        (_with(np.inf, 7), None, r"^X contains NaN or infinity \(row 7\)\.$"),
        (X12[0], None, r"^X should be a 2-D array \(n_samples, n_features\), got shape \(4,\)\. Reshape"),
        (X12[None], None, r"^X should be a 2-D array \(n_samples, n_features\), got shape \(1, 12, 4\)"),
        (X12[:, :0], None, r"^X has 0 feature\(s\) \(shape=\(12, 0\)\) while a minimum of 1 is required\.$"),
        (np.array([["a", "b"]] * 12), None, r"^X should hold numbers, got dtype <U1\.$"),
        (scipy.sparse.csr_matrix(X12), None, r"^X is a sparse matrix"),
        (X12[:7], np.ones(5), r"^sample_weight has 5 entries but X has 7 rows\.$"),
        (X12, -np.arange(12.0) + 1, r"^sample_weight should be >= 0, got -1\.0 \(row 2\)\.$"),
        (X12, np.r_[np.ones(11), np.nan], r"^sample_weight contains NaN or infinity \(row 11\)\.$"),
        (X12, np.ones((12, 1)), r"^sample_weight should be 1-D, got shape \(12, 1\)\.$"),
        (X12, -2.0, r"^sample_weight should be >= 0, got -2\.0 \(row 0\)\.$"),
        ([[1.0, 2.0], [3.0]], None, r"^X is not a rectangular array"),
        (X12, np.zeros(12), r"^sample_weight has 0 nonzero entries, should be >= n_clusters=3\.$"),
        (X12, np.r_[1.0, 1, np.zeros(10)], r"^sample_weight has 2 nonzero entries, should be >= n_clusters"),
    ],
)
def test_bad_data_raises_data_error(X, weights, message):
    with pytest.raises(DataError, match=message):
        KMeans(3).fit(X, sample_weight=weights)


def test_spherical_zero_row_is_an_error_naming_it():
    X = X12.copy()
    X[5] = 0.0
    with pytest.raises(DataError, match=r"^X row 5 is all zeros: spherical=True needs rows with a direction\.$"):
        KMeans(3, spherical=True).fit(X)
    model = KMeans(3, spherical=True).fit(X12)
    with pytest.raises(DataError, match=r"^X row 5 is all zeros"):
        model.predict(X)
    init = X12[:3].copy()
    init[2] = 0.0
    with pytest.raises(DataError, match=r"^init row 2 is all zeros"):
        KMeans(3, init=init, spherical=True).fit(X12)


def test_predict_with_wrong_number_of_features():
    model = KMeans(3).fit(np.random.default_rng(0).standard_normal((30, 5)))
    for method in (model.predict, model.transform, model.score):
        with pytest.raises(DataError, match=r"^X has 3 features, but KMeans was fitted with 5 features\.$"):
            method(X12[:, :3])


def test_array_init_with_n_init_warns_and_runs_once(init_rows, blobs):
    X, _ = blobs
    with pytest.warns(RuntimeWarning, match=r"running one init instead of n_init=3"):
        model = KMeans(K, init=init_rows, n_init=3, tol=0, max_iter=4).fit(X)
    single = KMeans(K, init=init_rows, tol=0, max_iter=4).fit(X)
    np.testing.assert_array_equal(model.cluster_centers_, single.cluster_centers_)


def test_low_level_functions_check_their_input():
    with pytest.raises(DataError, match=r"^centroids have 3 features, but X has 4 features\.$"):
        assign(X12, np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"^backend='gpu' should be one of"):
        partial_stats(X12, X12[:2], backend="gpu")
    with pytest.raises(DataError, match=r"^sample_weight has 3 entries but X has 12 rows\.$"):
        partial_stats(X12, X12[:2], np.ones(3))
    with pytest.raises(ConfigError, match=r"^n_local_trials=0 should be >= 1\.$"):
        kmeans_plusplus(X12, 2, n_local_trials=0)
    with pytest.raises(ConfigError, match=r"^n_samples=12 should be >= n_clusters=13\.$"):
        kmeans_plusplus(X12, 13)


def test_faiss_gpu_backend_uses_one_gpu(monkeypatch):
    """With several GPUs visible, one search on the current device (faiss.Kmeans(gpu=1) would take all)."""
    from engine.cluster import _stats

    calls = []

    def knn_gpu(res, xq, xb, k, *args, **kwargs):
        calls.append((res, args, kwargs))
        return faiss.knn(xq, xb, k)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(_stats, "faiss_gpu_resources", lambda: "one-resources")
    labels, _ = assign(X12, X12[:3], backend="faiss")
    np.testing.assert_array_equal(labels, brute_force(X12, X12[:3])[0])
    assert calls == [("one-resources", (), {})]  # no device argument: faiss's default, the current device


@pytest.mark.parametrize(
    ("requested", "faiss_gpus", "cuda", "expected"),
    [
        ("auto", 1, True, "faiss-gpu"),
        ("auto", 0, True, "torch"),
        ("auto", 0, False, "torch"),
        ("faiss", 0, True, "faiss-cpu"),
        ("faiss", 2, False, "faiss-gpu"),
        ("torch", 1, False, "torch"),
    ],
)
def test_backend_resolution(monkeypatch, requested, faiss_gpus, cuda, expected):
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: faiss_gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert resolve_backend(requested) == expected
