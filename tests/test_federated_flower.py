"""The Flower backend: the same clients and rounds as a Flower ServerApp and ClientApps, on Flower's simulation
engine and on a real SuperLink with two SuperNodes; both end at the Ray run's centroids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from markers import needs
from ray_head import free_port
from sklearn.datasets import make_blobs
from typer.testing import CliRunner

from engine.cli import app
from engine.data.schema import vector_array
from engine.federated import FederatedKMeans

pytest.importorskip("flwr")

K = 3
SIZES = {"a": 70, "b": 90, "c": 60}
ROUNDS = 2
# A deployed exchange starts a ClientApp process per SuperNode (about 15 s each on a loaded 2-core machine): one round.
DEPLOYED_ROUNDS = 1


@pytest.fixture(scope="module")
def parts() -> dict[str, np.ndarray]:
    X, _ = make_blobs(n_samples=sum(SIZES.values()), n_features=3, centers=K, cluster_std=1.5, random_state=4)
    X = X.astype(np.float32)
    ends = np.cumsum(list(SIZES.values()))
    return dict(zip(SIZES, np.split(X, ends[:-1]), strict=True))


@pytest.fixture(scope="module")
def init(parts) -> np.ndarray:
    return np.concatenate(list(parts.values()))[[0, 100, 200]]


@pytest.fixture(scope="module")
@needs("ray", "own_cluster")
def ray_run(parts, init) -> dict[str, np.ndarray]:
    """The Ray run's centroids over all three partitions and over a and b (the SuperNodes' partitions).

    own_cluster: Flower's simulation engine ends the Ray session it ran in (its backend calls ray.shutdown), so
    this module runs with the modules that end the shared local Ray, after the others."""
    from engine.runtime import init_ray

    init_ray(num_cpus=4)
    out = {}
    for key, names, rounds in (("abc", "abc", ROUNDS), ("ab", "ab", DEPLOYED_ROUNDS)):
        km = FederatedKMeans(K, init=init, max_rounds=rounds, tol=0, secure_aggregation=True,
                             transport="ray").fit({n: parts[n] for n in names})
        out[key] = km.cluster_centers_
    return out


def test_flower_simulation_equals_the_ray_run(ray_run, parts, init):
    started = time.perf_counter()
    # Two partitions on one virtual SuperNode, one on another: virtual clients travel as one message per node.
    km = FederatedKMeans(K, init=init, max_rounds=ROUNDS, tol=0, secure_aggregation=True, transport="flower",
                         clients_per_actor=2, audit=True).fit(parts)
    np.testing.assert_allclose(km.cluster_centers_, ray_run["abc"], rtol=0, atol=1e-6)
    assert km.n_rounds_ == ROUNDS and set(km.partitions_) == set(SIZES)
    assert [r["secure"] for r in km.history_ if r["kind"] == "lloyd"] == [True] * ROUNDS
    # What the server received from each partition is its masked view, never its rows.
    ups = [m for m in km.messages_ if m["direction"] == "up" and m["kind"] == "lloyd"]
    assert len(ups) == ROUNDS * len(SIZES) and all(set(m["payload"]) == {"masked"} for m in ups)
    print(f"simulation: {time.perf_counter() - started:.1f} s")


# --- a real SuperLink and two SuperNodes -----------------------------------------------------------------


def _flower_command(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # Its own session: the SuperLink and SuperNodes start SuperExec and app processes of their own, and killing
    # the group ends them all.
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (a SuperExec child outlives its parent's SIGTERM)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _wait_for_nodes(log: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("Activated node_id=") >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{count} SuperNodes did not connect within {timeout:g} s:\n{log.read_text()[-3000:]}")


def _replies(folder: Path) -> dict[str, int]:
    """How many messages each SuperNode has answered (one ClientApp process each), from its log."""
    return {name: (folder / f"supernode-{name}.log").read_text(errors="replace").count("Start `flwr-clientapp` process")
            for name in ("a", "b")}


@pytest.fixture
def superlink(tmp_path):
    """A SuperLink (insecure, loopback) and two SuperNodes holding partitions a and b as Parquet files; yields the
    SuperLink's address. Every process is killed at the end."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    address = f"127.0.0.1:{port}"
    processes = []
    try:
        link_log = tmp_path / "superlink.log"
        processes.append(_start([_flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                 str(port)], link_log, env, tmp_path))
        for name in ("a", "b"):
            node_config = f"partition='{name}' data='{tmp_path / f'{name}.parquet'}'"
            processes.append(_start([_flower_command("flower-supernode"), "--insecure", "--superlink", address,
                                     "--port", str(free_port()), "--node-config", node_config],
                                    tmp_path / f"supernode-{name}.log", env, tmp_path))
        _wait_for_nodes(link_log, 2, timeout=120)
        yield address
    finally:
        _stop(processes)


@pytest.mark.slow
def test_superlink_and_two_supernodes_equal_the_ray_run(ray_run, parts, init, superlink, tmp_path):
    """Two runs on one SuperLink (each SuperLink start costs seconds): first with SuperNode b's file missing, which is
    one `error:` line naming that file and writes nothing; then with both files, which ends at the Ray run's
    centroids."""
    pq.write_table(pa.table({"x": vector_array(parts["a"])}), tmp_path / "a.parquet")  # b's file is missing
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "federate", "federated", "--backend", "flower", "--out", str(out), "--quiet", "--set", f"cluster.k={K}",
        "--set", "federated.partitions.by=nodes", "--set", f"federated.flower.address={superlink}",
        "--set", "federated.flower.insecure=true", "--set", "federated.flower.nodes=2"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0] == f"error: {tmp_path / 'b.parquet'}: Parquet file or folder not found", \
        result.output
    assert not out.exists()
    # One message per SuperNode: its partition's load answer (here b's error) came back with its start reply.
    assert _replies(tmp_path) == {"a": 1, "b": 1}

    pq.write_table(pa.table({"x": vector_array(parts["b"])}), tmp_path / "b.parquet")
    np.save(tmp_path / "init.npy", init)
    config = tmp_path / "flower.yaml"
    config.write_text(yaml.safe_dump({
        "name": "flower", "seed": 0, "cluster": {"k": K, "tol": 0},
        "federated": {"mode": "rounds", "max_rounds": DEPLOYED_ROUNDS, "init_points": str(tmp_path / "init.npy"),
                      "secure_aggregation": True, "partitions": {"by": "nodes"},
                      "flower": {"address": superlink, "insecure": True, "nodes": 2, "wait": 120}},
    }))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["federate", str(config), "--backend", "flower", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output + "\n" + (tmp_path / "superlink.log").read_text()[-3000:]
    np.testing.assert_allclose(np.load(out / "centroids.npy"), ray_run["ab"], rtol=0, atol=1e-6)
    summary = yaml.safe_load((out / "federated" / "summary.json").read_text())
    assert set(summary["partitions"]) == {"a", "b"} and summary["rounds"] == DEPLOYED_ROUNDS
    assert summary["secure_aggregation"] and summary["partitions_from"] == {"by": "nodes", "superlink": superlink}
    # Five more each: start (with load), the two of key agreement, the Lloyd round and the closing evaluation.
    assert _replies(tmp_path) == {"a": 6, "b": 6}
    print(f"SuperLink run: {time.perf_counter() - started:.1f} s")


def test_a_message_cannot_make_its_reader_run_code(tmp_path):
    import pickle

    from engine.errors import DataError
    from engine.federated.client import Release
    from engine.federated.flower import decode, encode
    from engine.federated.privacy import Noise

    payload = {"a": ("ok", {"sums": np.ones((2, 3)), "counts": np.arange(2), "sse": np.float64(1.5)}),
               "b": ("error", DataError("partition 'b' holds no rows")),
               "release": Release(round=3, noise=Noise(sigma_sums=1.0, count_noise="laplace", count_scale=2.0),
                                  participants=("a", "b"))}
    back = decode(encode(payload))
    np.testing.assert_array_equal(back["a"][1]["sums"], payload["a"][1]["sums"])
    assert back["release"] == payload["release"] and str(back["b"][1]) == "partition 'b' holds no rows"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(pickle.UnpicklingError, match="may not hold posix.system"):
        decode(pickle.dumps({"a": ("ok", Exploit())}))
    assert not (tmp_path / "pwned").exists()


def test_a_flower_address_nobody_answers(tmp_path):
    port = free_port()  # bound and released: nothing listens there
    out = tmp_path / "run"
    started = time.perf_counter()
    result = CliRunner().invoke(app, [
        "federate", "federated", "--backend", "flower", "--out", str(out), "--quiet",
        "--set", f"federated.flower.address=127.0.0.1:{port}", "--set", "federated.partitions.by=nodes",
        "--set", "federated.flower.connect_timeout=2"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"127.0.0.1:{port}" in lines[0], result.output
    assert "no SuperLink answers" in lines[0]
    assert not out.exists()
    assert time.perf_counter() - started < 10


def test_flower_settings_are_checked(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["federate", "federated", "--backend", "flower", "--out", str(tmp_path / "r"), "--quiet",
                              "--set", "federated.flower.address=127.0.0.1:9093"])
    assert bad.exit_code == 2 and "federated.partitions.by should be nodes" in bad.output, bad.output
    bad = runner.invoke(app, ["federate", "federated", "--backend", "flower", "--out", str(tmp_path / "r"), "--quiet",
                              "--set", "federated.flower.address=nowhere", "--set", "federated.partitions.by=nodes"])
    assert bad.exit_code == 2 and "federated.flower.address='nowhere' should be host:port" in bad.output, bad.output
    bad = runner.invoke(app, ["federate", "federated", "--out", str(tmp_path / "r"), "--quiet",
                              "--set", "federated.partitions.by=nodes"])
    assert bad.exit_code == 2 and "partitions.by=nodes needs federated.backend=flower" in bad.output, bad.output
    assert not (tmp_path / "r").exists()


def test_a_clientapp_process_imports_only_the_client_side():
    """A SuperNode starts a fresh process for every message: what its ClientApp imports is paid per message. The
    client side needs torch only for the Lloyd statistics of a round (imported there: ~1.5 s of every message that
    only queries or sets up), not scikit-learn's estimators or the server (engine.cluster and engine.federated
    import their names on first use)."""
    code = ("import sys; import engine.federated.flower_app; "
            "print(sorted(m for m in ('sklearn', 'engine.federated.server', 'engine.cluster._kmeans', 'ray', 'torch') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
