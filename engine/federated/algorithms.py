"""The federated k-means algorithms: k-FED's one-shot union, the candidates init and federated Lloyd rounds.

Each is a sequence of exchanges over a `Transport` and arithmetic on what came back; none knows where the
clients run. The server-side record of a round (history, privacy spend, experiment metrics) is the caller's
`record` callback.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.cluster import KMeans, PartialStats
from engine.cluster._lloyd import lloyd
from engine.errors import DataError
from engine.federated import recovery, secure
from engine.federated.client import Release
from engine.federated.privacy import Accountant
from engine.federated.transport import Transport

# The server's k-means runs on a few thousand weighted points at most: restarts cost little there, and a stuck
# server run was the largest one_shot gap left once the clients over-cluster (benchmarks/federated.py --sweep).
SERVER_N_INIT = 25
# Default local over-clustering k' = OVERCLUSTER * k (capped at a partition's rows), as k-FED's analysis allows.
OVERCLUSTER = 2

Record = Callable[[dict[str, Any], dict[str, Any], float, "np.ndarray | None"], None]


@dataclass
class Session:
    """What the algorithms need of one fit: the transport, the settings and the server's record callback."""

    transport: Transport
    n_clusters: int
    local_k: int | None  # None: min(OVERCLUSTER * n_clusters, rows) per client
    rows: dict[str, int]
    local_max_iter: int
    tol: float
    seed: int
    backend: str
    secure: bool  # rounds with secure aggregation: the clients' stats arrive masked
    min_count: int
    accountant: Accountant | None
    record: Record
    client_clip: tuple[float, float] | None = None  # client-level DP: (clip_norm, count_clip)
    recovery: dict[str, frozenset[str]] | None = None  # dropout recovery (secure rounds): the public mask graph
    error: Callable[[str, str, type], Exception] | None = None  # names the setting in a message

    def fail(self, param: str, message: str) -> Exception:
        return self.error(param, message, DataError) if self.error is not None else DataError(message)


def release_maker(s: Session, counts_only: bool = False, share_sse: bool = True,
                  noise: bool = True) -> Callable[[list[str], int], Release]:
    """The Release of each attempt of an exchange: noise from the accountant, masks among its participants."""

    def make(participants: list[str], attempt: int) -> Release:
        dp = s.accountant is not None and noise
        return Release(
            round=s.transport.round,
            noise=s.accountant.next_noise(counts_only) if dp else None,
            noise_shares=len(participants) if s.secure else 1,
            min_count=s.min_count,
            counts_only=counts_only,
            share_sse=share_sse and not dp,
            participants=tuple(participants) if s.secure else None,
            attempt=attempt,
            client_clip=s.client_clip if dp else None,
        )

    return make


def secure_exchange(s: Session, kind: str, call: Callable, make: Callable[[list[str], int], Release]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One exchange of stats; with dropout recovery, Bonawitz et al.'s rounds around it instead of a redo.

    Shares (each client's key and fresh self-mask seed, sealed for each neighbour, relayed), the masked views
    (a client that drops is not waited for again), then the survivors' reveals; the server removes the self and
    dangling masks (recovery.unmask) and the answers become one `total`. A dropped client is out of the round;
    later rounds ask it again (no mask key of it was revealed).
    """
    if s.recovery is None or not s.secure:
        return s.transport.exchange(kind, call, make)
    graph = s.recovery
    t, round_ = s.transport, s.transport.round
    boxes, facts = t.exchange("shares", lambda name, r: ("share_seeds", (round_,)), None)
    t.dead.update(facts["dropped"])
    _, facts = t.exchange("shares", lambda name, r: (
        "receive_shares", (round_, {p: boxes[p][name] for p in graph[name] if p in boxes})), None)
    t.dead.update(facts["dropped"])
    answers, facts = t.exchange(kind, call, lambda participants, attempt: dataclasses.replace(
        make(participants, attempt), self_mask=True), redo=False)
    dropped = [n for n in facts["release"].participants if n not in answers]
    survivors = list(answers)
    reveals, more = t.exchange("unmask", lambda name, r: ("reveal_shares", (round_, dropped, survivors)), None)
    total = recovery.unmask({n: a["masked"] for n, a in answers.items()}, reveals, graph)
    facts = {**facts, "dropped": {**facts["dropped"], **more["dropped"]},
             "bytes_down": facts["bytes_down"] + more["bytes_down"], "bytes_up": facts["bytes_up"] + more["bytes_up"]}
    return {"": {"total": total, "participants": survivors}}, facts


def local_kmeans_union(s: Session, kind: str) -> np.ndarray:
    """k-FED: the clients' local k-means, then weighted k-means (k-means++ init) of the union on the server."""
    if kind == "local_kmeans":
        s.transport.round += 1
    start = time.perf_counter()
    seeds = {name: int(np.random.SeedSequence([s.seed, i]).generate_state(1)[0])
             for i, name in enumerate(s.transport.names)}
    release = release_maker(s)

    def clear(participants: list[str], attempt: int) -> Release:
        # The union needs each client's own centroids: never masked.
        return dataclasses.replace(release(participants, attempt), participants=None, noise_shares=1)

    local_k = {name: s.local_k if s.local_k is not None else min(OVERCLUSTER * s.n_clusters, rows)
               for name, rows in s.rows.items()}
    answers, facts = s.transport.exchange(
        kind, lambda name, r: ("local_kmeans", (local_k[name], seeds[name], s.local_max_iter, s.tol, r)), clear)
    points, weights = [], []
    for answer in answers.values():
        keep = answer["counts"] > 0
        points.append((answer["sums"][keep] / answer["counts"][keep, None]).astype(np.float32))
        weights.append(answer["counts"][keep])
    points, weights = np.concatenate(points), np.concatenate(weights)
    if points.shape[0] < s.n_clusters:
        raise s.fail("local_k", f"{kind}: the clients shared {points.shape[0]} local centroids (after min_count "
                     f"suppression), fewer than n_clusters={s.n_clusters}; lower privacy.min_count or raise local_k")
    server = KMeans(s.n_clusters, init="k-means++", n_init=SERVER_N_INIT, max_iter=max(100, s.local_max_iter),
                    tol=s.tol, seed=s.seed, backend=s.backend).fit(points, sample_weight=weights)
    record = {"round": s.transport.round, "kind": kind, "objective": None, "rel_change": None, "shift": None,
              "empty": 0, "local_centroids": int(points.shape[0]),
              "partition_inertia": {n: a["sse"] for n, a in answers.items()}}
    s.record(record, facts, start, server.cluster_centers_)
    return server.cluster_centers_


def weighted_candidates(s: Session, candidates: np.ndarray) -> np.ndarray:
    """FedDP-KMeans-style init: the clients count their rows nearest each server-side candidate (one counts
    release, private under DP); weighted k-means of the candidates gives k centroids."""
    start = time.perf_counter()
    answers, facts = secure_exchange(s, "init", lambda name, r: ("lloyd", (candidates, 1, r)),
                                     release_maker(s, counts_only=True))
    counts = aggregate(answers, facts["release"], candidates.shape)[0].counts
    weights = np.maximum(counts, 0.0)
    if np.count_nonzero(weights) < s.n_clusters:
        raise s.fail("init", f"init: only {np.count_nonzero(weights)} of {candidates.shape[0]} candidate points "
                     f"have rows nearest to them, fewer than n_clusters={s.n_clusters}; give more candidates")
    server = KMeans(s.n_clusters, init="k-means++", n_init=SERVER_N_INIT, max_iter=s.local_max_iter,
                    tol=s.tol, seed=s.seed, backend=s.backend).fit(candidates, sample_weight=weights)
    record = {"round": s.transport.round, "kind": "init", "objective": None, "rel_change": None, "shift": None,
              "empty": 0, "candidates": int(candidates.shape[0]), "partition_inertia": dict.fromkeys(answers)}
    s.record(record, facts, start, server.cluster_centers_)
    return server.cluster_centers_


def lloyd_rounds(s: Session, centroids: np.ndarray, max_rounds: int, local_steps: int) -> tuple[np.ndarray, int]:
    """Federated Lloyd: the one Lloyd loop, whose step is one broadcast of the centroids and one sum of the
    clients' stats. Empty clusters are repaired from the summed statistics alone (`split_empty`): no row leaves a
    client for it. It splits by the per-cluster SSE the clients send beside their SSE, as KMeans does, and by
    the counts under DP (which releases no SSE): post-processing of released counts. Returns (centroids, rounds)."""
    current: dict[str, Any] = {}  # the round in progress: its start, exchange facts and partition SSEs

    def step(C: np.ndarray) -> PartialStats:
        s.transport.round += 1
        current["start"] = time.perf_counter()
        answers, current["facts"] = secure_exchange(
            s, "lloyd", lambda name, r: ("lloyd", (C, local_steps, r)), release_maker(s))
        stats, _, current["per_partition"] = aggregate(answers, current["facts"]["release"], C.shape, centroids=C)
        return stats

    def on_iteration(record: dict[str, Any], new: np.ndarray) -> None:
        kept = {k: record[k] for k in ("objective", "rel_change", "shift", "empty", "empty_repaired")}
        s.record({"round": s.transport.round, "kind": "lloyd", **kept, "partition_inertia": current["per_partition"]},
                 current["facts"], current["start"], new)

    result = lloyd(step, centroids, max_iter=max_rounds, tol=s.tol, on_iteration=on_iteration)
    return result.centroids, result.n_iter


def evaluate(s: Session, centroids: np.ndarray) -> float | None:
    """The global SSE of the final centroids: one more exchange, skipped under DP (the SSE is private)."""
    if s.accountant is not None:
        return None
    s.transport.round += 1
    start = time.perf_counter()
    answers, facts = secure_exchange(s, "evaluate", lambda name, r: ("lloyd", (centroids, 1, r)),
                                     release_maker(s, noise=False))
    _, sse, per_partition = aggregate(answers, facts["release"], centroids.shape)
    record = {"round": s.transport.round, "kind": "evaluate", "objective": sse, "rel_change": None, "shift": 0.0,
              "empty": 0, "partition_inertia": per_partition}
    s.record(record, facts, start, None)
    return sse


def aggregate(answers: dict[str, Any], release: Release, shape: tuple[int, int], centroids: np.ndarray | None = None
              ) -> tuple[PartialStats, float | None, dict[str, float | None]]:
    """The aggregate stats (sums, counts), the global SSE when shared, and each partition's SSE when seen.

    Under client-level DP the clients' sums are centred on `centroids` (the request's): count x centroid is added
    back here, so the mean of a cluster is its centroid plus the noisy centred sum over the noisy count.
    """
    k, d = shape
    cluster_sse = None
    if release.participants is not None:
        # With dropout recovery the server already removed the masks: one total (secure_exchange).
        total = answers[""]["total"] if "" in answers else secure.unmasked_sum([a["masked"] for a in answers.values()])
        if release.counts_only:
            sums, counts, sse = np.zeros((k, d)), total, None
        else:
            sums, counts = total[:k * d].reshape(k, d), total[k * d:k * d + k]
            cluster_sse, sse = total[k * d + k:k * d + 2 * k], float(total[-1])
        per_partition = dict.fromkeys(answers[""]["participants"] if "" in answers else answers)
    else:
        counts = np.sum([a["counts"] for a in answers.values()], axis=0)
        sums = np.zeros((k, d)) if release.counts_only else np.sum([a["sums"] for a in answers.values()], axis=0)
        per_partition = {n: a.get("sse") for n, a in answers.items()}
        sse = None if release.counts_only or not release.share_sse else float(sum(per_partition.values()))
        if all(a.get("cluster_sse") is not None for a in answers.values()):
            cluster_sse = np.sum([a["cluster_sse"] for a in answers.values()], axis=0)
    if release.client_clip is not None and not release.counts_only:
        # Dividing a noisy centred sum by a count that noise could have made small would throw the centroid
        # anywhere: counts are floored at 3 standard deviations of their noise, so such a cluster takes a shorter
        # step towards its noisy mean, and noise alone never empties one. Post-processing: the noise scale is public.
        counts = np.maximum(counts, 3 * count_noise_std(release, len(answers)))
        sums = sums + counts[:, None] * np.asarray(centroids, dtype=np.float64)
    if release.noise is not None:
        # A noisy count below one row says nothing reliable about the mean: treat the cluster as empty.
        small = counts < 1
        sums, counts = sums.copy(), counts.copy()
        sums[small], counts[small] = 0.0, 0.0
    if not release.share_sse or release.noise is not None:
        sse = cluster_sse = None
    return PartialStats(sums, counts, float("nan") if sse is None else sse, cluster_sse), sse, per_partition


def count_noise_std(release: Release, clients: int) -> float:
    """The standard deviation of the noise on an aggregate count summed over `clients` messages."""
    noise = release.noise
    if noise is None:
        return 0.0
    if noise.count_noise == "laplace":  # every client adds the full scale (Laplace does not split)
        return float(np.sqrt(2.0 * clients) * noise.count_scale)
    return float(noise.count_scale * np.sqrt(clients / release.noise_shares))

