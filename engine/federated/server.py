"""FederatedKMeans, the server side: one client actor per partition, and only their aggregates reach it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from resource import RUSAGE_SELF, getrusage
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.validation import check_is_fitted

from engine.cluster import KMeans, assign
from engine.cluster._stats import as_float32_matrix, check_int, check_n_clusters, resolve_backend
from engine.errors import ConfigError, DataError, EngineError
from engine.federated import algorithms, secure
from engine.federated.algorithms import Session
from engine.federated.client import Release
from engine.federated.partitions import read_partition, resolve_partitions
from engine.federated.privacy import Accountant, privacy_config
from engine.federated.transport import (
    PIN_AMOUNT,
    InProcessTransport,
    RayTransport,
    Transport,
    start_local_hosts,
    start_ray_hosts,
)

logger = logging.getLogger(__name__)

MODES = ("one_shot", "rounds")
# ray: a Ray actor per client host (the deployment); in_process: the hosts in the driver, no Ray (to measure the
# algorithms alone: no placement, no timeouts).
# flower: Flower's simulation engine, the clients' hosts as virtual SuperNodes (engine.federated.flower).
TRANSPORTS = ("ray", "in_process", "flower")
# The centralised reference of experiment mode: a strong baseline, as scikit-learn's classic default.
_REFERENCE_N_INIT = 10


# The pipeline config key of each parameter: errors name it beside the parameter, for `dce federate` users.
CONFIG_KEYS = {
    "n_clusters": "cluster.k", "mode": "federated.mode", "local_k": "federated.local_k",
    "max_rounds": "federated.max_rounds", "local_steps": "federated.local_steps", "local_max_iter": "cluster.max_iter",
    "seed": "seed", "tol": "cluster.tol", "quorum": "federated.quorum", "round_timeout": "federated.round_timeout",
    "secure_aggregation": "federated.secure_aggregation", "compare_centralised": "federated.compare_centralised",
    "init": "federated.init_points", "placement": "federated.placement", "privacy": "federated.privacy",
    "backend": "cluster.backend", "secure_neighbours": "federated.secure_neighbours",
    "dropout_recovery": "federated.dropout_recovery", "clients_per_actor": "federated.clients_per_actor",
}


def _error(param: str, message: str, kind: type[EngineError] = ConfigError) -> EngineError:
    """`message` with the config key of `param` added: "local_k=5 should be ... (config: federated.local_k)."."""
    if param not in CONFIG_KEYS:
        return kind(f"{message.rstrip('.')}.")
    return kind(f"{message.rstrip('.')} (config: {CONFIG_KEYS[param]}).")


class FederatedKMeans(BaseEstimator):
    """k-means over data partitions that never pool their rows: one Ray actor per partition, aggregates only.

    Parameters
    ----------
    n_clusters : number of centroids k.
    mode : "rounds" (federated Lloyd: the server broadcasts centroids, each client returns per-cluster sums,
        counts and SSE, the server divides; without privacy this equals centralised Lloyd from the same init up
        to float rounding) or "one_shot" (k-FED, Dennis et al. ICML 2021: each client runs k-means with
        local_k clusters and sends sums and counts; the server runs weighted k-means, k-means++ init, over the
        union of the local centroids weighted by their counts).
    local_k : k' of the clients' local k-means (one_shot, and the init of rounds). Default: over-clustering,
        min(2 n_clusters, the partition's rows): a local cluster then rarely straddles two true ones, which is what
        keeps k-FED near centralised cost (benchmarks/federated.py --sweep). Every partition needs at least
        local_k rows (default: n_clusters rows).
    max_rounds, tol : rounds: at most max_rounds Lloyd rounds; stop when the relative decrease of the global
        inertia falls below tol (as `KMeans`); under DP the inertia is not released and every round runs.
    local_steps : rounds: Lloyd steps each client runs locally per round, FedAvg style (the server weights the
        local centroids by their counts); 1 is exact federated Lloyd.
    local_max_iter : iterations of the clients' local k-means.
    init : rounds: "k-means++" (federated: the one_shot result, i.e. k-means++ and weighted Lloyd on the
        union of the clients' local centroids, which are sent in clear even with secure aggregation), or an
        array of server-side points: k rows are the initial centroids, more rows are candidates that the
        clients weight by how many of their rows are nearest (one counts release, as FedDP-KMeans's init), and
        weighted k-means of the candidates gives the k initial centroids.
    privacy : None, or a `PrivacyConfig` / dict of its keys: min_count (clusters smaller than that are not
        shared), epsilon / delta / clip_norm / count_noise / count_share (differential privacy of the whole
        run, see engine.federated.privacy). DP needs mode="rounds", local_steps=1 and an array init: a local
        k-means output has no bounded sensitivity.
    secure_aggregation : rounds: clients send masked fixed-point vectors whose sum is exact and whose parts
        reveal nothing (engine.federated.secure: X25519 keys signed by Ed25519 client identities, ChaCha20
        masks over a sparse neighbour graph); a client that drops out makes the round run again without it.
    dropout_recovery : secure aggregation: a client that drops mid-round is recovered without a redo (Bonawitz
        et al.'s double masking: secret-shared self masks, engine.federated.recovery).
    secure_neighbours : degree of the mask graph (None: every pair up to 8 clients, else ~2 log2 n, as SecAgg+).
    clients_per_actor : virtual clients: partitions hosted per client process, each with its own rows, keys
        and noise (1: one actor per partition); a host that dies takes its partitions out of the run.
    transport : "ray" (client hosts are Ray actors), "in_process" (hosts in this process, run in turn: to
        measure the algorithms without Ray; no placement, no round_timeout) or "flower" (Flower's simulation
        engine: each host is a virtual SuperNode running the ClientApp of engine.federated.flower; needs the
        `federated-kmeans` extra). A deployment on real SuperNodes uses `fit_transport` in a ServerApp.
    placement : None (Ray places the clients, spread), "resource" (the client of partition p needs the custom
        resource `partition:p`) or a dict partition name -> custom resource name.
    quorum : share of the clients that must answer each round; failed or late clients are dropped for the
        round (a dead client for good), and fewer answers than the quorum raise QuorumError.
    round_timeout : seconds a round waits for its clients (None: no limit).
    column, label_column : the vector and label columns of Parquet and Ray Dataset partitions (None: `z` or
        `x`, and `label` when present).
    compare_centralised : experiment mode: the driver pools every partition, fits `KMeans` (k-means++, 10
        restarts) on it, and every round records the inertia ratio to it and the ARI of the assignments.
    backend, seed : as `KMeans`; the seed drives the local and server k-means (not the DP noise, which must be
        secret from the server).
    audit : keep every message both ways in `messages_` (what the server received and sent).
    callback : called with each history record as soon as its round ends.

    Partitions (the argument of `fit`) map a name to a numpy array (rows), a Parquet file, folder or glob, a
    `ParquetPartition` (e.g. one value of a partition column) or a Ray Dataset; each client reads only its own.

    Fitted attributes: cluster_centers_, inertia_ (global SSE of cluster_centers_ as the clients report it;
    None under DP), n_rounds_, history_ (one record per round, also the rows of `federated/rounds.jsonl`),
    init_centers_ (rounds), partitions_ (rows, dim, label counts and node of each partition), privacy_spent_
    ((epsilon, delta) or None), bytes_down_, bytes_up_, reference_ (experiment mode), messages_ (audit),
    n_features_in_, clients_ (the actor handles, killed when fit returns).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        mode: str = "rounds",
        local_k: int | None = None,
        max_rounds: int = 20,
        tol: float = 1e-4,
        local_steps: int = 1,
        local_max_iter: int = 25,
        init: str | np.ndarray = "k-means++",
        privacy: Any = None,
        secure_aggregation: bool = False,
        secure_neighbours: int | None = None,
        dropout_recovery: bool = False,
        clients_per_actor: int = 1,
        transport: str = "ray",
        placement: str | dict[str, str] | None = None,
        quorum: float = 0.5,
        round_timeout: float | None = None,
        column: str | None = None,
        label_column: str | None = None,
        compare_centralised: bool = False,
        backend: str = "auto",
        audit: bool = False,
        callback: Callable[[dict[str, Any]], object] | None = None,
        seed: int = 0,
    ) -> None:
        self.n_clusters = n_clusters
        self.mode = mode
        self.local_k = local_k
        self.max_rounds = max_rounds
        self.tol = tol
        self.local_steps = local_steps
        self.local_max_iter = local_max_iter
        self.init = init
        self.privacy = privacy
        self.secure_aggregation = secure_aggregation
        self.secure_neighbours = secure_neighbours
        self.dropout_recovery = dropout_recovery
        self.clients_per_actor = clients_per_actor
        self.transport = transport
        self.placement = placement
        self.quorum = quorum
        self.round_timeout = round_timeout
        self.column = column
        self.label_column = label_column
        self.compare_centralised = compare_centralised
        self.backend = backend
        self.audit = audit
        self.callback = callback
        self.seed = seed

    # --- public API ---------------------------------------------------------------------------------

    def fit(self, partitions: dict[str, Any], y: Any = None) -> FederatedKMeans:
        """Cluster the union of the partitions without pooling them; `y` is ignored."""
        from engine.runtime import init_ray

        privacy = self._check_params()
        parts = resolve_partitions(partitions)
        pins = self._pins(list(parts))
        if self.secure_aggregation and len(parts) < 2:
            raise _error("secure_aggregation", "secure_aggregation needs at least 2 partitions: a lone client's sum "
                         "is its own")
        # What the array shapes tell is checked before any actor starts.
        self._check_partitions({n: {"rows": s.shape[0], "dim": s.shape[1]} for n, s in parts.items()
                                if isinstance(s, np.ndarray)})
        if self.transport == "ray":
            init_ray()
            self._check_resources(pins)
        elif any(pins.values()):
            raise _error("placement", f"placement needs transport='ray': {self.transport} clients have no Ray nodes.")
        if self.transport == "flower":
            from engine.federated import flower

            flower.simulate(parts, self.clients_per_actor, client_args=self.client_args(privacy),
                            transport_options=self.transport_options(),
                            fit=lambda transport: self._fit_over(transport, parts, privacy))
            return self
        return self._fit_over(self._start_transport(parts, pins, privacy), parts, privacy)

    def fit_transport(self, transport: Transport) -> FederatedKMeans:
        """Cluster the partitions of clients that `transport` already reaches (a Flower ServerApp's SuperNodes:
        `engine.federated.flower.FlowerTransport.start`); the driver never sees their rows."""
        privacy = self._check_params()
        if self.compare_centralised:
            raise _error("compare_centralised", "compare_centralised needs the partitions in the driver, which "
                         "clients reached through a transport keep to themselves.")
        return self._fit_over(transport, {}, privacy)

    def _fit_over(self, transport: Transport, parts: dict[str, Any], privacy) -> FederatedKMeans:
        if self.secure_aggregation and len(transport.names) < 2:
            raise _error("secure_aggregation", "secure_aggregation needs at least 2 partitions: a lone client's sum "
                         "is its own")
        self._privacy = privacy
        self._accountant: Accountant | None = None
        self.history_: list[dict[str, Any]] = []
        self._transport = transport
        self.clients_ = self._transport.host_of
        self.messages_ = self._transport.messages
        try:
            self._fit(parts)
        finally:
            self._transport.close()
            self.bytes_down_, self.bytes_up_ = self._transport.bytes_down, self._transport.bytes_up
            self._pooled = self._reference_labels = None
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Index of the nearest centroid for each row."""
        check_is_fitted(self, "cluster_centers_")
        X = as_float32_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but FederatedKMeans was fitted with {self.n_features_in_} features."
            )
        return assign(X, self.cluster_centers_, backend=self.backend)[0]

    # --- settings -----------------------------------------------------------------------------------

    def _check_params(self):
        """Every setting checked in one place; errors name the parameter and its config key."""
        if self.transport not in TRANSPORTS:
            raise _error("transport", f"transport={self.transport!r} should be one of {', '.join(TRANSPORTS)}.")
        if self.mode not in MODES:
            raise _error("mode", f"mode={self.mode!r} should be 'rounds' or 'one_shot'.")
        for name, minimum in (("n_clusters", 1), ("local_k", 1), ("max_rounds", 1), ("local_steps", 1),
                              ("local_max_iter", 1), ("seed", 0), ("secure_neighbours", 2), ("clients_per_actor", 1)):
            if name in ("local_k", "secure_neighbours") and getattr(self, name) is None:
                continue
            try:
                check_int(name, getattr(self, name), minimum=minimum)
            except ConfigError as e:
                raise _error(name, str(e)) from None
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float | np.number) or not (
                math.isfinite(self.tol) and self.tol >= 0):
            raise _error("tol", f"tol={self.tol!r} should be a finite number >= 0.")
        if isinstance(self.quorum, bool) or not isinstance(self.quorum, int | float) or not 0 < self.quorum <= 1:
            raise _error("quorum", f"quorum={self.quorum!r} should be a share of the clients in (0, 1].")
        if self.round_timeout is not None and (
                isinstance(self.round_timeout, bool) or not isinstance(self.round_timeout, int | float)
                or not self.round_timeout > 0):
            raise _error("round_timeout",
                         f"round_timeout={self.round_timeout!r} should be None or a number of seconds > 0.")
        if not isinstance(self.dropout_recovery, bool | np.bool_):
            raise _error("dropout_recovery", f"dropout_recovery should be True or False, got "
                         f"{self.dropout_recovery!r}.")
        if self.dropout_recovery and not self.secure_aggregation:
            raise _error("dropout_recovery", "dropout_recovery recovers secure aggregation's masks: it needs "
                         "secure_aggregation=True")
        for flag in ("secure_aggregation", "compare_centralised"):
            if not isinstance(getattr(self, flag), bool | np.bool_):
                raise _error(flag, f"{flag} should be True or False, got {getattr(self, flag)!r}.")
        if not isinstance(self.audit, bool | np.bool_):
            raise ConfigError(f"audit should be True or False, got {self.audit!r}.")
        for name in ("column", "label_column"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} should be a column name or None, got {value!r}.")
        if self.callback is not None and not callable(self.callback):
            raise ConfigError(f"callback should be a callable or None, got {self.callback!r}.")
        try:
            resolve_backend(self.backend)
        except ConfigError as e:
            raise _error("backend", str(e)) from None
        if isinstance(self.init, str):
            if self.init != "k-means++":
                raise _error("init", f"init={self.init!r} should be 'k-means++' or an array of server-side points.")
        elif self.mode == "one_shot":
            raise _error("init", "init applies to mode='rounds'; one_shot starts from the clients' local k-means.")
        try:
            privacy = privacy_config(self.privacy)
        except ConfigError as e:
            raise _error("privacy", str(e)) from None
        dp = privacy is not None and privacy.epsilon is not None
        if self.mode == "one_shot" and self.secure_aggregation:
            raise _error("secure_aggregation", "secure_aggregation applies to mode='rounds': one_shot needs each "
                         "client's local centroids, not their sum.")
        if dp and self.mode == "one_shot":
            raise _error("mode", "privacy.epsilon needs mode='rounds': a local k-means output has no bounded "
                         "sensitivity (one row can move every local centroid), so no noise makes it private.")
        if dp and self.local_steps > 1:
            raise _error("local_steps", f"privacy.epsilon needs local_steps=1 (got {self.local_steps}): after a "
                         "local step one row can move other rows' assignments, so the sums' sensitivity is unbounded.")
        if dp and isinstance(self.init, str):
            raise _error("init", "privacy.epsilon needs init= an array of server-side points (k centroids, or "
                         "candidates): the k-means++ init shares local k-means centroids, which DP cannot cover.")
        return privacy

    def _pins(self, names: list[str]) -> dict[str, str | None]:
        """The custom resource each partition's client needs (None: anywhere)."""
        if self.placement is None or self.placement == "any":
            return dict.fromkeys(names)
        if self.placement == "resource":
            return {n: f"partition:{n}" for n in names}
        if not isinstance(self.placement, dict):
            raise _error("placement", f"placement should be None, 'resource' or a dict partition -> resource, got "
                              f"{self.placement!r}.")
        for name, resource in self.placement.items():
            if name not in names:
                raise _error("placement", f"placement names partition '{name}', which is not one of the partitions "
                                  f"({', '.join(names)}).")
            if not isinstance(resource, str) or not resource:
                raise _error("placement", f"placement['{name}'] should be a custom resource name, got {resource!r}.")
        return {n: self.placement.get(n) for n in names}

    def _check_resources(self, pins: dict[str, str | None]) -> None:
        import ray

        offered = ray.cluster_resources()
        for name, resource in pins.items():
            if resource is not None and offered.get(resource, 0) < PIN_AMOUNT:
                raise _error(
                    "placement", f"placement: partition '{name}' needs the custom resource '{resource}', which no node "
                    f"of the Ray cluster offers (start its node with --resources='{{\"{resource}\": 1}}')."
                )

    def _check_partitions(self, infos: dict[str, dict[str, Any]]) -> None:
        """No empty partition, one dimension for all (naming the first that differs), k' and k fit the rows."""
        first: tuple[str, int] | None = None
        uses_local_k = self.mode == "one_shot" or isinstance(self.init, str)
        for name, info in infos.items():
            if info["rows"] == 0:
                raise DataError(f"partition '{name}' holds no rows")
            if first is None:
                first = (name, info["dim"])
            elif info["dim"] != first[1]:
                raise DataError(f"partition '{name}' has {info['dim']} dimensions, but partition '{first[0]}' has "
                                f"{first[1]}")
            if uses_local_k and self.local_k is not None and self.local_k > info["rows"]:
                raise _error("local_k", f"local_k={self.local_k} should be <= the rows of partition '{name}' "
                             f"({info['rows']}).")
            if uses_local_k and self.local_k is None and self.n_clusters > info["rows"]:
                raise _error("n_clusters", f"n_clusters={self.n_clusters} should be <= the rows of partition "
                             f"'{name}' ({info['rows']}): every client clusters its own rows first.")

    def _init_points(self, n_features: int) -> np.ndarray:
        try:
            init = as_float32_matrix(self.init, name="init")
        except DataError as e:
            raise _error("init", str(e)) from e
        if init.shape[1] != n_features or init.shape[0] < self.n_clusters:
            raise _error("init", f"init has shape {init.shape}, but should have n_features={n_features} columns and "
                         f"at least n_clusters={self.n_clusters} rows.")
        return init

    # --- clients and the run -----------------------------------------------------------------------

    def client_args(self, privacy: Any = None) -> dict[str, Any]:
        """What every client is built with, besides its partition (`privacy`: the checked privacy settings)."""
        if privacy is None:
            privacy = self._check_params()
        # Row-level DP clips the rows once, where they are read; client-level clips each release (Release).
        clip = (privacy.clip_norm if privacy is not None and privacy.epsilon is not None and privacy.unit == "row"
                else None)
        return {"column": self.column, "label_column": self.label_column, "backend": self.backend, "clip_norm": clip}

    def transport_options(self) -> dict[str, Any]:
        """Every transport's settings: quorum, timeout, secure minimum, audit."""
        return {"quorum": self.quorum, "round_timeout": self.round_timeout,
                "min_secure": 2 if self.secure_aggregation else 1, "audit": self.audit}

    def _start_transport(self, parts: dict[str, Any], pins: dict[str, str | None], privacy) -> Transport:
        client_args = self.client_args(privacy)
        options = {"min_secure": 2 if self.secure_aggregation else 1, "audit": self.audit}
        if self.transport == "in_process":
            return InProcessTransport(start_local_hosts(parts, self.clients_per_actor, client_args), self.quorum,
                                      **options)
        hosts = start_ray_hosts(parts, pins, self.clients_per_actor, client_args)
        return RayTransport(hosts, self.quorum, round_timeout=self.round_timeout, **options)

    def _fit(self, parts: dict[str, Any]) -> None:
        t = self._transport
        infos, facts = t.exchange("load", lambda name, release: ("load", ()), release=None)
        t.dead.update(facts["dropped"])  # a client that could not load has no rows to answer for
        identities = {name: info.pop("identity") for name, info in infos.items()}
        self._check_partitions(infos)
        self.partitions_ = infos
        self.n_features_in_ = int(next(iter(infos.values()))["dim"])
        self.n_samples_ = int(sum(info["rows"] for info in infos.values()))
        check_n_clusters(self.n_clusters, self.n_samples_)
        init = None if isinstance(self.init, str) else self._init_points(self.n_features_in_)
        accountant = None
        if self._privacy is not None and self._privacy.epsilon is not None:
            init_releases = 1 if init is not None and init.shape[0] > self.n_clusters else 0
            accountant = Accountant(self._privacy, init_releases + self.max_rounds, counts_releases=init_releases)
        self._accountant = accountant
        if self.secure_aggregation:
            self._agree_keys(identities)
        self.reference_ = self._reference(parts) if self.compare_centralised else None
        session = Session(
            transport=t, n_clusters=self.n_clusters,
            local_k=self.local_k, rows={n: int(info["rows"]) for n, info in infos.items()},
            local_max_iter=self.local_max_iter, tol=self.tol, seed=self.seed, backend=self.backend,
            secure=self.secure_aggregation and self.mode == "rounds",
            min_count=self._privacy.min_count if self._privacy is not None else 0,
            accountant=accountant, record=self._record, error=_error,
            client_clip=(self._privacy.clip_norm, self._privacy.count_clip)
            if accountant is not None and self._privacy.unit == "client" else None,
            recovery=self._recovery if self.secure_aggregation and self.dropout_recovery else None)

        if self.mode == "one_shot":
            self.cluster_centers_ = algorithms.local_kmeans_union(session, "local_kmeans")
            self.n_rounds_ = 1
        else:
            if init is None:
                centroids = algorithms.local_kmeans_union(session, "init")
            elif init.shape[0] > self.n_clusters:
                centroids = algorithms.weighted_candidates(session, init)
            else:
                centroids = init
            self.init_centers_ = centroids
            self.cluster_centers_, self.n_rounds_ = algorithms.lloyd_rounds(session, centroids, self.max_rounds,
                                                                            self.local_steps)
        self.inertia_ = algorithms.evaluate(session, self.cluster_centers_)
        self.privacy_spent_ = None
        if accountant is not None:
            epsilon, delta = accountant.total()
            self.privacy_spent_ = {"epsilon": epsilon, "delta": delta}
        if self.reference_ is not None:
            metrics = self._experiment_metrics(self.cluster_centers_)
            self.reference_.update({"federated_inertia": metrics["pooled_inertia"],
                                    "inertia_ratio": metrics["inertia_ratio"],
                                    "ari_to_centralised": metrics["ari_to_centralised"]})

    def _agree_keys(self, identities: dict[str, bytes]) -> None:
        """Key agreement through the server: it relays identities (pinned at enrolment) and signed X25519 keys,
        each client only its neighbours' in the public mask graph, and learns no shared key."""
        t = self._transport
        names = tuple(sorted(n for n in t.names if n not in t.dead))
        degree = self.secure_neighbours if self.secure_neighbours is not None else secure.default_degree(len(names))
        degree = min(degree, len(names) - 1)
        seed = int(np.random.SeedSequence([self.seed, 0x5EC]).generate_state(1)[0])
        graph = secure.neighbour_graph(names, degree, seed)
        min_participants = max(2, math.ceil(self.quorum * len(t.names) - 1e-9))
        keys, facts = t.exchange("keys", lambda name, release: (
            "enrol", ({p: identities[p] for p in graph[name]}, names, degree, seed, min_participants)), release=None)
        # A client without agreed keys could not mask: it leaves the run here, as a dead one.
        t.dead.update(facts["dropped"])
        _, facts = t.exchange("keys", lambda name, release: (
            "agree_keys", ({p: keys[p] for p in graph[name] if p in keys},)), release=None)
        t.dead.update(facts["dropped"])
        self._recovery = graph
        self.secure_graph_ = {"clients": len(names), "degree": degree,
                              "pairs": sum(len(v) for v in graph.values()) // 2}

    # --- records and experiment metrics -----------------------------------------------------------

    def _record(self, record: dict[str, Any], facts: dict[str, Any], start: float,
                centroids: np.ndarray | None) -> None:
        release: Release | None = facts["release"]
        record.update({
            "participants": facts["participants"],
            "dropped": facts["dropped"],
            "attempts": facts["attempts"],
            "secure": bool(release is not None and release.participants is not None),
            "bytes_down": facts["bytes_down"],
            "bytes_up": facts["bytes_up"],
            "seconds": time.perf_counter() - start,
            # The server process's peak resident memory so far (Linux: KiB): with bytes_up, how its cost grows.
            "server_peak_rss_mb": round(getrusage(RUSAGE_SELF).ru_maxrss / 1024, 1),
            "privacy": None,
        })
        if release is not None and release.noise is not None:
            record["privacy"] = self._accountant.spend(release.noise)
        if self.reference_ is not None and centroids is not None:
            record.update(self._experiment_metrics(centroids))
        self.history_.append(record)
        if facts["dropped"]:
            logger.warning("%s round %d: dropped %s", record["kind"], record["round"], facts["dropped"])
        if self.callback is not None:
            self.callback(dict(record))

    def _reference(self, parts: dict[str, Any]) -> dict[str, Any]:
        """Experiment mode: centralised k-means on the pooled partitions, read here in the driver."""
        pooled = np.concatenate([
            np.ascontiguousarray(s, dtype=np.float32) if isinstance(s, np.ndarray)
            else read_partition(n, s, self.column, self.label_column)[0]
            for n, s in parts.items()
        ])
        ref = KMeans(self.n_clusters, n_init=_REFERENCE_N_INIT, max_iter=max(100, self.max_rounds), tol=self.tol,
                     seed=self.seed, backend=self.backend).fit(pooled)
        self._pooled, self._reference_labels = pooled, ref.labels_
        return {"inertia": float(ref.inertia_), "n_init": _REFERENCE_N_INIT}

    def _experiment_metrics(self, centroids: np.ndarray) -> dict[str, float]:
        labels, sq = assign(self._pooled, centroids, backend=self.backend)
        inertia = float(sq.astype(np.float64).sum())
        reference = self.reference_["inertia"]
        return {
            "pooled_inertia": inertia,
            "inertia_ratio": inertia / reference if reference > 0 else float("nan"),
            "ari_to_centralised": float(adjusted_rand_score(self._reference_labels, labels)),
        }
