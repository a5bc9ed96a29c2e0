"""FederatedKMeans, the server side: one client actor per partition, and only their aggregates reach it."""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.validation import check_is_fitted

from engine.cluster import KMeans, PartialStats, assign
from engine.cluster._lloyd import lloyd
from engine.cluster._stats import as_float32_matrix, check_int, check_n_clusters, resolve_backend
from engine.errors import ConfigError, DataError, EngineError, find_engine_error, user_message
from engine.federated import secure
from engine.federated.client import FederatedClient, Release
from engine.federated.partitions import read_partition, resolve_partitions
from engine.federated.privacy import Accountant, privacy_config

logger = logging.getLogger(__name__)

MODES = ("one_shot", "rounds")
# The server's k-means runs on a few hundred weighted points at most: restarts cost nothing there.
_SERVER_N_INIT = 10
# The centralised reference of experiment mode: a strong baseline, as scikit-learn's classic default.
_REFERENCE_N_INIT = 10
# A custom resource amount small enough that a node offering 1 unit can host any number of clients.
_PIN_AMOUNT = 0.001


# The pipeline config key of each parameter: errors name it beside the parameter, for `dce federate` users.
CONFIG_KEYS = {
    "n_clusters": "cluster.k", "mode": "federated.mode", "local_k": "federated.local_k",
    "max_rounds": "federated.max_rounds", "local_steps": "federated.local_steps", "local_max_iter": "cluster.max_iter",
    "seed": "seed", "tol": "cluster.tol", "quorum": "federated.quorum", "round_timeout": "federated.round_timeout",
    "secure_aggregation": "federated.secure_aggregation", "compare_centralised": "federated.compare_centralised",
    "init": "federated.init_points", "placement": "federated.placement", "privacy": "federated.privacy",
    "backend": "cluster.backend",
}


def _error(param: str, message: str, kind: type[EngineError] = ConfigError) -> EngineError:
    """`message` with the config key of `param` added: "local_k=5 should be ... (config: federated.local_k)."."""
    return kind(f"{message.rstrip('.')} (config: {CONFIG_KEYS[param]}).")


class QuorumError(EngineError, RuntimeError):
    """Fewer clients answered a round than the quorum needs."""


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
    local_k : k' of the clients' local k-means (one_shot, and the init of rounds); default n_clusters. Every
        partition needs at least local_k rows.
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
        reveal nothing (engine.federated.secure); a client that drops out makes the round run again without it.
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
        import ray

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
        init_ray()
        self._check_resources(pins)
        self._privacy = privacy
        self._accountant: Accountant | None = None
        self._dead: set[str] = set()
        self._busy: dict[str, Any] = {}
        self._round = 0
        self.history_: list[dict[str, Any]] = []
        self.messages_: list[dict[str, Any]] = []
        self.bytes_down_ = self.bytes_up_ = 0
        self.clients_ = self._start_clients(parts, pins, privacy)
        try:
            self._fit(parts)
        finally:
            for client in self.clients_.values():
                ray.kill(client)
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
        if self.mode not in MODES:
            raise _error("mode", f"mode={self.mode!r} should be 'rounds' or 'one_shot'.")
        for name, minimum in (("n_clusters", 1), ("local_k", 1), ("max_rounds", 1), ("local_steps", 1),
                              ("local_max_iter", 1), ("seed", 0)):
            if name == "local_k" and self.local_k is None:
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
            if resource is not None and offered.get(resource, 0) < _PIN_AMOUNT:
                raise _error(
                    "placement", f"placement: partition '{name}' needs the custom resource '{resource}', which no node "
                    f"of the Ray cluster offers (start its node with --resources='{{\"{resource}\": 1}}')."
                )

    def _check_partitions(self, infos: dict[str, dict[str, Any]]) -> None:
        """No empty partition, one dimension for all (naming the first that differs), k' and k fit the rows."""
        first: tuple[str, int] | None = None
        uses_local_k = self.mode == "one_shot" or isinstance(self.init, str)
        local_k = self.local_k if self.local_k is not None else self.n_clusters
        for name, info in infos.items():
            if info["rows"] == 0:
                raise DataError(f"partition '{name}' holds no rows")
            if first is None:
                first = (name, info["dim"])
            elif info["dim"] != first[1]:
                raise DataError(f"partition '{name}' has {info['dim']} dimensions, but partition '{first[0]}' has "
                                f"{first[1]}")
            if uses_local_k and local_k > info["rows"]:
                what = "local_k" if self.local_k is not None else "local_k (default: n_clusters)"
                raise _error("local_k", f"{what}={local_k} should be <= the rows of partition '{name}' "
                             f"({info['rows']}).")

    def _init_points(self, n_features: int) -> np.ndarray:
        try:
            init = as_float32_matrix(self.init, name="init")
        except DataError as e:
            raise _error("init", str(e)) from e
        if init.shape[1] != n_features or init.shape[0] < self.n_clusters:
            raise _error("init", f"init has shape {init.shape}, but should have n_features={n_features} columns and "
                         f"at least n_clusters={self.n_clusters} rows.")
        return init

    # --- clients ------------------------------------------------------------------------------------

    def _start_clients(self, parts: dict[str, Any], pins: dict[str, str | None], privacy) -> dict[str, Any]:
        import ray

        clip = privacy.clip_norm if privacy is not None and privacy.epsilon is not None else None
        remote = ray.remote(FederatedClient)
        clients = {}
        for name, source in parts.items():
            # Ray's actor default: a CPU to be placed, none held while the client waits for the server, so many
            # partitions fit on a small machine.
            pin = pins[name]
            options: dict[str, Any] = {"resources": {pin: _PIN_AMOUNT}} if pin else {"scheduling_strategy": "SPREAD"}
            clients[name] = remote.options(**options).remote(name, source, self.column, self.label_column,
                                                             self.backend, clip)
        return clients

    def _fit(self, parts: dict[str, Any]) -> None:
        infos, facts = self._exchange("load", lambda name, release: ("load", ()), release=None)
        self._dead.update(facts["dropped"])  # a client that could not load has no rows to answer for
        self._check_partitions(infos)
        self.partitions_ = infos
        self.n_features_in_ = int(next(iter(infos.values()))["dim"])
        self.n_samples_ = int(sum(info["rows"] for info in infos.values()))
        check_n_clusters(self.n_clusters, self.n_samples_)
        init = None if isinstance(self.init, str) else self._init_points(self.n_features_in_)
        if self._privacy is not None and self._privacy.epsilon is not None:
            init_releases = 1 if init is not None and init.shape[0] > self.n_clusters else 0
            self._accountant = Accountant(self._privacy, init_releases + self.max_rounds)
        if self.secure_aggregation:
            self._agree_keys()
        self.reference_ = self._reference(parts) if self.compare_centralised else None

        if self.mode == "one_shot":
            self.cluster_centers_ = self._local_kmeans_union("local_kmeans")
            self.n_rounds_ = 1
        else:
            if init is None:
                centroids = self._local_kmeans_union("init")
            elif init.shape[0] > self.n_clusters:
                centroids = self._weighted_candidates(init)
            else:
                centroids = init
            self.init_centers_ = centroids
            self.cluster_centers_ = self._lloyd_rounds(centroids)
        self.inertia_ = self._final_inertia()
        self.privacy_spent_ = None
        if self._accountant is not None:
            epsilon, delta = self._accountant.total()
            self.privacy_spent_ = {"epsilon": epsilon, "delta": delta}
        if self.reference_ is not None:
            metrics = self._experiment_metrics(self.cluster_centers_)
            self.reference_.update({"federated_inertia": metrics["pooled_inertia"],
                                    "inertia_ratio": metrics["inertia_ratio"],
                                    "ari_to_centralised": metrics["ari_to_centralised"]})

    # --- one exchange with the clients, with faults ------------------------------------------------------

    def _exchange(self, kind: str, call: Callable[[str, Any], tuple[str, tuple]],
                  release: Callable[[list[str], int], Release] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send every live client a request and collect the answers.

        A client that fails (its actor died, it raised something other than an engine error) or does not answer
        within round_timeout is dropped for this exchange; a dead one for good. With secure aggregation the
        survivors' masks no longer cancel, so the exchange runs again without the dropped clients. Returns
        (answers by partition, facts for the round record).
        """
        dropped: dict[str, str] = {}
        attempt = 0
        bytes_down = bytes_up = 0
        while True:
            participants = [n for n in self.clients_ if n not in self._dead and n not in dropped
                            and not self._still_busy(n, dropped)]
            self._check_quorum(kind, participants, dropped)
            this_release = release(participants, attempt) if release is not None else None
            refs = {}
            for name in participants:
                method, args = call(name, this_release)
                bytes_down += self._log(kind, name, attempt, "down", args)
                refs[name] = getattr(self.clients_[name], method).remote(*args)
            answers, failed = self._collect(refs)
            dropped.update(failed)
            for name, answer in answers.items():
                bytes_up += self._log(kind, name, attempt, "up", answer)
            if failed and this_release is not None and this_release.participants is not None:
                logger.info("%s: %s dropped; secure aggregation runs the round again without them", kind,
                            ", ".join(failed))
                attempt += 1
                continue
            self._check_quorum(kind, list(answers), dropped)
            self.bytes_down_ += bytes_down
            self.bytes_up_ += bytes_up
            return answers, {"participants": list(answers), "dropped": dropped, "attempts": attempt + 1,
                             "bytes_down": bytes_down, "bytes_up": bytes_up, "release": this_release}

    def _collect(self, refs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        import ray
        from ray.exceptions import RayActorError

        ready, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.round_timeout)
        pending_refs = set(pending)
        answers, failed = {}, {}
        for name, ref in refs.items():
            if ref in pending_refs:
                failed[name] = f"no answer within round_timeout={self.round_timeout:g} s"
                self._busy[name] = ref
                continue
            try:
                answers[name] = ray.get(ref)
            except RayActorError as e:
                self._dead.add(name)
                failed[name] = f"client died ({type(e).__name__})"
            except Exception as e:
                err = find_engine_error(e)
                if err is not None:
                    raise err from None
                failed[name] = f"client failed: {type(e).__name__}: {user_message(e)[:200]}"
        return answers, failed

    def _still_busy(self, name: str, dropped: dict[str, str]) -> bool:
        """A client still working on a request it timed out on is left out until it is free again."""
        import ray

        ref = self._busy.get(name)
        if ref is None:
            return False
        if ray.wait([ref], timeout=0)[0]:
            del self._busy[name]
            return False
        dropped[name] = "still busy with an earlier request"
        return True

    def _check_quorum(self, kind: str, answered: list[str], dropped: dict[str, str]) -> None:
        needed = max(1, math.ceil(self.quorum * len(self.clients_) - 1e-9))
        if self.secure_aggregation and kind not in ("load", "keys"):
            needed = max(needed, 2)
        if len(answered) < needed:
            why = "; ".join(f"{n}: {r}" for n, r in dropped.items()) or "no client left"
            raise QuorumError(f"{kind} (round {self._round}): {len(answered)} of {len(self.clients_)} clients "
                              f"answered, quorum={self.quorum:g} needs {needed} ({why})")

    def _log(self, kind: str, name: str, attempt: int, direction: str, payload: Any) -> int:
        """Bytes of one message (its pickled size, as Ray ships it); kept in messages_ when auditing."""
        if self.audit:
            self.messages_.append({"round": self._round, "kind": kind, "attempt": attempt, "partition": name,
                                   "direction": direction, "payload": payload})
        return len(pickle.dumps(payload, protocol=5))

    def _agree_keys(self) -> None:
        """Diffie-Hellman through the server: it relays public keys and learns no shared secret."""
        keys, facts = self._exchange("keys", lambda name, release: ("public_key", ()), release=None)
        # A client without agreed keys could not mask: it leaves the run here, as a dead one.
        self._dead.update(facts["dropped"])
        _, facts = self._exchange("keys", lambda name, release: ("agree_keys", (keys,)), release=None)
        self._dead.update(facts["dropped"])

    # --- the algorithms -----------------------------------------------------------------------------

    def _release(self, counts_only: bool = False, share_sse: bool = True,
                 noise: bool = True) -> Callable[[list[str], int], Release]:
        min_count = self._privacy.min_count if self._privacy is not None else 0

        def make(participants: list[str], attempt: int) -> Release:
            secure_round = self.secure_aggregation and self.mode == "rounds"
            dp = self._accountant is not None and noise
            return Release(
                round=self._round,
                noise=self._accountant.next_noise(counts_only) if dp else None,
                noise_shares=len(participants) if secure_round else 1,
                min_count=min_count,
                counts_only=counts_only,
                share_sse=share_sse and not dp,
                participants=tuple(participants) if secure_round else None,
                attempt=attempt,
            )

        return make

    def _local_kmeans_union(self, kind: str) -> np.ndarray:
        """k-FED: the clients' local k-means, then weighted k-means (k-means++ init) of the union on the server."""
        if kind == "local_kmeans":
            self._round += 1
        start = time.perf_counter()
        local_k = self.local_k if self.local_k is not None else self.n_clusters
        seeds = {name: int(np.random.SeedSequence([self.seed, i]).generate_state(1)[0])
                 for i, name in enumerate(self.clients_)}
        release = self._release()

        def clear(participants: list[str], attempt: int) -> Release:
            # The union needs each client's own centroids: never masked.
            return dataclasses.replace(release(participants, attempt), participants=None, noise_shares=1)

        answers, facts = self._exchange(
            kind, lambda name, r: ("local_kmeans", (local_k, seeds[name], self.local_max_iter, self.tol, r)), clear)
        points, weights = [], []
        for answer in answers.values():
            keep = answer["counts"] > 0
            points.append((answer["sums"][keep] / answer["counts"][keep, None]).astype(np.float32))
            weights.append(answer["counts"][keep])
        points, weights = np.concatenate(points), np.concatenate(weights)
        if points.shape[0] < self.n_clusters:
            raise _error("local_k", f"{kind}: the clients shared {points.shape[0]} local centroids (after "
                         f"min_count suppression), fewer than n_clusters={self.n_clusters}; lower privacy.min_count "
                         "or raise local_k", DataError)
        server = KMeans(self.n_clusters, init="k-means++", n_init=_SERVER_N_INIT, max_iter=self.local_max_iter,
                        tol=self.tol, seed=self.seed, backend=self.backend).fit(points, sample_weight=weights)
        record = {"round": self._round, "kind": kind, "objective": None, "rel_change": None, "shift": None,
                  "empty": 0, "local_centroids": int(points.shape[0]),
                  "partition_inertia": {n: a["sse"] for n, a in answers.items()}}
        self._record(record, facts, start, server.cluster_centers_)
        return server.cluster_centers_

    def _weighted_candidates(self, candidates: np.ndarray) -> np.ndarray:
        """FedDP-KMeans-style init: the clients count their rows nearest each server-side candidate (one counts
        release, private under DP); weighted k-means of the candidates gives k centroids."""
        start = time.perf_counter()
        answers, facts = self._exchange("init", lambda name, r: ("lloyd", (candidates, 1, r)),
                                        self._release(counts_only=True))
        counts = self._sum(answers, facts["release"], candidates.shape)[0].counts
        weights = np.maximum(counts, 0.0)
        if np.count_nonzero(weights) < self.n_clusters:
            raise _error("init", f"init: only {np.count_nonzero(weights)} of {candidates.shape[0]} candidate points "
                         f"have rows nearest to them, fewer than n_clusters={self.n_clusters}; give more candidates",
                         DataError)
        server = KMeans(self.n_clusters, init="k-means++", n_init=_SERVER_N_INIT, max_iter=self.local_max_iter,
                        tol=self.tol, seed=self.seed, backend=self.backend).fit(candidates, sample_weight=weights)
        record = {"round": self._round, "kind": "init", "objective": None, "rel_change": None, "shift": None,
                  "empty": 0, "candidates": int(candidates.shape[0]),
                  "partition_inertia": dict.fromkeys(answers)}
        self._record(record, facts, start, server.cluster_centers_)
        return server.cluster_centers_

    def _lloyd_rounds(self, centroids: np.ndarray) -> np.ndarray:
        """Federated Lloyd: the one Lloyd loop, whose step is one broadcast of the centroids and one sum of the
        clients' stats. Empty clusters are repaired from the summed statistics alone (`split_empty`): no row leaves a
        client for it. It splits by the per-cluster SSE the clients send beside their SSE, as KMeans does, and by
        the counts under DP (which releases no SSE): post-processing of released counts."""
        current: dict[str, Any] = {}  # the round in progress: its start, exchange facts and partition SSEs

        def step(C: np.ndarray) -> PartialStats:
            self._round += 1
            current["start"] = time.perf_counter()
            answers, current["facts"] = self._exchange(
                "lloyd", lambda name, r: ("lloyd", (C, self.local_steps, r)), self._release())
            stats, _, current["per_partition"] = self._sum(answers, current["facts"]["release"], C.shape)
            return stats

        def on_iteration(record: dict[str, Any], new: np.ndarray) -> None:
            kept = {k: record[k] for k in ("objective", "rel_change", "shift", "empty", "empty_repaired")}
            self._record({"round": self._round, "kind": "lloyd", **kept,
                          "partition_inertia": current["per_partition"]}, current["facts"], current["start"], new)

        result = lloyd(step, centroids, max_iter=self.max_rounds, tol=self.tol, on_iteration=on_iteration)
        self.n_rounds_ = result.n_iter
        return result.centroids

    def _sum(self, answers: dict[str, Any], release: Release, shape: tuple[int, int]
             ) -> tuple[PartialStats, float | None, dict[str, float | None]]:
        """The aggregate stats (sums, counts), the global SSE when shared, and each partition's SSE when seen."""
        k, d = shape
        cluster_sse = None
        if release.participants is not None:
            total = secure.unmasked_sum([a["masked"] for a in answers.values()])
            if release.counts_only:
                sums, counts, sse = np.zeros((k, d)), total, None
            else:
                sums, counts = total[:k * d].reshape(k, d), total[k * d:k * d + k]
                cluster_sse, sse = total[k * d + k:k * d + 2 * k], float(total[-1])
            per_partition = dict.fromkeys(answers)
        else:
            counts = np.sum([a["counts"] for a in answers.values()], axis=0)
            sums = np.zeros((k, d)) if release.counts_only else np.sum([a["sums"] for a in answers.values()], axis=0)
            per_partition = {n: a.get("sse") for n, a in answers.items()}
            sse = None if release.counts_only or not release.share_sse else float(sum(per_partition.values()))
            if all(a.get("cluster_sse") is not None for a in answers.values()):
                cluster_sse = np.sum([a["cluster_sse"] for a in answers.values()], axis=0)
        if release.noise is not None:
            # A noisy count below one row says nothing reliable about the mean: treat the cluster as empty.
            small = counts < 1
            sums, counts = sums.copy(), counts.copy()
            sums[small], counts[small] = 0.0, 0.0
        if not release.share_sse or release.noise is not None:
            sse = cluster_sse = None
        return PartialStats(sums, counts, float("nan") if sse is None else sse, cluster_sse), sse, per_partition

    def _final_inertia(self) -> float | None:
        """The global SSE of the final centroids: one more exchange, skipped under DP (the SSE is private)."""
        if self._accountant is not None:
            return None
        self._round += 1
        start = time.perf_counter()
        centroids = self.cluster_centers_
        answers, facts = self._exchange("evaluate", lambda name, r: ("lloyd", (centroids, 1, r)),
                                        self._release(noise=False))
        _, sse, per_partition = self._sum(answers, facts["release"], centroids.shape)
        record = {"round": self._round, "kind": "evaluate", "objective": sse, "rel_change": None, "shift": 0.0,
                  "empty": 0, "partition_inertia": per_partition}
        self._record(record, facts, start, None)
        return sse

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
