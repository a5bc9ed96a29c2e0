"""Ending the nodes of a ray.cluster_utils.Cluster with nothing they started left behind.

`Cluster.remove_node` and `Cluster.shutdown` stop each node's raylet and leave each of its workers to notice on its
own that the raylet is gone; under load one did not for minutes, and outlived the suite (the conftest's check). So
the raylets' descendants are found in /proc first and killed after."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses): the state first,
    then the parent's pid, ... (proc(5)'s fields 3 on). OSError when the process has ended."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Every live descendant of `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(stat_fields(entry.name)[1])
            except (OSError, ValueError):
                continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        kids = [p for p, parent in parents.items() if parent == todo[-1]]
        todo.pop()
        found += kids
        todo += kids
    return found


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass  # ended already


def _raylet_children(node) -> list[int]:
    from ray._private import ray_constants

    return [pid for info in node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
            for pid in children(info.process.pid)]


def remove_node(cluster, node, *, abrupt: bool = False) -> None:
    """`Cluster.remove_node`, and then whatever the node's raylet had started and is still there killed. Ray learns
    of the loss from the raylet (a graceful stop, as a drained node goes).

    abrupt: the raylet and every process it started SIGKILLed at once, as a machine that crashes or drops off the
    network goes: nothing tells the GCS, which learns of the loss only from its failed health checks, and meanwhile
    calls to the node's actors fail as unavailable."""
    from ray._private import ray_constants

    workers = _raylet_children(node)
    if abrupt:
        for pid in [node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, *workers]:
            kill(pid)
        cluster.remove_node(node, allow_graceful=False)  # the node's other processes, and the cluster's bookkeeping
        return
    cluster.remove_node(node)
    for pid in workers:
        kill(pid)


def shutdown_cluster(cluster) -> None:
    """`Cluster.shutdown`, and then whatever the nodes' raylets had started and is still there killed."""
    nodes = [n for n in [cluster.head_node, *cluster.worker_nodes] if n is not None]
    workers = [pid for node in nodes for pid in _raylet_children(node)]
    cluster.shutdown()
    for pid in workers:
        kill(pid)
