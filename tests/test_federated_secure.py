"""Secure aggregation from `cryptography`: sparse mask graph, identity-bound keys, and a server that tries to cheat."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from engine.cluster import KMeans, partial_stats
from engine.federated import FederatedClient, FederatedKMeans, Release, secure
from engine.federated.secure import SecureAggregationError

K, D = 3, 2
LEN = K * D + 2 * K + 1  # a masked vector: sums, counts, per-cluster SSE, SSE


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    X, _ = make_blobs(n_samples=40 * 12, n_features=D, centers=K, cluster_std=0.5, random_state=1)
    parts = {f"c{i:02d}": X[i * 12:(i + 1) * 12].astype(np.float32) for i in range(40)}
    return parts, X[:K].astype(np.float32)


def enrolled(parts: dict[str, np.ndarray], degree: int, min_participants: int = 2, relay=None):
    """In-process clients after the two key exchanges, as the server runs them; `relay(receiver, keys)` may
    change what the server relays."""
    clients = {name: FederatedClient(name, X) for name, X in parts.items()}
    identities = {name: c.load()["identity"] for name, c in clients.items()}
    names = tuple(sorted(clients))
    graph = secure.neighbour_graph(names, degree, 7)
    keys = {name: c.enrol({p: identities[p] for p in graph[name]}, names, degree, 7, min_participants)
            for name, c in clients.items()}
    for name, c in clients.items():
        relayed = {p: keys[p] for p in graph[name]}
        c.agree_keys(relay(name, relayed) if relay else relayed)
    return clients, graph


def views(clients, centroids, participants, round_=1, attempt=0) -> dict[str, np.ndarray]:
    release = Release(round=round_, participants=tuple(participants), attempt=attempt)
    return {n: clients[n].lloyd(centroids, 1, release)["masked"] for n in participants}


def truth(clients, centroids, name) -> np.ndarray:
    a = clients[name].lloyd(centroids, 1, Release(round=1))
    return np.concatenate([a["sums"].ravel(), a["counts"], a["cluster_sse"], [a["sse"]]])


def test_sparse_graph_sum_is_exact_and_costs_linear_pairs(data):
    parts, C = data
    degree = 6
    clients, graph = enrolled(parts, degree)
    assert all(len(v) == degree for v in graph.values())  # 40 * 6 / 2 pairs, not 40 * 39 / 2
    assert all(len(c._masking._shared) == degree for c in clients.values())
    names = sorted(parts)
    total = secure.unmasked_sum(list(views(clients, C, names).values()))
    pooled = partial_stats(np.concatenate(list(parts.values())), C)
    np.testing.assert_allclose(total[:K * D].reshape(K, D), pooled.sums, atol=1e-3)
    assert np.array_equal(total[K * D:K * D + K], pooled.counts)
    # A dropped client: the survivors' redone round (a fresh attempt) is exact again.
    survivors = [n for n in names if n != "c05"]
    redo = secure.unmasked_sum(list(views(clients, C, survivors, attempt=1).values()))
    assert np.array_equal(redo[K * D:K * D + K], pooled.counts - partial_stats(parts["c05"], C).counts)
    assert secure.default_degree(1000) == 20 and secure.default_degree(5) == 4


def test_a_substituted_public_key_is_refused(data):
    parts, _ = data
    few = dict(list(parts.items())[:4])
    server_identity = secure.IdentityKey()

    def substitute(receiver, relayed):
        if receiver == "c00":  # the server hands c00 a key of its own for c01: it would know their masks
            forged = secure.KeyPair("c01", server_identity)
            relayed = {**relayed, "c01": forged.signed()}
        return relayed

    with pytest.raises(SecureAggregationError, match="'c00' refuses the public key relayed for 'c01': it is not "
                                                     "signed by 'c01''s identity"):
        enrolled(few, 3, relay=substitute)

    def swap(receiver, relayed):  # c01's genuine, signed key passed off as c02's
        return {**relayed, "c02": relayed["c01"]} if receiver == "c00" else relayed

    with pytest.raises(SecureAggregationError, match="relayed for 'c02'"):
        enrolled(few, 3, relay=swap)
    # Identities are pinned at enrolment: a later enrolment with another identity for a peer is refused.
    clients, _ = enrolled(few, 3)
    names = tuple(sorted(few))
    other = {n: secure.IdentityKey().public for n in names}
    with pytest.raises(SecureAggregationError, match="refuses a new identity for 'c01'"):
        clients["c00"].enrol(other, names, 3, 7, 2)


def test_the_server_cannot_learn_one_clients_vector(data):
    """The server holds every message it received (the relayed keys, every masked view of every round and
    attempt) and tries to get client c03's stats out of them; each attempt fails."""
    parts, C = data
    names = sorted(parts)
    clients, graph = enrolled(parts, 4, min_participants=20)
    target = "c03"
    true = truth(clients, C, target)
    encoded = secure.encode(true, len(names), target)
    # 1. Its view alone: uniformly random words, no counts in [0, rows] among them.
    round_1 = views(clients, C, names, round_=1)
    assert np.mean(round_1[target] != encoded) > 0.99
    assert not np.all((secure.decode(round_1[target])[K * D:K * D + K] >= 0)
                      & (secure.decode(round_1[target])[K * D:K * D + K] <= 12))
    # 2. Two rounds for the same centroids: their difference is not the (zero) true difference.
    round_2 = views(clients, C, names, round_=2)
    assert not np.array_equal(round_1[target], round_2[target])
    # 3. The total minus everyone else's views: the target's view again, still masked (every mask of c03's
    #    neighbours' pairs with c03 stays in), far from its true vector.
    others = sum((v for n, v in round_1.items() if n != target), np.zeros(LEN, np.uint64))
    total = sum(round_1.values(), np.zeros(LEN, np.uint64))
    assert np.array_equal(total - others, round_1[target]) and np.mean(round_1[target] != encoded) > 0.99
    # 4. A dropout (c03's neighbour c?? dropped in attempt 0) and a redo: attempt 0 without the dropped client
    #    leaves the dropped client's masks in, attempt 1 is fresh; differencing the attempts gives noise.
    dropped = sorted(graph[target])[0]
    survivors = [n for n in names if n != dropped]
    attempt_0 = {n: v for n, v in views(clients, C, names, round_=3).items() if n != dropped}
    attempt_1 = views(clients, C, survivors, round_=3, attempt=1)
    diff = secure.decode(attempt_0[target] - attempt_1[target])
    assert np.mean(np.abs(diff) > 1e6) > 0.9
    # 5. Isolating it: a round of c03 alone, with only non-neighbours (its masks would cancel or be absent), or
    #    fewer participants than agreed at enrolment. Each is refused.
    non_neighbours = [n for n in names if n != target and n not in graph[target]]
    for participants, why in (([target], "refuses a round of 1 participants"),
                              ([target, *non_neighbours[:25]], "do not form a connected mask graph"),
                              ([target, *sorted(graph[target])], "refuses a round of 5 participants")):
        with pytest.raises(SecureAggregationError, match=why):
            views(clients, C, participants, round_=4)
    # 6. Substituting a neighbour's key to know the masks: refused at key agreement (see the test above).


def test_many_virtual_clients_with_a_sparse_graph_in_process(data):
    parts, C = data
    X = np.concatenate(list(parts.values()))
    km = FederatedKMeans(K, init=C, max_rounds=4, tol=0, secure_aggregation=True, secure_neighbours=4,
                         clients_per_actor=16, transport="in_process").fit(parts)
    ref = KMeans(K, init=C, max_iter=4, tol=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    assert km.secure_graph_ == {"clients": 40, "degree": 4, "pairs": 80}
    assert all(r["secure"] for r in km.history_) and len(km.history_[-1]["participants"]) == 40
