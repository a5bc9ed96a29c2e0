"""The Flower backend: FederatedKMeans's exchanges carried as Flower messages between a ServerApp and ClientApps.

The round logic stays in `engine.federated.algorithms` and the clients stay `ClientHost`s: `FlowerTransport` is a
third `Transport` whose exchange is one Flower `query` message per SuperNode (the batch of that node's partition
requests) and one reply, through a `Grid`. The ClientApp holds one `ClientHost` per SuperNode and answers with
`ClientHost.call`. Three ways to run it:

- `FederatedKMeans(transport="flower").fit(partitions)`: Flower's simulation engine in this process (its Ray
  backend runs the ClientApps), one virtual SuperNode per client host.
- `engine.federated.flower_app` holds the components of a Flower app (`flwr run`, see `submit`): a SuperLink
  runs the ServerApp, SuperNodes run the ClientApp on their own data (node config `partition` and `data`).
- `dce federate --backend flower` does either, by whether `federated.flower.address` is set.

Payloads travel as pickles (numpy arrays, `Release`, engine errors) read back by `decode`, which only builds the
types a message may hold: a peer cannot make the reader run code.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from engine.errors import ConfigError, DataError, EngineError
from engine.federated.client import ClientHost
from engine.federated.transport import Transport, unpack

logger = logging.getLogger(__name__)

RECORD = "dce"  # the ConfigRecord of every message and reply
# The server's first exchange of every run (FederatedKMeans._fit): each client loads its rows and says how many. A
# SuperNode answers it with its start reply, which saves one message round: in a deployment each costs a
# SuperNode's poll of the SuperLink (every 3 s when idle) and a fresh ClientApp process, ~6 s in all here.
FIRST_CALL = "load"
STATE = "dce-host"  # the ConfigRecord of a SuperNode's context state that keeps its ClientHost between messages
# Node config keys of a SuperNode in a deployment: its partition's name and the Parquet file or folder of its rows.
NODE_PARTITION, NODE_DATA, NODE_COLUMN, NODE_LABEL = "partition", "data", "column", "label-column"
# Run config keys of a deployment run (`submit`): the resolved pipeline config (JSON), where the ServerApp writes
# the run directory, and whether it may replace the engine's results there.
RUN_CONFIG, RUN_OUT, RUN_OVERWRITE = "dce-config", "dce-out", "dce-overwrite"
# Marks the line where the ServerApp reports bad input in the run's log (flower_app.serve, `submit`).
ERROR_MARK = "dce-federate-error:"


# --- payloads -------------------------------------------------------------------------------------------

def encode(obj: Any) -> bytes:
    """A payload as bytes (pickle protocol 5)."""
    return pickle.dumps(obj, protocol=5)


# What a payload may hold: containers, numpy arrays and scalars, the release of a round, engine errors.
_ALLOWED = {
    ("builtins", n) for n in ("set", "frozenset", "complex", "slice", "range", "bytearray")
} | {
    (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric",
                                                                                       "_frombuffer"),
    ("engine.federated.client", "Release"), ("engine.federated.privacy", "Noise"),
}


class _PayloadUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module.startswith("numpy") and name.endswith("DType")):
            return super().find_class(module, name)
        if module.startswith("engine."):
            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, EngineError):
                return found
        raise pickle.UnpicklingError(f"a federated message may not hold {module}.{name}")


def decode(data: bytes) -> Any:
    """A payload back from bytes, building only the types a message may hold."""
    return _PayloadUnpickler(io.BytesIO(data)).load()


def _payload(message: Message, key: str = "data") -> Any:
    return decode(message.content[RECORD][key])


def _content(obj: Any) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({"data": encode(obj)})})


# --- the client side ------------------------------------------------------------------------------------

class _HostPickler(pickle.Pickler):
    """Pickles a ClientHost with its private keys (as raw bytes): its state between two ClientApp runs.

    A SuperNode runs its ClientApp in a fresh process per message, so the host (rows, identity and mask keys, DP
    noise generator) lives in the node's context state; that state stays on the node and never reaches the server.
    """

    def reducer_override(self, obj: Any) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        for kind in (Ed25519PrivateKey, X25519PrivateKey):
            if isinstance(obj, kind):
                return kind.from_private_bytes, (obj.private_bytes_raw(),)
        return NotImplemented


def _dump_host(host: ClientHost) -> bytes:
    out = io.BytesIO()
    _HostPickler(out, protocol=5).dump(host)
    return out.getvalue()


def _node_sources(context: Context, sources: list[dict[str, Any]] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """This SuperNode's partitions and their reading settings: the simulation's share of `sources` (by the node's
    partition-id), or the deployment's node config."""
    node = context.node_config
    if sources is not None:
        return sources[int(node["partition-id"])], {}
    from engine.federated.partitions import ParquetPartition

    missing = [k for k in (NODE_PARTITION, NODE_DATA) if k not in node]
    if missing:
        raise ConfigError(f"SuperNode {context.node_id}: node config lacks {', '.join(missing)} (start it with "
                          f"--node-config \"{NODE_PARTITION}='<name>' {NODE_DATA}='<parquet file or folder>'\")")
    read = {"column": node.get(NODE_COLUMN) or None, "label_column": node.get(NODE_LABEL) or None}
    return {str(node[NODE_PARTITION]): ParquetPartition(str(node[NODE_DATA]))}, read


def client_app(sources: list[dict[str, Any]] | None = None) -> ClientApp:
    """The ClientApp: one ClientHost per SuperNode, answering `ClientHost.call` batches.

    sources: the simulation's partitions, one dict (name -> rows) per virtual SuperNode; None: a deployment,
    where each SuperNode names its partition in its node config.
    """
    app = ClientApp()

    @app.query()
    def answer(message: Message, context: Context) -> Message:
        request = _payload(message)
        if request[0] == "start":  # the run's first message: build the host from this node's partitions
            parts, read = _node_sources(context, sources)
            host = ClientHost(parts, **{**request[1], **{k: v for k, v in read.items() if v}})
            # Its clients' answers to the run's first call (FIRST_CALL) travel back with the start reply.
            reply: Any = (list(host.clients), host.call([(name, FIRST_CALL, ()) for name in host.clients]))
        else:
            if STATE not in context.state:
                raise RuntimeError("this SuperNode's client was not started in this run")
            host = pickle.loads(context.state[STATE]["host"])  # this node's own state, written below
            reply = host.call(request[1])
        context.state[STATE] = ConfigRecord({"host": _dump_host(host)})
        return Message(_content(reply), reply_to=message)

    return app


# --- the server side ------------------------------------------------------------------------------------

@dataclass(eq=False)
class FlowerNode:
    """One SuperNode, the host of its partitions' clients (the transport's host)."""

    node_id: int


class FlowerTransport(Transport):
    """The clients' hosts are Flower SuperNodes reached through a ServerApp's Grid: one `query` message per node
    and exchange, but for the first exchange (FIRST_CALL), answered with the start replies. A node that does not
    answer within round_timeout, or answers with an error, is dropped for the exchange."""

    def __init__(self, grid: Grid, hosts: dict[str, FlowerNode], quorum: float, *,
                 round_timeout: float | None = None, first: dict[str, tuple[str, Any]] | None = None, **kwargs: Any):
        super().__init__(hosts, quorum, **kwargs)
        self.grid = grid
        self.round_timeout = round_timeout
        self.first = first or {}  # the clients' answers to FIRST_CALL, sent with their start replies

    @classmethod
    def start(cls, grid: Grid, client_args: dict[str, Any], quorum: float, *, nodes: int | None = None,
              wait: float = 60.0, round_timeout: float | None = None, **kwargs: Any) -> FlowerTransport:
        """Wait for `nodes` SuperNodes (at most `wait` seconds; None: those connected now), start a ClientHost on
        each, and learn which partitions each one hosts and their answers to FIRST_CALL."""
        deadline = time.monotonic() + wait
        node_ids = list(grid.get_node_ids())
        while nodes is not None and len(node_ids) < nodes:
            if time.monotonic() > deadline:
                raise ConfigError(f"federated.flower.nodes={nodes}: only {len(node_ids)} SuperNode(s) connected to "
                                  f"the SuperLink within {wait:g} s")
            time.sleep(0.5)
            node_ids = list(grid.get_node_ids())
        if not node_ids:
            raise ConfigError("no SuperNode is connected to the SuperLink")
        messages = [Message(_content(("start", client_args)), dst_node_id=n, message_type=MessageType.QUERY)
                    for n in sorted(node_ids)]
        replies = exchange(grid, messages, timeout=wait)
        hosts: dict[str, FlowerNode] = {}
        first: dict[str, tuple[str, Any]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ConfigError(f"SuperNode {node} could not start its client: {_last_line(reply.error.reason)}")
            host = FlowerNode(node)
            names, answers = _payload(reply)
            first.update(answers)
            for name in names:
                if name in hosts:
                    raise ConfigError(f"partition '{name}' is hosted by two SuperNodes ({hosts[name].node_id} "
                                      f"and {node}): give each SuperNode its own node config `partition`")
                hosts[name] = host
        if len(replies) < len(messages):
            logger.warning("%d SuperNode(s) did not start within %g s", len(messages) - len(replies), wait)
        if not hosts:
            raise ConfigError("no SuperNode started its client")
        return cls(grid, dict(sorted(hosts.items())), quorum, round_timeout=round_timeout, first=first, **kwargs)

    def _send(self, requests):
        first, self.first = self.first, {}  # good for the run's first exchange only
        if requests and all(call == (FIRST_CALL, ()) and name in first for name, call in requests.items()):
            return unpack({name: first[name] for name in requests})
        batches = self._by_host(requests)
        by_node = {host.node_id: (host, batch) for host, batch in batches.values()}
        messages = [Message(_content(("call", batch)), dst_node_id=node, message_type=MessageType.QUERY)
                    for node, (_, batch) in by_node.items()]
        replies = {r.metadata.src_node_id: r for r in exchange(self.grid, messages, timeout=self.round_timeout)}
        answers, failed = {}, {}
        for node, (_, batch) in by_node.items():
            names = [name for name, _, _ in batch]
            reply = replies.get(node)
            if reply is None:
                failed.update(dict.fromkeys(names, f"no answer within round_timeout={self.round_timeout} s"))
            elif reply.has_error():
                failed.update(dict.fromkeys(names, f"client failed: {_last_line(reply.error.reason)}"))
            else:
                a, f = unpack(_payload(reply))
                answers.update(a)
                failed.update(f)
        return answers, failed


# Between two pulls of the replies: Flower's in-memory (simulation) Grid waits 0.1 s; its deployed Grid's
# send_and_receive waits 3 s, which added up to 3 s to every exchange of every round (a pull is one small RPC).
PULL_INTERVAL = 0.1


def exchange(grid: Grid, messages: list[Message], *, timeout: float | None) -> list[Message]:
    """Push `messages` and pull their replies every PULL_INTERVAL seconds until all have come or `timeout` seconds
    have passed (None: no limit); the replies that came, as `Grid.send_and_receive` returns them."""
    waiting = set(grid.push_messages(messages))
    waiting.discard(None)  # a message the SuperLink did not take (Flower logs why): no reply will come
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        pulled = list(grid.pull_messages(waiting))
        replies.extend(pulled)
        waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(PULL_INTERVAL if deadline is None else min(PULL_INTERVAL, max(0.0, deadline - time.monotonic())))
    return replies


def _last_line(reason: str | None) -> str:
    """The last line of a ClientApp's error (Flower sends the whole traceback): the exception itself."""
    lines = [line.strip() for line in (reason or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no reason given"


def server_app(fit: Callable[[Grid, Context], None]) -> ServerApp:
    """A ServerApp whose main is `fit(grid, context)`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        fit(grid, context)

    return app


# --- simulation -----------------------------------------------------------------------------------------

def simulate(parts: dict[str, Any], clients_per_node: int, *, client_args: dict[str, Any],
             transport_options: dict[str, Any], fit: Callable[[Transport], None]) -> None:
    """Run `fit(transport)` as the ServerApp of Flower's simulation engine, over one virtual SuperNode per
    `clients_per_node` partitions. The simulation's Ray backend starts Ray if it is not running and shuts it down
    at the end (Flower's choice: it owns the Ray session it runs in)."""
    from flwr.simulation import run_simulation

    names = list(parts)
    sources = [{n: parts[n] for n in names[i:i + clients_per_node]} for i in range(0, len(names), clients_per_node)]
    failure: list[BaseException] = []

    def main(grid: Grid, context: Context) -> None:
        try:
            transport = FlowerTransport.start(grid, client_args, nodes=len(sources), **transport_options)
            fit(transport)
        except BaseException as e:  # kept to be raised as itself: run_simulation wraps what the ServerApp raised
            failure.append(e)

    # One CPU per virtual SuperNode's ClientApp: Flower's default (2) would leave a 2-CPU machine one at a time.
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": len(sources) + 1}}
    run_simulation(server_app(main), client_app(sources), num_supernodes=len(sources), backend_config=backend)
    if failure:
        raise failure[0]


# --- deployment -----------------------------------------------------------------------------------------

# A Control API route of the SuperLink (flwr 1.42's HTTP API): what `check_address` asks for.
_CONTROL_PROBE = "/v1/control/list-runs"


def check_address(address: str, timeout: float, *, insecure: bool = False, root_certificates: str | None = None,
                  setting: str = "federated.flower.address") -> None:
    """Check that a Flower SuperLink's Control API answers at `address` (host:port) within `timeout` seconds: its
    route for listing runs must exist (a GET is refused with 405, or 401/403 with authentication on)."""
    import httpx

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{setting}={address!r} should be host:port (the SuperLink's address, as "
                          "`flower-superlink --host --port` serve it)")
    scheme = "http" if insecure else "https"
    verify: Any = root_certificates if root_certificates else True
    try:
        answer = httpx.get(f"{scheme}://{address}{_CONTROL_PROBE}", timeout=timeout, verify=verify)
    except httpx.HTTPError as e:
        raise ConfigError(f"{setting}={address}: no SuperLink answers there within {timeout:g} s "
                          f"({type(e).__name__}: {str(e)[:120] or 'no answer'})") from None
    if answer.status_code not in (401, 403, 405):
        raise ConfigError(f"{setting}={address}: a server answers there, but not a Flower SuperLink's Control API "
                          f"({scheme.upper()} {answer.status_code} for {_CONTROL_PROBE})")



# The Flower app `submit` builds: its components are the two objects of engine/federated/flower_app.py, so the
# SuperLink's ServerApp process and the SuperNodes' ClientApp processes import them from the installed engine (the
# FAB only carries this pyproject: no dependencies to install on the nodes).
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dce-federated-kmeans"
version = "1.0.0"
description = "Deep Cluster Engine's federated k-means (engine.federated.flower)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "dce"

[tool.flwr.app.components]
serverapp = "engine.federated.flower_app:server"
clientapp = "engine.federated.flower_app:client"

[tool.flwr.app.config]
{RUN_CONFIG} = ""
{RUN_OUT} = ""
{RUN_OVERWRITE} = false
"""


def submit(address: str, run_config: dict[str, Any], *, insecure: bool = False,
           root_certificates: str | None = None, log: Callable[[str], None] = logger.info) -> None:
    """Run the Flower app on the SuperLink whose Control API is at `address` with Flower's own `flwr run --stream`
    (which returns when the run ends); `run_config` values travel base64-encoded when they are strings.

    `flwr` reads its SuperLink connections from FLWR_HOME: a temporary one names this address only, so the user's
    ~/.flwr is neither read nor changed."""
    flwr = Path(sys.executable).with_name("flwr")
    flwr_cmd = str(flwr) if flwr.is_file() else shutil.which("flwr")
    if flwr_cmd is None:
        raise ConfigError("federated.backend=flower needs the `flwr` command: pip install "
                          "'deep-cluster-engine[federated-kmeans]'")
    with tempfile.TemporaryDirectory(prefix="dce-flower-") as tmp:
        app, home = Path(tmp, "app"), Path(tmp, "home")
        app.mkdir()
        home.mkdir()
        (app / "pyproject.toml").write_text(APP_PYPROJECT)
        tls = "insecure = true" if insecure else (f"root-certificates = {json.dumps(root_certificates)}"
                                                  if root_certificates else "insecure = false")
        (home / "config.toml").write_text(f'[superlink]\ndefault = "dce"\n\n[superlink.dce]\n'
                                          f'address = {json.dumps(address)}\n{tls}\n')
        lines = []
        for key, value in run_config.items():
            if isinstance(value, str):
                value = base64.b64encode(value.encode()).decode()
            lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
        overrides = Path(tmp, "run-config.toml")
        overrides.write_text("\n".join(lines) + "\n")
        # A wide terminal for Flower's rich output, so that no log line (ERROR_MARK's above all) is wrapped.
        env = {**os.environ, "FLWR_HOME": str(home), "COLUMNS": "100000"}
        proc = subprocess.Popen([flwr_cmd, "run", str(app), "dce", "--stream", "--run-config", str(overrides)],
                                cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        reported: EngineError | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            log(f"flwr: {line}")
            tail = [*tail[-4:], line]
            if ERROR_MARK in line and reported is None:
                kind, _, message = line.split(ERROR_MARK, 1)[1].partition(":")
                reported = (DataError if kind == "DataError" else ConfigError)(message.strip())
        if proc.wait() != 0:
            raise ConfigError(f"federated.flower.address={address}: `flwr run` failed (exit {proc.returncode}): "
                              + " / ".join(tail))
        if reported is not None:
            raise reported
