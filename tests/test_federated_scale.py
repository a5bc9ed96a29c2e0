"""A thousand federated clients on one machine: virtual clients hosted by four Ray actors, secure aggregation."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.cluster import KMeans
from engine.federated import FederatedKMeans

K, D, ROWS, CLIENTS = 3, 2, 6, 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


def test_a_thousand_virtual_clients_with_secure_aggregation(ray_local):
    rng = np.random.default_rng(0)
    C = np.array([[0, 0], [6, 6], [-6, 6]], np.float32)
    parts = {f"c{i:04d}": (C[rng.integers(0, K, ROWS)] + rng.standard_normal((ROWS, D))).astype(np.float32)
             for i in range(CLIENTS)}
    start = time.perf_counter()
    km = FederatedKMeans(K, init=C, max_rounds=2, tol=0, secure_aggregation=True, clients_per_actor=250).fit(parts)
    seconds = time.perf_counter() - start
    assert seconds < 60, seconds
    assert len({id(h) for h in km.clients_.values()}) == 4  # four host actors, 250 clients each
    ref = KMeans(K, init=C, max_iter=2, tol=0).fit(np.concatenate(list(parts.values())))
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    # SecAgg+: about 2 log2(n) neighbours each, not n - 1.
    assert km.secure_graph_ == {"clients": CLIENTS, "degree": 20, "pairs": CLIENTS * 20 // 2}
    for record in km.history_:
        assert len(record["participants"]) == CLIENTS and record["secure"]
        assert record["seconds"] > 0 and record["server_peak_rss_mb"] > 0
        assert record["bytes_up"] < CLIENTS * 400  # one masked vector of k*d + 2k + 1 words per client
