"""FederatedClient: one partition's rows, kept in one process; only sums, counts and SSE ever leave it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.cluster import PartialStats, partial_stats
from engine.errors import EngineError
from engine.federated import recovery, secure
from engine.federated.partitions import label_counts, read_partition
from engine.federated.privacy import Noise, add_noise, clip_contribution, clip_rows, suppress_small


@dataclass(frozen=True)
class Release:
    """How a client turns its statistics into the message it sends, for one round.

    noise: DP noise (None: none); noise_shares: clients summed by secure aggregation, over which the Gaussian
    noise is split; min_count: suppression threshold; counts_only: send the counts alone; share_sse: send the
    SSE (never under DP); participants and attempt: the secure-aggregation round (participants None: in clear);
    client_clip: client-level DP's (clip_norm, count_clip): the sums are sent centred on the request's centroids
    and the whole contribution is scaled to fit both bounds before the noise (None: row-level or no DP).
    """

    round: int
    noise: Noise | None = None
    noise_shares: int = 1
    min_count: int = 0
    counts_only: bool = False
    share_sse: bool = True
    participants: tuple[str, ...] | None = None
    attempt: int = 0
    client_clip: tuple[float, float] | None = None
    self_mask: bool = False  # dropout recovery: the masked view carries this round's self mask too


class FederatedClient:
    """The client of one partition: reads only that partition and answers the server's requests.

    Every answer is an aggregate over the partition, shaped by the request's centroids (k rows) or the local
    k (k' rows): sums (k, d), counts (k,) and an SSE, after the privacy transform and, with secure aggregation,
    as one masked uint64 vector. Plain class: Ray wraps it with `ray.remote`, and it works in-process too.
    """

    def __init__(self, name: str, source: Any, column: str | None = None, label_column: str | None = None,
                 backend: str = "auto", clip_norm: float | None = None):
        self.name = name
        self._source = source
        self._column = column
        self._label_column = label_column
        self._backend = backend
        self._clip_norm = clip_norm
        self._X = np.zeros((0, 0), dtype=np.float32)
        self._masking = secure.Masking(name)
        self._recovering = recovery.RecoveringClient(self._masking)
        # DP noise must be unknown to the server: OS entropy, never a seed the server could know.
        self._rng = np.random.default_rng()
        self.node_id: str | None = None

    def load(self) -> dict[str, Any]:
        """Read the partition; returns its size, dimension, label counts and the node it is on.

        A separate call rather than the constructor, so a DataError reaches the server as itself.
        """
        X, labels = read_partition(self.name, self._source, self._column, self._label_column)
        self._source = None  # the rows now live in self._X
        if self._clip_norm is not None and X.shape[0]:
            X = clip_rows(X, self._clip_norm)
        self._X = X
        self.node_id = _node_id()
        return {"rows": int(X.shape[0]), "dim": int(X.shape[1]), "labels": label_counts(labels),
                "node_id": self.node_id, "identity": self._masking.identity.public}

    # --- secure aggregation: key agreement ----------------------------------------------------------

    def enrol(self, identities: dict[str, bytes], names: tuple[str, ...], degree: int, seed: int,
              min_participants: int) -> dict[str, bytes]:
        """Pin the neighbours' identities and the public mask graph; returns this client's signed X25519 key."""
        return self._masking.enrol(identities, names, degree, seed, min_participants)

    def agree_keys(self, signed_keys: dict[str, dict[str, bytes]]) -> None:
        """Derive the key shared with every neighbour from the signed public keys the server relayed; a key not
        signed by the neighbour's pinned identity is refused (SecureAggregationError)."""
        self._masking.agree(signed_keys)

    # --- secure aggregation: dropout recovery (engine.federated.recovery) ---------------------------

    def share_seeds(self, round_: int) -> dict[str, bytes]:
        """This round's self-mask seed and the X25519 key, shared among the neighbours, sealed for each."""
        return self._recovering.share(round_)

    def receive_shares(self, round_: int, boxes: dict[str, bytes]) -> None:
        """Keep the shares the neighbours sealed for this client."""
        self._recovering.receive(round_, boxes)

    def reveal_shares(self, round_: int, dropped: list[str], survivors: list[str]) -> dict:
        """Key shares of dropped neighbours, self-mask shares of surviving ones; never both for one peer."""
        return self._recovering.reveal(round_, set(dropped), set(survivors))

    # --- the requests -------------------------------------------------------------------------------

    def local_kmeans(self, n_clusters: int, seed: int, max_iter: int, tol: float, release: Release) -> dict:
        """k-FED's local step: k-means with k' clusters on this partition; sends sums and counts (k' rows)."""
        from engine.cluster import KMeans  # scikit-learn's estimator API: only k-FED's clients pay its import

        km = KMeans(n_clusters, init="k-means++", n_init=1, max_iter=max_iter, tol=tol, seed=seed,
                    backend=self._backend).fit(self._X)
        return self._message(partial_stats(self._X, km.cluster_centers_, backend=self._backend), release)

    def lloyd(self, centroids: np.ndarray, local_steps: int, release: Release) -> dict:
        """Stats of this partition for the broadcast centroids; with local_steps > 1, those of the last of that
        many local Lloyd steps (FedAvg style: the server weights the local centroids by their counts).

        The SSE sent is that of the broadcast centroids, so the server's sum is the global inertia.
        """
        stats = partial_stats(self._X, centroids, backend=self._backend)
        sse, cluster_sse = stats.sse, stats.cluster_sse
        local = np.asarray(centroids, dtype=np.float32)
        for _ in range(local_steps - 1):
            local, _ = stats.centroids(local)
            stats = partial_stats(self._X, local, backend=self._backend)
        sums = stats.sums
        if release.client_clip is not None:
            # Client-level DP bounds the sums around the broadcast centroids (the server adds count x centroid
            # back): their norm is the client's spread, not its distance from the origin. local_steps is 1 here.
            sums = sums - stats.counts[:, None] * np.asarray(centroids, dtype=np.float64)
        return self._message(PartialStats(sums, stats.counts, sse, cluster_sse), release)

    def _message(self, stats: PartialStats, release: Release) -> dict:
        """The privacy transform, then the clear or masked message."""
        sums, counts = stats.sums, stats.counts
        if release.client_clip is not None:
            ord_ = 1 if release.noise is not None and release.noise.count_noise == "laplace" else 2
            clipped, counts, _ = clip_contribution(None if release.counts_only else sums, counts,
                                                   *release.client_clip, count_ord=ord_)
            sums = sums if clipped is None else clipped
        if release.noise is not None:
            sums, counts = add_noise(sums, counts, release.noise, self._rng, release.noise_shares)
        sums, counts, suppressed = suppress_small(sums, counts, release.min_count)
        shared = release.share_sse and release.noise is None
        sse = stats.sse if shared else None
        # Per-cluster SSE goes with the SSE (never under DP): the empty-cluster repair splits by it. A suppressed
        # cluster's is zeroed with its sums.
        cluster_sse = None if not shared or stats.cluster_sse is None else np.where(counts > 0, stats.cluster_sse, 0.0)
        if release.participants is None:
            if release.counts_only:
                return {"counts": counts, "suppressed": suppressed}
            return {"sums": sums, "counts": counts, "sse": sse, "cluster_sse": cluster_sse, "suppressed": suppressed}
        k = counts.shape[0]
        values = counts if release.counts_only else np.concatenate(
            [sums.ravel(), counts, np.zeros(k) if cluster_sse is None else cluster_sse, [sse or 0.0]])
        if release.self_mask:
            view = self._recovering.masked(values, release.participants, release.round)
        else:
            view = self._masking.masked(values, release.participants, release.round, release.attempt)
        return {"masked": view}


class ClientHost:
    """Hosts the clients of one or more partitions in one process (virtual clients): each keeps its own rows,
    keys and noise; the host only routes the server's requests to them. Ray wraps it with `ray.remote`."""

    def __init__(self, sources: dict[str, Any], **client_args: Any):
        self.clients = {name: FederatedClient(name, source, **client_args) for name, source in sources.items()}

    def call(self, batch: list[tuple[str, str, tuple]]) -> dict[str, tuple[str, Any]]:
        """Run each (partition, method, args) request; returns partition -> ("ok", answer) or ("error", why).

        An engine error (bad input) is returned as itself for the server to raise; anything else only fails that
        partition, as a crashed client would.
        """
        out: dict[str, tuple[str, Any]] = {}
        for name, method, args in batch:
            try:
                out[name] = ("ok", getattr(self.clients[name], method)(*args))
            except EngineError as e:
                out[name] = ("error", e)
            except Exception as e:  # one partition's failure must not take its host's other partitions down
                out[name] = ("error", f"{type(e).__name__}: {str(e)[:200]}")
        return out


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
