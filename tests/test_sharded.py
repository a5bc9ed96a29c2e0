"""ShardedKMeans on a real local Ray: parity with KMeans, folder sources, k-means|| seeding, bad input."""

from __future__ import annotations

import os
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import make_blobs

from engine.cluster import KMeans, ShardActor, ShardedKMeans, partial_stats
from engine.data.folders import staged_folder, write_manifest
from engine.data.schema import vector_array
from engine.errors import ConfigError, DataError, IncompleteResultError

K = 6
D = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    X, _ = make_blobs(n_samples=600, n_features=D, centers=K, cluster_std=0.5, random_state=0)
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def shards(blobs) -> list[np.ndarray]:
    return [blobs[:200], blobs[200:350], blobs[350:]]


def write_shard(path, Z: np.ndarray, first_id: int = 0) -> str:
    ids = pa.array(np.arange(first_id, first_id + len(Z), dtype=np.int64))
    pq.write_table(pa.table({"id": ids, "z": vector_array(Z.reshape(len(Z), Z.shape[1]))}), path)
    return str(path)


@pytest.fixture(scope="module")
def embeddings(blobs, tmp_path_factory) -> str:
    """A complete embeddings folder: two Parquet shards and a manifest listing them."""
    out = tmp_path_factory.mktemp("emb") / "embeddings"
    with staged_folder(out) as tmp:
        write_shard(tmp / "part-0.parquet", blobs[:250])
        write_shard(tmp / "part-1.parquet", blobs[250:], first_id=250)
        write_manifest(tmp, stage="embed", config_hash="test", rows=len(blobs),
                       files=["part-0.parquet", "part-1.parquet"])
    return str(out)


def live_shard_actors(ray) -> list:
    """ShardActors not yet dead, from the GCS actor table (the state API needs the dashboard, off here)."""
    from ray._private import state

    return [a for a in state.actors().values() if a["ActorClassName"] == "ShardActor" and a["State"] != "DEAD"]


def assert_no_shard_actors(ray) -> None:
    deadline = time.monotonic() + 10
    while live_shard_actors(ray) and time.monotonic() < deadline:
        time.sleep(0.1)  # ray.kill is asynchronous
    assert live_shard_actors(ray) == []


# --- in-process: the actor class without Ray ------------------------------------------------------


def test_shard_actor_in_process_matches_partial_stats(shards):
    actor = ShardActor(shards[:2], ["a", "b"])
    assert actor.load() == [("a", 200, D), ("b", 150, D)]
    assert (actor.count(), actor.dim()) == (350, D)
    X = np.concatenate(shards[:2])
    C = X[:K]
    sums, counts, sse, cluster_sse = actor.partial_stats(C)
    expected = partial_stats(X, C)
    np.testing.assert_allclose(sums, expected.sums)
    np.testing.assert_array_equal(counts, expected.counts)
    assert sse == pytest.approx(expected.sse)
    np.testing.assert_allclose(cluster_sse, expected.cluster_sse, rtol=1e-6)
    np.testing.assert_array_equal(actor.get_subset(np.array([3, 250])), X[[3, 250]])


def test_shard_actor_passes_allocate_an_assignment_not_copies_of_the_share():
    """A pass over a loaded actor allocates at most one assignment (int64 label + float32 distance, 12 bytes a
    row) and buffers of a block, and keeps none of it (the empty-cluster repair needs no rows).
    Before: every pass re-checked the rows for NaN (a rows x d mask) and recomputed their norms, the stats
    took float64 weights and distances of every row, k-means|| float64 distances and draws of the share."""
    n, d = 1_000_000, 24
    X = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    actor = ShardActor(np.split(X, 4), ["a", "b", "c", "d"], backend="torch")
    del X
    actor.load()
    C = actor.get_subset(np.arange(64))
    assignment, blocks = 12 * n, 3 << 20  # the blocks: 8192 x d float64 rows for the stats, an argmin's labels
    cost = []
    calls = [
        ("partial_stats", lambda: actor.partial_stats(C[:16]), assignment + blocks),
        ("partial_stats again", lambda: actor.partial_stats(C[16:32]), assignment + blocks),
        ("update_closest first", lambda: cost.append(actor.update_closest(C[:16], first=True)), assignment + blocks),
        ("update_closest", lambda: cost.append(actor.update_closest(C[16:48])), assignment + blocks),
        ("oversample", lambda: actor.oversample(32.0, cost[-1], 0, 0), assignment + blocks),
        ("count_nearest", lambda: actor.count_nearest(C), assignment + blocks),
    ]
    over = {}
    tracemalloc.start()
    try:
        for name, call, bound in calls:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            call()
            peak = tracemalloc.get_traced_memory()[1] - before
            if peak > bound:
                over[name] = f"{peak / n:.1f} bytes a row, bound {bound / n:.1f}"
    finally:
        tracemalloc.stop()
    assert over == {}


# --- on Ray -----------------------------------------------------------------------------------------


def test_equals_kmeans_from_the_same_init_with_an_empty_cluster(ray_local, blobs, shards):
    init = blobs[np.random.default_rng(0).choice(len(blobs), K, replace=False)].copy()
    init[3] = 1e3  # starts empty: the repair must split the same cluster as KMeans's
    ref = KMeans(K, init=init, max_iter=8, tol=0).fit(blobs)
    model = ShardedKMeans(K, init=init, max_iter=8, tol=0).fit(shards)

    np.testing.assert_allclose(model.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-5)
    assert model.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    assert model.n_iter_ == ref.n_iter_ == 8
    assert model.history_[0]["empty_repaired"] == ref.history_[0]["empty_repaired"] == 1
    assert [set(h) for h in model.history_] == [set(h) for h in ref.history_]
    np.testing.assert_allclose([h["objective"] for h in model.history_], [h["objective"] for h in ref.history_],
                               rtol=1e-5)
    np.testing.assert_array_equal(model.predict(blobs), ref.predict(blobs))
    assert model.n_samples_ == len(blobs) and model.n_features_in_ == D
    assert_no_shard_actors(ray_local)


def test_folder_source_with_kmeans_parallel_is_seeded_and_near_kmeans_plusplus(ray_local, blobs, embeddings):
    ref = KMeans(K, init="k-means++", seed=0).fit(blobs)
    a = ShardedKMeans(K, seed=3).fit(embeddings)  # two shards, two actors
    # Same seed, same shards, one actor: each shard draws from its own stream, so the same seeding.
    b = ShardedKMeans(K, init="k-means||", seed=3, num_actors=1).fit(embeddings)

    assert a.inertia_ <= 1.05 * ref.inertia_
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-6)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-6)
    assert_no_shard_actors(ray_local)


def test_random_init_draws_rows_across_shards(ray_local, blobs, shards):
    model = ShardedKMeans(K, init="random", max_iter=1, tol=0, seed=1, num_actors=2).fit(shards)
    # One Lloyd step from k rows drawn by the seed over all 600 rows: reproduce it in process.
    rows = np.random.default_rng(1).choice(len(blobs), K, replace=False)
    ref = KMeans(K, init=blobs[rows], max_iter=1, tol=0).fit(blobs)
    np.testing.assert_allclose(model.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-5)


# --- bad input: caught in the driver, named, before (or instead of) any compute --------------------------


def test_more_clusters_than_rows(shards):
    with pytest.raises(ConfigError, match=r"n_samples=600 should be >= n_clusters=601\."):
        ShardedKMeans(601).fit(shards)


def test_empty_shard_is_named(tmp_path, blobs):
    good = write_shard(tmp_path / "good.parquet", blobs[:50])
    empty = write_shard(tmp_path / "empty.parquet", blobs[:0])
    with pytest.raises(DataError, match=r"empty\.parquet: the shard holds no rows"):
        ShardedKMeans(K).fit([good, empty])


def test_shards_of_different_dimensions_are_named(tmp_path, blobs):
    good = write_shard(tmp_path / "good.parquet", blobs[:50])
    narrow = write_shard(tmp_path / "narrow.parquet", blobs[:50, :4])
    with pytest.raises(DataError, match=r"narrow\.parquet: column 'z' has 4 dimensions, but .*good\.parquet has 8"):
        ShardedKMeans(K).fit([good, narrow])


def test_folder_without_manifest(tmp_path, blobs):
    write_shard(tmp_path / "part-0.parquet", blobs[:50])
    with pytest.raises(IncompleteResultError, match="_manifest.json"):
        ShardedKMeans(K).fit(str(tmp_path))


def test_bad_settings():
    with pytest.raises(ConfigError, match=r"init='kmeans' should be"):
        ShardedKMeans(K, init="kmeans").fit([np.zeros((10, 2))])
    with pytest.raises(ConfigError, match="source should be"):
        ShardedKMeans(K).fit(np.zeros((10, 2)))
    with pytest.raises(ConfigError, match=r"num_actors=4 should be <= the number of shards \(3\)\."):
        ShardedKMeans(K, num_actors=4).fit([np.zeros((10, 2))] * 3)


def test_nan_in_a_shard_names_file_and_row(ray_local, tmp_path, blobs):
    good = write_shard(tmp_path / "good.parquet", blobs[:50])
    Z = blobs[:50].copy()
    Z[7, 2] = np.nan
    bad = write_shard(tmp_path / "bad.parquet", Z)
    with pytest.raises(DataError, match=r"bad\.parquet: column 'z' row 7 has NaN values") as info:
        ShardedKMeans(K, num_actors=1).fit([good, bad])
    assert "Traceback" not in str(info.value)  # the actor's error itself, not Ray's wrapper
    assert_no_shard_actors(ray_local)


# --- sample, train, then assign every row --------------------------------------------------------------


def test_sample_then_assign_writes_every_id_once(ray_local, blobs, embeddings, tmp_path):
    from engine.cluster import fit_sample_then_assign
    from engine.data.folders import read_table

    out = tmp_path / "assignments"
    model, manifest = fit_sample_then_assign(embeddings, out, K, sample_size=200, seed=0, num_actors=1,
                                             config_hash="test", concurrency=1)
    assert manifest["rows"] == len(blobs)
    table = read_table(out, stage="assign")
    np.testing.assert_array_equal(np.sort(table.column("id").to_numpy()), np.arange(len(blobs)))
    clusters = table.column("cluster").to_numpy()
    assert clusters.min() >= 0 and clusters.max() < K
    # Trained on a third of well-separated blobs: as good as training on all of them, within 5%.
    assert model.score(blobs) >= 1.05 * -KMeans(K, seed=0).fit(blobs).inertia_
    assert_no_shard_actors(ray_local)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_sample_is_trained_on_in_a_ray_task_exactly_as_kmeans_on_those_rows(ray_local, tmp_path):
    """The sample (rows drawn with the seed, in row order, gathered across 2 actors) reaches a Ray task that fits
    KMeans on it: the centroids equal KMeans on the same rows in this process, and this process, the driver,
    never holds the sample (its peak RSS grows by less than half the sample's bytes)."""
    from engine.cluster import fit_sample_then_assign

    n, d, size = 480_000, 64, 400_000  # a 98 MiB sample
    X, _ = make_blobs(n_samples=n, n_features=d, centers=K, cluster_std=2.0, random_state=1)
    X = X.astype(np.float32)
    source = tmp_path / "embeddings"
    with staged_folder(source) as tmp:
        for i, first in enumerate(range(0, n, 160_000)):
            write_shard(tmp / f"part-{i}.parquet", X[first:first + 160_000], first_id=first)
        write_manifest(tmp, stage="embed", config_hash="test", rows=n, files=[f"part-{i}.parquet" for i in range(3)])
    rows = np.sort(np.random.default_rng(3).choice(n, size=size, replace=False))
    ref = KMeans(K, max_iter=5, tol=0, seed=3).fit(X[rows])
    del X
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    model, manifest = fit_sample_then_assign(source, tmp_path / "out", K, sample_size=size, seed=3, num_actors=2,
                                             max_iter=5, tol=0, concurrency=1)
    growth = (_status_kib("VmHWM") - before) * 1024
    assert manifest["rows"] == n
    np.testing.assert_allclose(model.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert len(model.labels_) == size and model.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    assert growth < size * d * 4 / 2, f"the driver's peak RSS grew by {growth / 2**20:.0f} MiB; the sample is 98 MiB"
    assert_no_shard_actors(ray_local)


@pytest.mark.slow
def test_spherical_equals_kmeans_spherical(ray_local, blobs, shards, embeddings, tmp_path):
    from engine.cluster import fit_sample_then_assign
    from engine.data.folders import read_table

    X = blobs + 5.0  # away from the origin, so directions differ between blobs
    init = X[np.random.default_rng(1).choice(len(X), K, replace=False)]
    ref = KMeans(K, init=init, max_iter=6, tol=0, spherical=True).fit(X)
    model = ShardedKMeans(K, init=init, max_iter=6, tol=0, spherical=True).fit([s + 5.0 for s in shards])
    np.testing.assert_allclose(np.linalg.norm(model.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-5)
    assert model.inertia_ == pytest.approx(ref.inertia_, rel=1e-4)
    np.testing.assert_array_equal(model.predict(X), ref.predict(X))

    # sample_assign: distances are those of the unit rows (so at most 2), to unit centroids.
    out = tmp_path / "assignments"
    km, _ = fit_sample_then_assign(embeddings, out, K, sample_size=300, num_actors=1, concurrency=1,
                                   spherical=True)
    np.testing.assert_allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1.0, rtol=1e-5)
    table = read_table(out, stage="assign")
    assert table.column("distance").to_numpy().max() <= 2.0
    unit = blobs / np.linalg.norm(blobs, axis=1, keepdims=True)
    order = np.argsort(table.column("id").to_numpy())
    np.testing.assert_array_equal(table.column("cluster").to_numpy()[order], km.predict(unit))
    assert_no_shard_actors(ray_local)


def test_spherical_zero_row_is_named(blobs):
    rows = blobs[:20].copy()
    rows[7] = 0
    actor = ShardActor([rows], ["part-3.parquet"], spherical=True)
    with pytest.raises(DataError, match=r"part-3.parquet: column 'z' row 7 is all zeros"):
        actor.load()
