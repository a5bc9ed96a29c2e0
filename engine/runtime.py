"""Connect to Ray (RAY_ADDRESS, a given address, or an embedded local Ray) and report what it offers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

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


def curation_cpus() -> int:
    """CPUs of a local Ray started for curation (`dce dedup`, `dce sample` and their jobs): one slot per core, as
    their tasks are single-threaded GEMM and decoding, and 4 slots on 2 cores made validate + assign ~25% slower
    (measured on 1M x 256 rows). Training's minimum of 4 slots is for its workers and their feeders."""
    return os.cpu_count() or 1


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
    """Resolve a `use_gpu` setting: 'auto' means yes when the Ray cluster has GPUs now, or has a node type with GPUs
    that its autoscaler may still launch (see `gpus_possible`)."""
    if setting == "auto":
        return gpus_possible() > 0
    return bool(setting)


def gpus_possible() -> float:
    """GPUs the connected Ray cluster has now, or the most its autoscaler may launch when that is more: read from
    the cluster config an autoscaler reports to the GCS (its node types' resources and max counts; the record Ray
    Data's autoscaling reads). A cluster whose GPU node types all have `min_workers: 0` shows no GPU in
    `ray.cluster_resources()` until a request for one makes the autoscaler launch a node. 0 without Ray."""
    import ray

    if not ray.is_initialized():
        return 0.0
    now = ray.cluster_resources().get("GPU", 0.0)
    return max(now, float(autoscaler_max_resources().get("GPU", 0)))


def cancel_running(refs: list[Any]) -> None:
    """Force-cancel those of `refs` (task results) not finished yet, as a stopped driver leaves its tasks. Never a
    finished one: cancelling it can kill the worker Ray has since given another task."""
    import ray

    if refs:
        for ref in ray.wait(list(refs), num_returns=len(refs), timeout=0)[1]:
            ray.cancel(ref, force=True)


def autoscaler_max_resources() -> dict[str, float]:
    """The most of each resource the autoscaler's node types may bring ({} when no autoscaler has reported its
    config: a local Ray, a cluster started by hand, and Ray 2.60's own autoscalers, which do not report it yet;
    see `report_node_types`)."""
    from ray._private import state

    try:
        found = state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unreachable GCS: no autoscaler to count on
        log.debug("no autoscaler cluster config", exc_info=True)
        return {}
    return dict(found or {})


def report_node_types(node_types: dict[str, dict[str, Any]]) -> None:
    """Report a cluster launcher config's `available_node_types` (name -> resources, min_workers, max_workers) to the
    GCS as the autoscaler's cluster config, the record `autoscaler_max_resources` reads: what an autoscaler that
    reports its config does, for one that does not (Ray 2.60's)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, spec in node_types.items():
        group = config.node_group_configs.add()
        group.name = name
        group.min_count = int(spec.get("min_workers", 0))
        group.max_count = int(spec.get("max_workers", 0))
        for resource, amount in (spec.get("resources") or {}).items():
            group.resources[resource] = int(amount)
    from ray._raylet import GcsClient

    GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())


def train_backend(gpu: bool) -> str:
    """The torch.distributed backend of a Ray Train run: NCCL between GPUs, gloo between CPUs. `DCE_FAKE_GPUS` (the
    fake-GPU test clusters' setting, see `compute_device`) means gloo, since those GPUs have no CUDA behind them."""
    return "nccl" if gpu and not fake_gpus() else "gloo"


def fake_gpus() -> bool:
    """True in a process of a test cluster whose nodes declare GPU resources without CUDA devices behind them
    (`DCE_FAKE_GPUS=1`, set by tests/test_gpu_cluster.py): work given such a GPU runs on the CPU there."""
    return os.environ.get("DCE_FAKE_GPUS") == "1"


def compute_device(wanted: str = "cuda"):
    """The torch device for work that Ray gave a GPU (`wanted` "cuda", or the Ray Train device's type): CUDA when
    torch sees a device, else an error naming the cause, except on a fake-GPU test cluster (`fake_gpus`), where it
    is the CPU."""
    import torch

    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if fake_gpus():
        return torch.device("cpu")
    raise RuntimeError("Ray assigned this process a GPU but torch sees no CUDA device (torch "
                       f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                       "install a CUDA build of torch on the GPU nodes, or set use_gpu: false")


def where_am_i() -> dict[str, Any]:
    """Where this Ray worker runs: its node id and IP, the GPU ids Ray gave it and whether torch sees CUDA."""
    import ray
    import torch

    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "cuda": bool(torch.cuda.is_available())}


def offload(res: Resources | None = None, *, gpu: bool) -> bool:
    """Whether in-memory GPU work (k-means, GMM, UMAP's k-NN graph, DEC's initial k-means) leaves the driver for a
    Ray task: on a cluster of several nodes (or a head without CPUs) that has or may launch GPUs. A local single-node
    run computes in this process, as before: no extra worker, no start-up."""
    if not gpu:
        return False
    res = res or resources()
    return not res.local or res.driver_cpus == 0


def require_faiss(feature: str) -> None:
    """ConfigError naming the extra to install when `feature` needs faiss and it is not installed."""
    from engine.errors import ConfigError

    try:
        import faiss  # noqa: F401
    except ImportError:
        raise ConfigError(f"{feature} needs faiss, which is not installed: pip install 'deep-cluster-engine[faiss]' "
                          "(CPU) or 'deep-cluster-engine[gpu]' (CUDA 12 GPUs)") from None
