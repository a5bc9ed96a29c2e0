"""Client-level DP (privacy.unit client): one client's whole contribution bounded, its noise and accounting."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cluster import partial_stats
from engine.config import PrivacyConfig
from engine.errors import ConfigError
from engine.federated import Accountant, FederatedClient, FederatedKMeans, Noise, Release
from engine.federated.algorithms import aggregate
from engine.federated.privacy import clip_contribution

K, D = 3, 4
CLIP, COUNT_CLIP = 6.0, 20.0
# Noise far below the clipping bounds: what is released is the clipped contribution, to 1e-9.
TINY = Noise(sigma_sums=1e-12, count_noise="gaussian", count_scale=1e-12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    return np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]], dtype=np.float32)


def client_rows(centres: np.ndarray, n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, K, n)] + rng.standard_normal((n, D)) + shift).astype(np.float32)


def released(name: str, rows: np.ndarray, centroids: np.ndarray, release: Release) -> dict:
    client = FederatedClient(name, rows)
    client.load()
    return client.lloyd(centroids, 1, release)


def test_clipping_bounds_one_clients_influence_and_keeps_its_means(centres):
    """A neighbouring federation (one client more) moves the released aggregate by at most the clipping bounds,
    however many rows that client has and wherever they lie; row-level DP, the same neighbour, moves it by far
    more (so this test fails if the client's contribution is not bounded as one unit)."""
    honest = {f"c{i}": client_rows(centres, 50, seed=i) for i in range(4)}
    outlier = client_rows(centres, 5_000, seed=9, shift=1_000.0)  # many rows, far from every centroid
    release = Release(round=1, noise=TINY, share_sse=False, client_clip=(CLIP, COUNT_CLIP))

    own = released("x", outlier, centres, release)
    assert np.linalg.norm(own["sums"]) <= CLIP * (1 + 1e-9)
    assert np.linalg.norm(own["counts"]) <= COUNT_CLIP * (1 + 1e-9)
    # One factor for sums and counts: the client's centred means are what it pulls the centroids to.
    true = partial_stats(outlier, centres)
    seen = true.counts > 0
    true_means = true.sums[seen] / true.counts[seen, None] - centres[seen]
    assert np.allclose(own["sums"][seen] / own["counts"][seen, None], true_means, rtol=1e-6)

    def aggregate_of(clients: dict[str, np.ndarray], rel: Release):
        answers = {n: released(n, rows, centres, rel) for n, rows in clients.items()}
        return aggregate(answers, rel, centres.shape, centroids=centres)[0]

    without, with_ = aggregate_of(honest, release), aggregate_of({**honest, "x": outlier}, release)
    # The server reconstructs sums as centred sums + count x centroid: the centred part moves by at most CLIP.
    centred_move = (with_.sums - with_.counts[:, None] * centres) - (without.sums - without.counts[:, None] * centres)
    assert np.linalg.norm(centred_move) <= CLIP * (1 + 1e-6)
    assert np.linalg.norm(with_.counts - without.counts) <= COUNT_CLIP * (1 + 1e-6)

    # Row-level DP bounds a row, not a client: the same neighbour moves the sums by thousands of clip norms.
    row_release = Release(round=1, noise=TINY, share_sse=False)
    rows_clipped = {n: FederatedClient(n, r, clip_norm=CLIP) for n, r in {**honest, "x": outlier}.items()}
    for c in rows_clipped.values():
        c.load()
    row_with = sum(c.lloyd(centres, 1, row_release)["sums"] for c in rows_clipped.values())
    row_without = sum(c.lloyd(centres, 1, row_release)["sums"] for n, c in rows_clipped.items() if n != "x")
    assert np.linalg.norm(row_with - row_without) > 100 * CLIP


def test_clip_contribution_leaves_a_small_client_alone_and_uses_l1_for_laplace():
    sums, counts = np.full((K, D), 0.5), np.array([3.0, 4.0, 0.0])
    assert clip_contribution(sums, counts, CLIP, COUNT_CLIP)[2] == 1.0
    # L2 of the counts is 5, L1 is 7: a count_clip of 6 binds only under Laplace (L1).
    assert clip_contribution(sums, counts, CLIP, 6.0, count_ord=2)[2] == 1.0
    _, clipped, factor = clip_contribution(sums, counts, CLIP, 6.0, count_ord=1)
    assert factor == pytest.approx(6 / 7) and np.abs(clipped).sum() == pytest.approx(6.0)
    # Counts-only releases (the init's candidate counts) bound the counts alone.
    none, clipped, factor = clip_contribution(None, counts * 10, CLIP, COUNT_CLIP)
    assert none is None and np.linalg.norm(clipped) == pytest.approx(COUNT_CLIP) and factor == pytest.approx(0.4)


def test_client_level_noise_is_calibrated_on_the_clients_bounds_per_round_and_in_total():
    row = Accountant(PrivacyConfig(epsilon=1.0, delta=1e-6, clip_norm=2.0, count_noise="gaussian"), releases=3)
    client = Accountant(PrivacyConfig(epsilon=1.0, delta=1e-6, clip_norm=2.0, unit="client", count_clip=50.0,
                                      count_noise="gaussian"), releases=3)
    # The same budget and plan: one noise multiplier, counts' noise scaled by the count sensitivity (50, not 1).
    assert client.noise_multiplier == pytest.approx(row.noise_multiplier, rel=1e-3)
    row_noise, client_noise = row.next_noise(), client.next_noise()
    assert client_noise.count_scale == pytest.approx(50 * row_noise.count_scale, rel=1e-3)
    assert client_noise.sigma_sums == pytest.approx(row_noise.sigma_sums, rel=1e-3)
    reports = [client.spend(client.next_noise()) for _ in range(3)]
    assert all(r["unit"] == "client" for r in reports)
    assert reports[0]["epsilon"] == pytest.approx(reports[2]["epsilon"]) and reports[0]["epsilon"] < 1.0
    totals = [r["epsilon_total"] for r in reports]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(1.0, rel=1e-2)
    # Noise at the row scale would not cover a client's count vector: the accountant would then overspend.
    from engine.federated.privacy import epsilon_of, release_event

    underscaled = epsilon_of([release_event(row_noise, 2.0, count_sensitivity=50.0)] * 3, 1e-6)
    assert underscaled > 5.0


def test_client_level_dp_end_to_end_reports_each_round_and_the_total(centres):
    # 36 clients: the noise (unseeded, as DP noise must be) is fixed by one client's bounds, the signal grows with
    # the clients. With 12, the largest centroid error was 0.25 in half the runs and above 0.35 in 4 of 40; with 36,
    # 0.09 and at most 0.15 in 10 runs.
    parts = {f"c{i}": client_rows(centres, 1000, seed=i) for i in range(36)}
    init = centres + np.float32(0.25)  # every centroid 0.5 away from its centre
    km = FederatedKMeans(K, init=init, max_rounds=3, tol=0, transport="in_process", secure_aggregation=True,
                         privacy={"epsilon": 10.0, "delta": 1e-6, "unit": "client", "clip_norm": 400.0,
                                  "count_clip": 1000 / np.sqrt(K), "count_noise": "gaussian"}).fit(parts)
    assert [r["kind"] for r in km.history_] == ["lloyd"] * 3
    spends = [r["privacy"] for r in km.history_]
    assert all(s["unit"] == "client" for s in spends)
    assert spends[0]["epsilon"] == pytest.approx(spends[2]["epsilon"]) and spends[0]["epsilon"] < 10.0
    totals = [s["epsilon_total"] for s in spends]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(10.0, rel=1e-2)
    assert km.privacy_spent_ == {"epsilon": pytest.approx(10.0, rel=1e-2), "delta": 1e-6}
    assert km.inertia_ is None  # the SSE is private under DP
    # Epsilon 10: the noisy rounds still pull every centroid closer to its centre.
    assert np.all(np.linalg.norm(km.cluster_centers_ - centres, axis=1) < 0.35), km.cluster_centers_


@pytest.mark.parametrize(("privacy", "message"), [
    ({"epsilon": 1.0, "clip_norm": 1.0, "unit": "client"}, r"count_clip is required with epsilon and unit client"
                                                           r".*federated.privacy"),
    ({"epsilon": 1.0, "unit": "client", "count_clip": 5.0}, r"clip_norm is required with epsilon.*a client's"),
    ({"epsilon": 1.0, "clip_norm": 1.0, "count_clip": 5.0}, "count_clip applies to unit client"),
    ({"epsilon": 1.0, "clip_norm": 1.0, "count_clip": 5.0, "unit": "device"}, r"privacy.unit"),
    ({"epsilon": 0, "clip_norm": 1.0, "count_clip": 5.0, "unit": "client"}, r"privacy.epsilon"),
    ({"epsilon": 1.0, "clip_norm": 1.0, "count_clip": -5.0, "unit": "client"}, r"privacy.count_clip"),
])
def test_bad_client_level_settings_are_named(centres, privacy, message):
    parts = {"a": client_rows(centres, 20, 0), "b": client_rows(centres, 20, 1)}
    with pytest.raises(ConfigError, match=message):
        FederatedKMeans(K, init=centres, transport="in_process", privacy=privacy).fit(parts)


def test_dce_federate_names_a_bad_privacy_unit(capsys):
    from jobs.federated import main

    assert main(["--config", "federated", "--set", "federated.privacy.unit=device"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "federated.privacy.unit" in err[0]
