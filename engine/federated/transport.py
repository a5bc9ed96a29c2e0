"""The federated transport: requests to the clients and their answers, with quorum, timeouts and dropouts.

A transport knows nothing of k-means. It hosts the partitions' clients (`ClientHost`: one or many partitions
per process, each partition's rows, keys and noise kept in its own `FederatedClient`), sends each live partition
one request per exchange, and returns the answers it got, dropping clients that fail or are late. Two
transports share that contract: `RayTransport` (a Ray actor per host, the deployment) and `InProcessTransport`
(the hosts in this process, for measuring the algorithms alone).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from typing import Any

from engine.errors import EngineError, find_engine_error, user_message
from engine.federated.client import ClientHost, Release

logger = logging.getLogger(__name__)

# A custom resource amount small enough that a node offering 1 unit can host any number of clients.
PIN_AMOUNT = 0.001

Call = Callable[[str, Any], tuple[str, tuple]]
MakeRelease = Callable[[list[str], int], Release]


class QuorumError(EngineError, RuntimeError):
    """Fewer clients answered a round than the quorum needs."""


class Transport:
    """Exchanges with the partitions' clients; subclasses say where the hosts live and how a call travels.

    Attributes: round (the round the exchanges belong to, kept by the algorithms), dead (partitions gone for
    good), messages (every message both ways when auditing), bytes_down / bytes_up (pickled sizes, as Ray ships
    them).
    """

    def __init__(self, hosts: dict[str, Any], quorum: float, *, min_secure: int = 2, audit: bool = False):
        self.host_of = hosts  # partition -> its host (a Ray actor handle or a ClientHost)
        self.quorum = quorum
        self.min_secure = min_secure
        self.audit = audit
        self.round = 0
        self.dead: set[str] = set()
        self.messages: list[dict[str, Any]] = []
        self.bytes_down = self.bytes_up = 0

    @property
    def names(self) -> list[str]:
        return list(self.host_of)

    def exchange(self, kind: str, call: Call, release: MakeRelease | None, redo: bool = True
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send every live client a request and collect the answers.

        A client that fails (its host died, it raised something other than an engine error) or does not answer
        within the timeout is dropped for this exchange; a dead one for good. With secure aggregation the
        survivors' masks no longer cancel, so the exchange runs again without the dropped clients (redo=False:
        it does not, the caller recovers the masks, engine.federated.recovery). Returns
        (answers by partition, facts for the round record).
        """
        dropped: dict[str, str] = {}
        attempt = 0
        bytes_down = bytes_up = 0
        while True:
            participants = [n for n in self.host_of if n not in self.dead and n not in dropped]
            participants = self._free(participants, dropped)
            self.check_quorum(kind, participants, dropped)
            this_release = release(participants, attempt) if release is not None else None
            requests: dict[str, tuple[str, tuple]] = {}
            for name in participants:
                requests[name] = call(name, this_release)
                self._log(kind, name, attempt, "down", requests[name][1])
            # What travels down is one batch per host, with the release (and its participant list) in it once.
            bytes_down += sum(len(pickle.dumps(batch, protocol=5)) for _, batch in self._by_host(requests).values())
            answers, failed = self._send(requests)
            dropped.update(failed)
            for name, answer in answers.items():
                self._log(kind, name, attempt, "up", answer)
                bytes_up += len(pickle.dumps(answer, protocol=5))
            if failed and redo and this_release is not None and this_release.participants is not None:
                logger.info("%s: %s dropped; secure aggregation runs the round again without them", kind,
                            ", ".join(failed))
                attempt += 1
                continue
            self.check_quorum(kind, list(answers), dropped)
            self.bytes_down += bytes_down
            self.bytes_up += bytes_up
            return answers, {"participants": list(answers), "dropped": dropped, "attempts": attempt + 1,
                             "bytes_down": bytes_down, "bytes_up": bytes_up, "release": this_release}

    def check_quorum(self, kind: str, answered: list[str], dropped: dict[str, str], secure: bool = False) -> None:
        needed = max(1, math.ceil(self.quorum * len(self.host_of) - 1e-9))
        if secure or kind not in ("load", "keys", "identities"):
            needed = max(needed, self.min_secure)
        if len(answered) < needed:
            why = "; ".join(f"{n}: {r}" for n, r in list(dropped.items())[:10]) or "no client left"
            more = f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""
            raise QuorumError(f"{kind} (round {self.round}): {len(answered)} of {len(self.host_of)} clients "
                              f"answered, quorum={self.quorum:g} needs {needed} ({why}{more})")

    def close(self) -> None:
        """Stop the hosts."""

    def _free(self, participants: list[str], dropped: dict[str, str]) -> list[str]:
        return participants

    def _send(self, requests: dict[str, tuple[str, tuple]]) -> tuple[dict[str, Any], dict[str, str]]:
        raise NotImplementedError

    def _log(self, kind: str, name: str, attempt: int, direction: str, payload: Any) -> None:
        """Keep one message in `messages` when auditing."""
        if self.audit:
            self.messages.append({"round": self.round, "kind": kind, "attempt": attempt, "partition": name,
                                  "direction": direction, "payload": payload})

    def _by_host(self, requests: dict[str, tuple[str, tuple]]) -> dict[int, tuple[Any, list]]:
        """The requests grouped by the host that serves them: one call per host and exchange."""
        groups: dict[int, tuple[Any, list]] = {}
        for name, (method, args) in requests.items():
            host = self.host_of[name]
            groups.setdefault(id(host), (host, []))[1].append((name, method, args))
        return groups


def unpack(results: dict[str, tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """A host's per-partition results as answers and failures; an engine error (bad input) is raised as itself."""
    answers, failed = {}, {}
    for name, (status, value) in results.items():
        if status == "ok":
            answers[name] = value
        elif isinstance(value, EngineError):
            raise value
        else:
            failed[name] = f"client failed: {value}"
    return answers, failed


class InProcessTransport(Transport):
    """The hosts live in this process and answer in turn: no Ray, no timeouts; for measuring the algorithms."""

    def _send(self, requests):
        answers, failed = {}, {}
        for host, batch in self._by_host(requests).values():
            a, f = unpack(host.call(batch))
            answers.update(a)
            failed.update(f)
        return answers, failed


class RayTransport(Transport):
    """One Ray actor per host; a host that dies takes its partitions out for good, a late one for the exchange
    (and until it is free again)."""

    def __init__(self, hosts: dict[str, Any], quorum: float, *, round_timeout: float | None = None, **kwargs):
        super().__init__(hosts, quorum, **kwargs)
        self.round_timeout = round_timeout
        self._busy: dict[int, Any] = {}  # host -> the reference of a request it timed out on

    def _free(self, participants, dropped):
        """A host still working on a request it timed out on is left out until it is free again."""
        import ray

        free = []
        for name in participants:
            ref = self._busy.get(id(self.host_of[name]))
            if ref is not None and not ray.wait([ref], timeout=0)[0]:
                dropped[name] = "still busy with an earlier request"
                continue
            self._busy.pop(id(self.host_of[name]), None)
            free.append(name)
        return free

    def _send(self, requests):
        import ray
        from ray.exceptions import RayActorError

        refs = {key: (host.call.remote(batch), batch) for key, (host, batch) in self._by_host(requests).items()}
        ready, pending = ray.wait([r for r, _ in refs.values()], num_returns=len(refs), timeout=self.round_timeout)
        pending_refs = set(pending)
        answers, failed = {}, {}
        for key, (ref, batch) in refs.items():
            names = [name for name, _, _ in batch]
            if ref in pending_refs:
                failed.update(dict.fromkeys(names, f"no answer within round_timeout={self.round_timeout:g} s"))
                self._busy[key] = ref
                continue
            try:
                a, f = unpack(ray.get(ref))
            except RayActorError as e:
                self.dead.update(names)
                failed.update(dict.fromkeys(names, f"client died ({type(e).__name__})"))
                continue
            except Exception as e:
                err = find_engine_error(e)
                if err is not None:
                    raise err from None
                failed.update(dict.fromkeys(names, f"client failed: {type(e).__name__}: {user_message(e)[:200]}"))
                continue
            answers.update(a)
            failed.update(f)
        return answers, failed

    def close(self) -> None:
        import ray

        for host in {id(h): h for h in self.host_of.values()}.values():
            ray.kill(host)


def start_ray_hosts(parts: dict[str, Any], pins: dict[str, str | None], clients_per_actor: int,
                    client_args: dict[str, Any]) -> dict[str, Any]:
    """The Ray actors hosting the partitions' clients, `clients_per_actor` partitions each (partitions pinned to
    one custom resource share hosts only with each other); returns partition -> actor handle."""
    import ray

    remote = ray.remote(ClientHost)
    groups: dict[str | None, list[str]] = {}
    for name in parts:
        groups.setdefault(pins[name], []).append(name)
    host_of = {}
    for pin, names in groups.items():
        for i in range(0, len(names), clients_per_actor):
            chunk = names[i:i + clients_per_actor]
            # Ray's actor default: a CPU to be placed, none held while the client waits for the server, so many
            # hosts fit on a small machine.
            options: dict[str, Any] = {"resources": {pin: PIN_AMOUNT}} if pin else {"scheduling_strategy": "SPREAD"}
            host = remote.options(**options).remote({n: parts[n] for n in chunk}, **client_args)
            host_of.update(dict.fromkeys(chunk, host))
    return host_of


def start_local_hosts(parts: dict[str, Any], clients_per_actor: int, client_args: dict[str, Any]) -> dict[str, Any]:
    """In-process hosts, grouped as `start_ray_hosts` groups them."""
    names = list(parts)
    host_of = {}
    for i in range(0, len(names), clients_per_actor):
        chunk = names[i:i + clients_per_actor]
        host = ClientHost({n: parts[n] for n in chunk}, **client_args)
        host_of.update(dict.fromkeys(chunk, host))
    return host_of
