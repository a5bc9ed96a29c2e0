"""Dropout recovery for secure aggregation (engine.federated.recovery): the round completes without a redo."""

from __future__ import annotations

import numpy as np
import pytest

from engine.federated import secure
from engine.federated.recovery import RecoveringClient, threshold, unmask
from engine.federated.secure import SecureAggregationError

N, DEGREE, LENGTH, ROUND = 12, 6, 7, 3


@pytest.fixture
def federation():
    """N enrolled clients with agreed keys over a sparse Harary graph of DEGREE, each with a vector to sum."""
    names = tuple(f"c{i:02d}" for i in range(N))
    maskings = {n: secure.Masking(n) for n in names}
    identities = {n: m.identity.public for n, m in maskings.items()}
    graph = secure.neighbour_graph(names, DEGREE, 7)
    keys = {n: m.enrol({p: identities[p] for p in graph[n]}, names, DEGREE, 7, 2) for n, m in maskings.items()}
    for n, m in maskings.items():
        m.agree({p: keys[p] for p in graph[n]})
    clients = {n: RecoveringClient(m) for n, m in maskings.items()}
    rng = np.random.default_rng(0)
    vectors = {n: rng.normal(size=LENGTH).round(3) for n in names}
    return names, graph, keys, clients, vectors


def run_round(federation, drop: set[str], round_: int = ROUND):
    """Shares out to all, then `drop` leave before their masked view arrives; returns what the server holds."""
    names, graph, keys, clients, vectors = federation
    boxes = {n: c.share(round_) for n, c in clients.items()}
    for n, c in clients.items():  # the server relays each client the boxes sealed for it
        c.receive(round_, {sender: boxes[sender][n] for sender in graph[n]})
    views = {n: clients[n].masked(vectors[n], names, round_) for n in names if n not in drop}
    survivors = set(views)
    reveals = {n: clients[n].reveal(round_, drop, survivors) for n in survivors}
    return views, reveals, boxes


def test_a_client_dropped_mid_round_leaves_the_exact_sum_of_the_survivors(federation):
    names, graph, keys, clients, vectors = federation
    drop = {"c03", "c07"}  # they masked nothing that arrived, after their shares went out
    views, reveals, _ = run_round(federation, drop)
    total = unmask(views, reveals, graph)
    assert np.allclose(total, sum(vectors[n] for n in names if n not in drop), atol=1e-5)
    # No redo: the views are the one attempt of the round (attempt 0), and the dangling masks were real.
    assert not np.allclose(secure.decode(sum(views.values())), total, atol=1.0)


def test_the_server_cannot_learn_a_survivors_vector_from_all_it_holds(federation):
    names, graph, keys, clients, vectors = federation
    views, reveals, boxes = run_round(federation, {"c03"})
    u = "c05"
    # The server rebuilds u's self mask from the revealed shares, as unmasking does ...
    from engine.federated.recovery import SELF, combine, self_mask

    shares = [r[u][1] for r in reveals.values() if u in r and r[u][0] == SELF]
    seed = combine(shares, threshold(len(graph[u])), u)
    without_self = secure.decode(views[u] - self_mask(seed, LENGTH))
    # ... but u's pairwise masks stay on: what is left is not u's vector.
    assert not np.allclose(without_self, vectors[u], atol=1.0)
    # The boxes it relayed are sealed (ChaCha20-Poly1305): a share and its tag, never in clear.
    assert all(len(b) == 40 + 16 for b in boxes[u].values())
    # Asking u's neighbours for the other kind (the masks they added towards u) is refused.
    for peer in graph[u]:
        if peer != "c03":
            with pytest.raises(SecureAggregationError, match=f"refuses to reveal the key share of '{u}'"):
                clients[peer].reveal(ROUND, {u}, set())
    # So is one request naming a client both dropped and surviving.
    with pytest.raises(SecureAggregationError, match="both dropped and surviving"):
        clients["c00"].reveal(ROUND, {u}, {u})


def test_too_few_survivors_refuse_the_round(federation):
    names, graph, keys, clients, vectors = federation
    u = "c04"
    drop = set(sorted(graph[u])[: len(graph[u]) - threshold(len(graph[u])) + 1])  # t - 1 of u's holders survive
    views, reveals, _ = run_round(federation, drop)
    with pytest.raises(SecureAggregationError, match=f"shares of the self mask of '{u}', fewer than the threshold"):
        unmask(views, reveals, graph)


def test_a_share_box_not_sealed_by_its_sender_is_refused(federation):
    names, graph, keys, clients, vectors = federation
    boxes = {n: c.share(ROUND) for n, c in clients.items()}
    a, b = sorted(graph["c00"])[:2]
    forged = {sender: boxes[sender]["c00"] for sender in graph["c00"]}
    forged[a] = boxes[b]["c00"]  # b's box passed off as a's
    with pytest.raises(SecureAggregationError, match=f"refuses the shares relayed from '{a}'"):
        clients["c00"].receive(ROUND, forged)


def test_federated_kmeans_recovers_a_client_dropped_mid_round_without_a_redo():
    from engine.cluster import partial_stats
    from engine.federated import FederatedKMeans

    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [6, 0], [0, 6]], dtype=np.float32)
    parts = {f"p{i:02d}": (centres[rng.integers(0, 3, 40)] + rng.standard_normal((40, 2))).astype(np.float32)
             for i in range(10)}
    init = centres + np.float32(0.5)
    victim = "p04"

    def crash(*args):
        raise RuntimeError("client crashed mid-round")

    def drop_after_round_one(record):
        # From round 2 on the victim crashes when asked for its stats: it has shared its seeds by then.
        if record["round"] == 1:
            km._transport.host_of[victim].clients[victim].lloyd = crash

    km = FederatedKMeans(3, init=init, max_rounds=2, tol=0, transport="in_process", secure_aggregation=True,
                         secure_neighbours=4, dropout_recovery=True, callback=drop_after_round_one)
    km.fit(parts)
    second = [r for r in km.history_ if r["kind"] == "lloyd"][1]
    assert list(second["dropped"]) == [victim] and second["attempts"] == 1 and victim not in second["participants"]
    # The exact Lloyd step of the survivors from round 1's centroids.
    first = [r for r in km.history_ if r["kind"] == "lloyd"][0]
    assert first["dropped"] == {}
    all_rows = np.concatenate(list(parts.values()))
    c1 = partial_stats(all_rows, init).centroids(init)[0]
    survivors = np.concatenate([x for n, x in parts.items() if n != victim])
    c2 = partial_stats(survivors, c1).centroids(c1)[0]
    assert np.allclose(km.cluster_centers_, c2, atol=1e-4)
