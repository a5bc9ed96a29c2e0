"""The federated algorithms measured alone (in-process clients, no Ray): one_shot near centralised k-means."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cluster import KMeans, assign
from engine.federated import FederatedKMeans, split_indices


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


def mixture(k: int, d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (k, d))
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.standard_normal((n, d))).astype(np.float32), labels


@pytest.mark.parametrize("split, target", [("iid", 1.01), ("dirichlet", 1.03)])
def test_one_shot_is_near_centralised_on_separated_mixtures(split, target):
    # k in the teens, 4 partitions: the case where local_k = k ended 3.5% above centralised on every seed.
    k, d = 12, 16
    for seed in range(3):
        X, y = mixture(k, d, 100 * k, seed)
        rows = split_indices(len(X), 4, split=split, labels=y, alpha=0.1, seed=seed, min_rows=k)
        parts = {name: X[i] for name, i in rows.items()}
        ref = KMeans(k, n_init=10, max_iter=100, seed=seed).fit(X).inertia_
        km = FederatedKMeans(k, mode="one_shot", seed=seed, transport="in_process").fit(parts)
        inertia = float(assign(X, km.cluster_centers_)[1].astype(np.float64).sum())
        assert inertia / ref <= target, (seed, inertia / ref)
        # The clients over-cluster by default (k' = 2k); the old default k' = k is what the sweep improved on.
        assert km.history_[0]["local_centroids"] == 4 * 2 * k
