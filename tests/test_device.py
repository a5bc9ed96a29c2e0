"""DeviceRows, the torch backend's device-resident rows, run on the CPU: the same code a GPU fit runs (resident and
streamed chunks, float64 sums, reduced precision with its fp32 re-check, faiss's flat index on torch tensors)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from engine.cluster import KMeans, partial_stats
from engine.cluster._device import DeviceRows, nearest, supported_precision
from engine.cluster._lloyd import lloyd
from engine.errors import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny inputs: one OpenMP / torch thread (see conftest)."""


def blobs_with_ties(n: int = 4000, d: int = 16, k: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows near their centre plus rows half-way between two centres, where low-precision ranking flips labels."""
    rng = np.random.default_rng(seed)
    C = rng.normal(0, 3, (k, d)).astype(np.float32)
    X = C[rng.integers(0, k, n)] + rng.standard_normal((n, d), dtype=np.float32)
    a, b = rng.integers(0, k, n // 4), rng.integers(0, k, n // 4)
    X[: n // 4] = (C[a] + C[b]) / 2 + 1e-3 * rng.standard_normal((n // 4, d), dtype=np.float32)
    return X, C


def fp32_labels(X: np.ndarray, C: np.ndarray) -> np.ndarray:
    return faiss.knn(X, C, 1)[1][:, 0]


def assert_stats_equal(got, expected) -> None:
    np.testing.assert_allclose(got.sums, expected.sums, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.counts, expected.counts)
    np.testing.assert_allclose(got.cluster_sse, expected.cluster_sse, rtol=1e-5, atol=1e-4)
    assert got.sse == pytest.approx(expected.sse, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_resident_and_streamed_stats_equal_partial_stats(weighted):
    X, C = blobs_with_ties()
    w = np.random.default_rng(1).uniform(0, 2, len(X)) if weighted else None
    expected = partial_stats(X, C, w)
    resident = DeviceRows(X, w, device="cpu")
    # 300 rows' worth of memory: the rows stream through in chunks, the last one short.
    streamed = DeviceRows(X, w, device="cpu", memory_limit=300 * (16 * 4 + 4 + (8 if weighted else 0)))
    assert not resident.streamed and "resident" in resident.holds
    assert streamed.streamed and "chunks of 300 rows" in streamed.holds
    for rows in (resident, streamed):
        assert_stats_equal(rows.stats(C), expected)
        labels, sq = rows.assign(C)
        np.testing.assert_array_equal(labels, fp32_labels(X, C))
        np.testing.assert_allclose(sq, faiss.knn(X, C, 1)[0][:, 0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_gives_fp32_labels(precision):
    X, C = blobs_with_ties()
    Xt, Ct = torch.from_numpy(X), torch.from_numpy(C)
    c_sq, x_sq = (Ct * Ct).sum(1), (Xt * Xt).sum(1)
    labels, sq = nearest(Xt, x_sq, Ct, c_sq, precision)
    np.testing.assert_array_equal(labels.numpy(), fp32_labels(X, C))
    np.testing.assert_allclose(sq.numpy(), faiss.knn(X, C, 1)[0][:, 0], rtol=1e-4, atol=1e-3)
    if precision == "bf16":
        # Without the re-check, bf16's ranking differs on the half-way rows: the test above could fail.
        raw = (c_sq - 2.0 * (Xt.bfloat16() @ Ct.bfloat16().T).float()).argmin(1).numpy()
        assert (raw != fp32_labels(X, C)).sum() > 10


def test_lloyd_over_bf16_device_rows_equals_fp32_kmeans():
    X, C = blobs_with_ties(seed=2)
    init = X[np.random.default_rng(0).choice(len(X), 24, replace=False)].copy()
    ref = KMeans(24, init=init, max_iter=10, tol=0).fit(X)
    rows = DeviceRows(X, device="cpu", precision="bf16")
    got = lloyd(rows.stats, init, max_iter=10, tol=0)
    np.testing.assert_allclose(got.centroids, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert [h["objective"] for h in got.history] == pytest.approx([h["objective"] for h in ref.history_], rel=1e-5)


def test_faiss_flat_index_on_torch_tensors_equals_partial_stats():
    """The faiss-GPU path's code (a flat index of the centroids searched with the device tensors), on the CPU."""
    X, C = blobs_with_ties(seed=3)
    rows = DeviceRows(X, device="cpu", search="faiss")
    assert_stats_equal(rows.stats(C), partial_stats(X, C, backend="faiss"))  # the same fp32 ties as faiss.knn
    np.testing.assert_array_equal(rows.assign(C)[0], fp32_labels(X, C))


def test_precision_the_device_lacks_falls_back_with_one_warning():
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match="precision=bf16: this CPU has no native bfloat16") as record:
        assert supported_precision("bf16", cpu, cpu_has_bf16=False) == "fp32"
    assert len(record) == 1
    assert supported_precision("bf16", cpu, cpu_has_bf16=True) == "bf16"
    with pytest.warns(RuntimeWarning, match="precision=tf32: a CPU has no tf32"):
        assert supported_precision("tf32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="precision='fp16' should be one of 'fp32', 'tf32', 'bf16'"):
        supported_precision("fp16", cpu)


def test_kmeans_precision_settings():
    X, _ = blobs_with_ties(seed=4)
    init = X[:24].copy()
    ref = KMeans(24, init=init, max_iter=5, tol=0).fit(X)
    assert "host memory" in ref.holds_
    with pytest.warns(RuntimeWarning, match="precision=tf32"):
        tf32 = KMeans(24, init=init, max_iter=5, tol=0, precision="tf32", backend="torch").fit(X)
    np.testing.assert_array_equal(tf32.labels_, ref.labels_)
    with pytest.raises(ConfigError, match="precision='bf16' needs backend='torch'; backend='faiss' is faiss-cpu"):
        KMeans(24, precision="bf16", backend="faiss").fit(X)
    with pytest.raises(ConfigError, match="device='gpu' is not a torch device"):
        KMeans(24, device="gpu").fit(X)


def test_device_kmeans_plusplus_draws_the_host_version_s_seeds():
    from engine.cluster._device import kmeans_plusplus_device
    from engine.cluster._stats import kmeans_plusplus_unchecked

    X, _ = blobs_with_ties(seed=5)
    w = np.random.default_rng(2).uniform(0.5, 1.5, len(X))
    rows = DeviceRows(X, w, device="cpu")
    host = kmeans_plusplus_unchecked(X, 24, w, np.random.default_rng(7), None)
    device = kmeans_plusplus_device(rows, 24, w, np.random.default_rng(7))
    np.testing.assert_array_equal(device, host)
    streamed = DeviceRows(X, w, device="cpu", memory_limit=1000 * 80)
    with pytest.raises(ValueError, match="needs resident rows"):
        kmeans_plusplus_device(streamed, 24, w, np.random.default_rng(7))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_kmeans_on_cuda_equals_the_cpu_fit(precision):
    X, _ = blobs_with_ties(n=20_000, seed=6)
    cpu = KMeans(24, max_iter=10, tol=0, backend="torch", device="cpu").fit(X)
    gpu = KMeans(24, max_iter=10, tol=0, backend="torch", device="cuda", precision=precision).fit(X)
    assert "cuda" in gpu.holds_ and "resident" in gpu.holds_
    np.testing.assert_allclose(gpu.cluster_centers_, cpu.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert (gpu.labels_ != cpu.labels_).mean() < 1e-3  # fp32 ties between two GEMMs aside
    rows = DeviceRows(X, device="cuda", precision=precision, memory_limit=3000 * 80)
    assert rows.streamed
    assert_stats_equal(rows.stats(cpu.cluster_centers_), partial_stats(X, cpu.cluster_centers_))
