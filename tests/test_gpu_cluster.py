"""GPU placement without a GPU: Ray's fake autoscaler with a GPU node type it has not launched yet, the device and
precision choice per device type, and the `gpu` extra's packaging.

The fake cluster's GPU node declares {"GPU": 1} with no CUDA device behind it. Ray schedules on it exactly as on a
real GPU node (it sets CUDA_VISIBLE_DEVICES, counts the GPU, launches the node for a GPU request), so the test checks
what each stage asks for and where it runs. Only the compute inside falls back to the CPU there, and only because
this test's cluster sets DCE_FAKE_GPUS=1 (engine.runtime.fake_gpus; without it a GPU process without CUDA is an error)
and because of it trains with gloo instead of NCCL.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from markers import needs
from ray_head import _kill_processes_mentioning, free_port, ray_cli

from engine.runtime import compute_device, train_backend
from engine.train.loop import native_precision, to_device

RUN_LAST = True  # after the other own-cluster modules: see tests/conftest.py
REPO = Path(__file__).resolve().parent.parent
# The fake_multinode provider's base config (Ray's fake_multi_node/example.yaml, which the Ray wheel does not ship).
FAKE_BASE = {
    "cluster_name": "dce-fake-gpu", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}
GPU_NODE_TYPE = "gpu_worker"
TINY_GPU_RUN = [
    "data.source=blobs", "data.n_samples=300", "data.n_features=6", "data.centers=3", "data.rows_per_shard=100",
    "data.normalize=standard", "model.hidden=[16]", "model.latent_dim=3", "train.epochs=1", "train.batch_size=64",
    "train.num_workers=1", "embed.concurrency=1", "cluster.k=3", "cluster.n_init=1", "cluster.method=kmeans",
    "cluster.manifold=none", "report.enabled=false", "ray.shared_storage=true",
]


def _autoscaling_cluster_class():
    from ray.cluster_utils import AutoscalingCluster

    class FakeGpuCluster(AutoscalingCluster):
        """ray.cluster_utils.AutoscalingCluster on free ports in a temp dir of its own, stopped by its own processes:
        AutoscalingCluster's start and shutdown run `ray stop --force`, which would end every Ray on this machine.
        Autoscaler v1: v2 fills its config from the fake provider's example.yaml, which the Ray wheel lacks."""

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            config = copy.deepcopy(FAKE_BASE)
            config["available_node_types"] = {
                **worker_node_types,
                "ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}}
            config.update(config_kwargs)
            return config

        def start(self, _system_config=None, override_env=None):
            self.temp_dir = Path(tempfile.mkdtemp(prefix="rayg", dir="/tmp"))
            port = free_port()
            self._config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
            (self.temp_dir / "autoscaler.json").write_text(json.dumps(self._config))
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
            # A test head has nothing to hand over on SIGTERM; Ray's default waits up to 30 s for leases to drain.
            env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_AUTH_MODE="disabled",
                       RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", DCE_FAKE_GPUS="1", **(override_env or {}))
            env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
            cmd = [ray_cli(), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                   f"--autoscaling-config={self.temp_dir / 'autoscaler.json'}", f"--temp-dir={self.temp_dir / 't'}",
                   f"--num-cpus={int(self._head_resources['CPU'])}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
            with open(self.temp_dir / "head.log", "wb") as log:
                self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            self.address = f"127.0.0.1:{port}"

        def shutdown(self):
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # The fake worker nodes are the autoscaler's children in groups of their own; their paths name the
            # cluster's temp dir.
            _kill_processes_mentioning(str(self.temp_dir).encode())

    return FakeGpuCluster


@pytest.fixture(scope="module")
@needs("own_cluster")
def gpu_cluster():
    """A CPU head (the driver's node) and a GPU node type with min_workers 0 that the autoscaler launches on demand,
    joined as a Ray Jobs driver would (RAY_ADDRESS)."""
    import ray

    if ray.is_initialized():  # the shared local Ray; conftest's `ray_local` starts it again for later modules
        ray.shutdown()
    cluster = _autoscaling_cluster_class()(
        head_resources={"CPU": 2},
        worker_node_types={GPU_NODE_TYPE: {"resources": {"CPU": 2, "GPU": 1}, "node_config": {},
                                           "min_workers": 0, "max_workers": 1}})
    with pytest.MonkeyPatch.context() as mp:
        cluster.start()
        try:
            mp.setenv("RAY_AUTH_MODE", "disabled")
            mp.setenv("DCE_FAKE_GPUS", "1")
            mp.setenv("RAY_ADDRESS", cluster.address)
            deadline = time.monotonic() + 120
            while True:
                try:
                    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
                    break
                except (ConnectionError, RuntimeError):
                    if time.monotonic() > deadline or cluster.process.poll() is not None:
                        raise
                    time.sleep(1)
            # Ray 2.60's autoscalers do not report their node types to the GCS (newer Ray's v2 autoscaler does):
            # report them as such an autoscaler would, so that `use_gpu: auto` finds the GPU type it may launch.
            from engine.runtime import report_node_types

            report_node_types({name: spec for name, spec in cluster._config["available_node_types"].items()})
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)
    return found


def test_pipeline_on_a_cluster_without_gpus_yet_asks_for_them_and_runs_there(gpu_cluster, tmp_path):
    import ray
    from ray.util.state import list_actors, list_tasks

    from engine.runtime import gpus_possible, resources, use_gpu

    # No GPU in the cluster yet: only the autoscaler's node types say that one may be launched.
    assert ray.cluster_resources().get("GPU", 0) == 0 and len(ray.nodes()) == 1
    _wait(lambda: gpus_possible() > 0, "the autoscaler never reported its GPU node type")
    assert use_gpu("auto") and use_gpu(True) and not use_gpu(False)
    from engine.cluster.assignments import actor_gpus

    assert actor_gpus(2) == 0.5 and actor_gpus(1) == 1.0  # shard actors share the GPU they may get
    assert not resources().local  # a Ray Jobs driver on a cluster (RAY_ADDRESS set)

    out = tmp_path / "run"
    # `dce run` as a user runs it (no --verbose), on the cluster in RAY_ADDRESS.
    cmd = [sys.executable, "-m", "engine.cli", "run", *[a for s in TINY_GPU_RUN for a in ("--set", s)],
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    # Quiet: no deprecation warnings and no Ray log lines (autoscaler events, worker logs, INFO lines).
    # One Ray line remains, from the driver's core worker: Ray Data passes every pool actor its own transformer
    # and context as object-store references, which Ray 2.60 reports for any actor with restarts (ray#53727); only
    # max_restarts=0, giving up the embedding actors' fault tolerance, avoids it.
    known = "has constructor arguments in the object store and max_restarts > 0"
    noisy = [line for line in printed.splitlines()
             if ("deprecat" in line.lower() or "(autoscaler" in line or " INFO " in line or "WARNING" in line
                 or line.startswith(("(", "["))) and known not in line]
    assert not noisy, printed

    # The autoscaler launched the GPU node type (the only one with a GPU) for the pipeline's GPU requests.
    gpu_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU") == 1
                 and n["Resources"].get("CPU") == 2]
    assert len(gpu_nodes) == 1, ray.nodes()
    gpu_node = gpu_nodes[0]
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
    assert head != gpu_node

    run = json.loads((out / "run.json").read_text())
    placement = run["placement"]
    # Training: one Ray Train worker with a GPU, on the GPU node; gloo only because this cluster's GPUs are fake.
    assert placement["train"]["asked"] == {"GPU": 1}
    assert placement["train"]["backend"] == "gloo" and train_backend(True) == "gloo"  # DCE_FAKE_GPUS=1 here
    assert placement["train"]["ran_on"]["node"] == gpu_node
    assert placement["train"]["ran_on"]["gpu_ids"] == ["0"]
    assert placement["train"]["ran_on"]["device"] == "cpu" and not placement["train"]["ran_on"]["cuda"]  # fake GPU
    assert placement["embed"]["asked"] == {"CPU": 1, "GPU": 1}
    assert placement["assign"]["asked"] == {"CPU": 1, "GPU": 1}
    # The k-means ran in a Ray task with a GPU on the GPU node, not in the driver on the head.
    assert placement["cluster"]["in_driver"] is False
    assert placement["cluster"]["asked"] == {"CPU": 1, "GPU": 1}
    assert placement["cluster"]["ran_on"]["node"] == gpu_node and placement["cluster"]["ran_on"]["gpu_ids"] == ["0"]
    json.loads((out / "cluster.json").read_text())["inertia"]  # noqa: B018 - written by the driver from the result

    # Ray's own record agrees: every GPU-capable stage's actors and tasks ran on the GPU node.
    actors = list_actors(limit=1000, raise_on_missing_output=False)
    on = {a.class_name: a.node_id for a in actors}
    assert on["RayTrainWorker"] == gpu_node, on
    assert on["MapWorker(MapBatches(Embedder))"] == gpu_node, on
    tasks = [t for t in list_tasks(limit=1000, raise_on_missing_output=False) if t.name.endswith("_placed_call")]
    assert tasks and {t.node_id for t in tasks} == {gpu_node}, tasks
    assign = [t for t in list_tasks(limit=1000, raise_on_missing_output=False) if "assign_batch" in t.name]
    assert assign and {t.node_id for t in assign} == {gpu_node}, assign


# ---- device and precision per device type (no Ray): only torch's capability queries are patched ---------------


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32"),
                                                      ((6, 0), "fp32")])
def test_bf16_only_on_gpus_with_native_bfloat16_else_fp32_with_one_warning(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native_precision("bf16", "cuda") == expected
        assert native_precision("fp32", "cuda") == "fp32"
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == (expected == "fp32"), [str(w.message) for w in said]
    if said:
        assert "compute capability" in str(said[0].message) and "fp32" in str(said[0].message)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_only_where_it_is_native_and_training_never_crashes(native):
    from engine.train.loop import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precision = native_precision("bf16", "cpu", cpu_has_bf16=native)
    assert precision == ("bf16" if native else "fp32")
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == (not native)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.net(x)

        def loss(self, x, forward):
            out = forward(x)
            loss = ((out - x) ** 2).mean()
            return loss, {}

    model = Tiny()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = to_device(torch.randn(32, 4).numpy(), torch.device("cpu"))
    history = train(model, {"model": optimizer}, lambda epoch: [x], epochs=2, precision=precision)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_a_gpu_process_without_cuda_is_an_error_except_on_a_fake_gpu_cluster(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device("cpu").type == "cpu"
    monkeypatch.delenv("DCE_FAKE_GPUS", raising=False)
    with pytest.raises(RuntimeError, match="Ray assigned this process a GPU but torch sees no CUDA device"):
        compute_device("cuda")
    assert train_backend(True) == "nccl" and train_backend(False) == "gloo"
    monkeypatch.setenv("DCE_FAKE_GPUS", "1")
    assert compute_device("cuda").type == "cpu"
    assert train_backend(True) == "gloo"


def test_cuda_device_when_torch_sees_one(monkeypatch):
    monkeypatch.delenv("DCE_FAKE_GPUS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert compute_device("cuda") == torch.device("cuda", 0)


# ---- faiss packaging ---------------------------------------------------------------------------------------------


def test_a_faiss_feature_without_faiss_names_the_extra(monkeypatch):
    from engine.config import load_config
    from engine.errors import ConfigError
    from engine.pipeline import check_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)  # as if not installed: `import faiss` raises ImportError
    with pytest.raises(ConfigError, match=r"cluster.backend=faiss needs faiss.*deep-cluster-engine\[faiss\]"
                                          r".*deep-cluster-engine\[gpu\]"):
        check_faiss(load_config("digits", ["cluster.backend=faiss"]))
    check_faiss(load_config("digits", ["cluster.backend=torch", "cluster.manifold=none"]))  # needs no faiss


def test_a_faiss_feature_without_faiss_is_one_error_line_before_anything_runs(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from engine.cli import app

    monkeypatch.setitem(sys.modules, "faiss", None)
    result = CliRunner().invoke(app, ["run", "--set", "cluster.backend=faiss", "--set", "cluster.manifold=none",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "[faiss]" in lines[0], result.output
    assert not (tmp_path / "run").exists()


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss")


def _requirements(extra: str) -> list[str]:
    """The project's requirements with `extra`, its self-references (deep-cluster-engine[x]) expanded."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name, extras = project["name"], project["optional-dependencies"]
    out, todo, seen = list(project["dependencies"]), [extra], set()
    while todo:
        for req in extras[(e := todo.pop())]:
            if req.startswith(f"{name}["):
                todo += [x for x in req[len(name) + 1:req.index("]")].split(",") if x not in seen]
            else:
                out.append(req)
        seen.add(e)
    return out


def _resolves(requirements: list[str]) -> list[dict]:
    """pip's resolver report for `requirements` (no dependencies followed: every direct one is resolved against the
    package index, and each resolved distribution's own requirements are in its metadata)."""
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--no-deps",
         "--only-binary=:all:", "--report", "-", *requirements],
        capture_output=True, text=True, timeout=240)
    if report.returncode != 0:
        if any(s in report.stderr for s in ("NewConnectionError", "Temporary failure in name resolution",
                                              "Network is unreachable", "Max retries exceeded")):
            pytest.skip(f"the package index is unreachable: {report.stderr.strip().splitlines()[-1]}")
        raise AssertionError(report.stderr)
    return json.loads(report.stdout)["install"]


@pytest.mark.slow
def test_gpu_extra_resolves_exactly_one_faiss_distribution():
    """`.[gpu]` brings faiss-gpu-cu12 and nothing else that installs the module `faiss`; `.[test]` brings faiss-cpu
    alone. A second provider would overwrite the first's files (pip installs both without a word)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for extra, provider in (("gpu", "faiss-gpu-cu12"), ("faiss", "faiss-cpu")):
        installed = _resolves(_requirements(extra))
        names = {canonicalize_name(d["metadata"]["name"]) for d in installed}
        direct = sorted(n for n in names if n in FAISS_DISTRIBUTIONS)
        # One level down: none of the resolved distributions requires another faiss provider.
        indirect = sorted({canonicalize_name(Requirement(r).name) for d in installed
                           for r in d["metadata"].get("requires_dist") or []
                           if canonicalize_name(Requirement(r).name) in FAISS_DISTRIBUTIONS
                           and not Requirement(r).marker} - {provider})
        assert direct == [provider] and not indirect, (extra, direct, indirect)
    assert "faiss-cpu>=1.8" in _requirements("test")
    assert not any(r.startswith("faiss") for r in _requirements("umap"))  # the base install has no faiss
