"""Which Ray nodes may run the tasks that share curation's working folder (they write and read it as local files)
and read its local input files."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.runtime import cancel_running

# Seconds to wait for one zero-CPU task on every node (a worker process to start); a node that does not answer in
# time counts as one that cannot see the folder.
PROBE_TIMEOUT = 120.0


class FolderUnseen(ConfigError):
    """No node with a CPU sees the working folder; `readers` (node id -> CPUs): those that see the input files."""

    def __init__(self, message: str, readers: dict[str, int]):
        super().__init__(message)
        self.readers = readers


@dataclass(frozen=True)
class Placement:
    """`strategy`: a Ray scheduling strategy for the tasks (None: Ray's default, on one node); `cpus`: the CPUs
    they may use; `pinned`: the nodes that cannot see the folder or the inputs, when the tasks are kept on one
    node that can because of them."""

    strategy: Any
    cpus: int
    pinned: tuple[str, ...] = ()


def _answer(probe: str | None, token: str, node: str, inputs: Sequence[str]) -> str:
    """On one node: "ok" when it sees every input file and reads the driver's `probe` (it then writes its reply
    beside the probe, for the driver), else what it does not see: "input" or "folder"."""
    try:
        if not all(os.path.isfile(f) for f in inputs):
            return "input"
        if probe is not None:
            path = Path(probe)
            if path.read_text() != token:
                return "folder"
            path.with_name(f"{path.name}.{node}").write_text(token)
    except OSError:
        return "folder"
    return "ok"


def place_tasks(folder: Path | None, inputs: Sequence[str] = ()) -> Placement:
    """Where the tasks that share `folder` (None: no folder) and read the local files `inputs` run: spread over
    the nodes when every alive node with a CPU sees the inputs, reads what the driver wrote in `folder` and writes
    what the driver reads there (file systems they all mount); else on one node that does (the driver's, if it
    does), refused (ConfigError) when none does. Checked with a probe file and one zero-CPU task per node, whose
    reply files the driver reads."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1}
    cpus = int(sum(n["Resources"]["CPU"] for n in nodes.values()))
    if set(nodes) <= {here}:  # the driver's node alone (a head with no CPU and one worker is checked too)
        return Placement(None, max(1, cpus))
    answers = {node: "ok" for node in nodes}
    if folder is not None or inputs:
        answers = _answers(folder, inputs, nodes)
    seen = {node for node, answer in answers.items() if answer == "ok"}
    blind = tuple(sorted(set(nodes) - seen))
    if not blind:
        # Round robin over the nodes: Ray's default packs short tasks onto the driver's node first (in a test, all
        # of them on one of three nodes), and these tasks use each node's disk and memory bandwidth.
        return Placement("SPREAD", cpus)
    if not seen:
        what = "the input files" if folder is None else "both curation's working folder and the input files"
        fix = "the input" if folder is None else "the input, and --out or --state-dir,"
        message = (f"{folder or inputs[0]}: no Ray node with a CPU sees {what} (the driver runs apart from them, or "
                   f"on a node without CPUs); put {fix} on file systems every node mounts")
        readers = {node: int(nodes[node]["Resources"]["CPU"]) for node, answer in answers.items() if answer != "input"}
        raise FolderUnseen(message, readers) if folder is not None and readers else ConfigError(message)
    # The driver's node when its tasks see the folder (as they do unless the driver runs apart from its node's
    # workers), else the node that sees it with the most CPUs.
    target = here if here in seen else max(sorted(seen), key=lambda n: nodes[n]["Resources"]["CPU"])
    return Placement(NodeAffinitySchedulingStrategy(target, soft=False), int(nodes[target]["Resources"]["CPU"]),
                     blind)


def _answers(folder: Path | None, inputs: Sequence[str], nodes: dict[str, Any]) -> dict[str, str]:
    """`_answer` of each node in `nodes` ("folder" also where the driver does not read its reply back; "input" for
    a node that did not answer in time)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    probe = None if folder is None else folder / f".nodes-{token}"
    if probe is not None:
        probe.write_text(token)
    answer = ray.remote(num_cpus=0, max_retries=0)(_answer)
    refs = {node: answer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(None if probe is None else str(probe), token, node, list(inputs)) for node in nodes}
    try:
        ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT)
        cancel_running(late)
        answers = {node: ray.get(ref) if ref in ready else "input" for node, ref in refs.items()}
        if probe is not None:  # the driver reads each reply: the node's writes reach the driver too
            answers = {node: "folder" if answer == "ok" and _read(probe.with_name(f"{probe.name}.{node}")) != token
                       else answer for node, answer in answers.items()}
    finally:
        if probe is not None:
            for path in probe.parent.glob(f"{probe.name}*"):
                path.unlink(missing_ok=True)
    return answers


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
