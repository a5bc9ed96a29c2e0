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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_dead_host_drops_its_virtual_clients_and_the_secure_round_is_redone(ray_local):
    rng = np.random.default_rng(1)
    C = np.array([[0, 0], [6, 6], [-6, 6]], np.float32)
    parts = {f"c{i:02d}": (C[rng.integers(0, K, ROWS)] + rng.standard_normal((ROWS, D))).astype(np.float32)
             for i in range(60)}

    def kill_a_host_after_round_1(record):
        if record["kind"] == "lloyd" and record["round"] == 1:
            ray_local.kill(km.clients_["c10"])  # the host of c10 .. c19

    km = FederatedKMeans(K, init=C, max_rounds=3, tol=0, secure_aggregation=True, clients_per_actor=10,
                         callback=kill_a_host_after_round_1)
    km.fit(parts)
    second = km.history_[1]
    gone = [f"c{i}" for i in range(10, 20)]
    assert sorted(second["dropped"]) == gone and all("client died" in second["dropped"][n] for n in gone)
    assert second["attempts"] == 2 and len(second["participants"]) == 50
    survivors = np.concatenate([X for n, X in parts.items() if n not in gone])
    last = km.history_[-1]
    assert last["kind"] == "evaluate" and len(last["participants"]) == 50
    # The evaluate round's secure sum over the 50 survivors is exact: their SSE for the final centroids.
    sse = float(((survivors[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1).min(1).sum())
    assert km.inertia_ == pytest.approx(sse, rel=1e-5)
