"""Connect to Ray (RAY_ADDRESS, a given address, or an embedded local Ray) and report what it offers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from engine.errors import RayStartError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    nodes: int
    address: str
    local: bool
    driver_cpus: float  # CPUs of the node this process runs on

    @property
    def worker_nodes(self) -> int:
        """Nodes whose workers may write a run's outputs: the alive ones, and one more when this process's node
        has no CPU for workers (an autoscaling cluster's head, before its worker nodes are up)."""
        return self.nodes if self.driver_cpus > 0 else self.nodes + 1

    def describe(self) -> str:
        where = "embedded local Ray" if self.local else f"Ray cluster at {self.address}"
        return f"{where}: {self.nodes} node(s), {self.cpus:g} CPU(s), {self.gpus:g} GPU(s)"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             verbose: bool = False) -> Resources:
    """Join the cluster in RAY_ADDRESS (or `address`), else start a local Ray; idempotent."""
    import ray

    if not ray.is_initialized():
        target = os.environ.get("RAY_ADDRESS") or address
        quiet = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
        try:
            if target:
                ray.init(address=target, **quiet)
            else:
                # Logical CPUs are scheduling slots: training workers and the Ray Data tasks that feed them
                # must fit at the same time, so a small machine gets at least 4.
                cpus = num_cpus if num_cpus is not None else max(os.cpu_count() or 1, 4)
                # address="local": a new Ray for this process, never a `ray start` head that happens to run on
                # the machine (ray.init() alone would join it, and refuse num_cpus there).
                ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, **quiet)
        except Exception as e:  # ConnectionError, RuntimeError, TimeoutError, ValueError...: Ray names none in common
            raise RayStartError(_start_failure(target, e)) from e
        from engine import interrupt

        interrupt.reinstall()
        _quiet_ray_data(verbose)
    return resources()


def _start_failure(target: str | None, error: Exception) -> str:
    """One line: what could not be started or joined, Ray's reason, and what to try."""
    first = (str(error).strip().splitlines() or [""])[0]
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if target:
        setting = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
        return (f"could not join the Ray cluster at {target} ({setting}): {reason}; check that the cluster is up "
                f"(ray status --address {target}) and that {setting} is its address, or unset it to run on a local Ray")
    return (f"could not start a local Ray: {reason}; see Ray's logs (/tmp/ray/session_latest/logs), check free memory "
            "and disk space (/dev/shm, /tmp), or set RAY_ADDRESS to join a running cluster")


def _quiet_ray_data(verbose: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:
        for name in ("ray.data", "ray.train", "ray.tune", "ray._private", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Its one warning says that the bars are off, which is what quiet asked for.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # Ray Data logs a failed task's error with its traceback on the console before raising it; the engine's
        # one-line message is what the user gets (the traceback stays in Ray Data's log file, and --verbose shows it).
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL)


def resources() -> Resources:
    import ray

    total = ray.cluster_resources()
    ctx = ray.get_runtime_context()
    address = ctx.gcs_address
    alive = [n for n in ray.nodes() if n.get("Alive")]
    nodes = len(alive)
    local = not (os.environ.get("RAY_ADDRESS") or "") and nodes == 1
    driver_cpus = sum(n["Resources"].get("CPU", 0.0) for n in alive if n["NodeID"] == ctx.get_node_id())
    return Resources(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0), nodes=nodes, address=address,
                     local=local, driver_cpus=driver_cpus)


def use_gpu(setting: bool | str) -> bool:
    """Resolve a `use_gpu` setting: 'auto' means yes when the Ray cluster has GPUs."""
    if setting == "auto":
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)
