"""The pipeline on a 3-node ray.cluster_utils.Cluster: training workers and embedding actors spread over the nodes
(read from Ray's state API), and a local run directory refused there unless declared shared."""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cluster_nodes import shutdown_cluster
from markers import needs
from waiting import wait_for

from engine.config import load_config
from engine.errors import ConfigError
from engine.pipeline import run_pipeline
from jobs import train_encoder as train_job

pytestmark = pytest.mark.slow

# One scheduling slot per node: two 1-CPU training workers (or embedding actors) cannot share a node.
NODES = {"head": {"num_cpus": 1}, "worker_a": {"num_cpus": 1}, "worker_b": {"num_cpus": 1}}
ROWS = 600
TINY = [
    "data.source=blobs", f"data.n_samples={ROWS}", "data.n_features=6", "data.centers=3",
    "data.rows_per_shard=50", "data.normalize=standard", "model.hidden=[16]", "model.latent_dim=3",
    "train.epochs=1", "train.batch_size=64", "train.num_workers=2", "embed.concurrency=2", "embed.batch_size=25",
    "cluster.k=3", "cluster.n_init=1", "cluster.method=kmeans", "cluster.manifold=none", "report.enabled=false",
]


@pytest.fixture(scope="module")
@needs("own_cluster")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # This module needs its own multi-node cluster; conftest's `ray_local` starts the shared one again later.
    if ray.is_initialized():
        ray.shutdown()
    # Each node carries a custom resource named after it, so a node id from the state API maps to a name.
    head, *workers = NODES
    c = Cluster(initialize_head=True, head_node_args={**NODES[head], "resources": {head: 1}})
    for name in workers:
        c.add_node(**NODES[name], resources={name: 1})
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    shutdown_cluster(c)


def node_names() -> dict[str, str]:
    import ray

    return {node["NodeID"]: name for node in ray.nodes() if node["Alive"] for name in NODES
            if name in node["Resources"]}


def test_local_run_dir_is_refused_on_several_nodes(cluster, tmp_path, capsys):
    cfg = load_config("digits", TINY)
    with pytest.raises(ConfigError, match=r"run directory .*run \(--out, RUN_DIR\): a local path, but the Ray cluster "
                                          r"has 3 nodes.*"
                                          r"ray.shared_storage=true\) or an object store URI"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    assert train_job.main(["--config", "digits", *[a for s in TINY for a in ("--set", s)],
                           "--out", str(tmp_path / "run")]) == 2
    assert "a local path, but the Ray cluster has 3 nodes" in capsys.readouterr().err


def test_pipeline_spreads_training_workers_and_embedding_actors_over_the_nodes(cluster, tmp_path):
    from ray.util.state import list_actors

    # On this machine the three nodes share its file system: the explicit opt-in says so.
    cfg = load_config("digits", [*TINY, "ray.shared_storage=true"])
    result = run_pipeline(cfg, tmp_path / "run")
    assert result.metrics["ari"] > 0.9, result.metrics
    assert json.loads((tmp_path / "run" / "embeddings" / "_manifest.json").read_text())["rows"] == ROWS
    assert np.load(tmp_path / "run" / "centroids.npy").shape == (3, 3)

    names = node_names()
    assert sorted(names.values()) == sorted(NODES)
    actors = list_actors(filters=[("state", "=", "DEAD")], limit=1000, raise_on_missing_output=False)
    train_nodes = [names[a.node_id] for a in actors if a.class_name == "RayTrainWorker"]
    embed_nodes = [names[a.node_id] for a in actors if a.class_name == "MapWorker(MapBatches(Embedder))"]
    assert len(train_nodes) == 2 and len(set(train_nodes)) == 2, train_nodes
    assert len(embed_nodes) == 2 and len(set(embed_nodes)) == 2, embed_nodes


def _curation_task_nodes(names: dict[str, str], seen: set[str], count: int) -> list[str]:
    """The nodes (by name) of the `count` dedup tasks that read the input or touch the working folder, finished
    since `seen` (task ids)."""
    return _task_nodes(names, seen, ("_validate_piece", "_assign_piece", "process_group"), count)


def _task_nodes(names: dict[str, str], seen: set[str], functions: tuple[str, ...], count: int) -> list[str]:
    """The nodes (by name) of the `count` tasks of `functions` finished since `seen` (task ids); their events reach
    the state API a moment after they end."""
    from ray.util.state import list_tasks

    found: list = []

    def nodes() -> list[str] | None:
        found[:] = [t for name in functions
                    for t in list_tasks(filters=[("name", "=", name), ("state", "=", "FINISHED")], limit=10000,
                                        raise_on_missing_output=False) if t.task_id not in seen]
        return [names[t.node_id] for t in found] if len(found) >= count else None

    try:
        return wait_for(nodes, 30, f"{count} tasks' events", poll=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; found {collections.Counter(t.name for t in found)}") from None


def _task_ids() -> set[str]:
    from ray.util.state import list_tasks

    return {t.task_id for t in list_tasks(limit=10000, raise_on_missing_output=False)}


@contextlib.contextmanager
def _blind_node(address: str, folders: list[Path]) -> Iterator[str]:
    """A node joined to the cluster at `address` from a mount namespace of its own, where each of `folders` is an
    empty tmpfs: its workers cannot see what the driver and the other nodes have there. Yields its node id."""
    import ray

    mounts = "".join(f'mount -t tmpfs tmpfs "{f}" && ' for f in folders)
    proc = subprocess.Popen(["unshare", "-Urm", "sh", "-c", mounts + 'exec "$0" start --address="$1" --num-cpus=1 '
                             '--resources=\'{"blind": 1}\' --block', str(Path(sys.executable).parent / "ray"),
                             address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        node = wait_for(lambda: next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "blind" in n["Resources"]),
                                     None), 60, "the blind node")
        yield node
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        wait_for(lambda: not any(n["Alive"] and "blind" in n["Resources"] for n in ray.nodes()), 60,
                 "the blind node gone")


def test_curation_spreads_where_every_node_sees_its_files_and_keeps_to_one_node_that_does_otherwise(cluster,
                                                                                                   tmp_path):
    """Curation's tasks read the input and write and read the working folder as local files: on nodes that all see
    both, they spread; where a node does not see one of them, they all run on the driver's node, with the same
    result; where no node sees the driver's folder, the run moves to a node (an object-store --out) or is refused
    (a local one)."""
    from namespaces import driver_alone, unshare_works
    from s3_server import s3_server
    from test_curate import planted, result, write

    from engine import storage
    from engine.curate import dedup, sample

    ids, x = planted(n=1600, d=16, copies=120)
    emb = write(tmp_path / "emb", ids, x, files=4, row_group=200)  # 8 pieces
    names = node_names()
    before = _task_ids()
    shared = dedup(emb, tmp_path / "shared", k=6)
    spread = _curation_task_nodes(names, before, 16 + shared["groups"])
    assert shared["nodes_left_out"] == [] and len(set(spread)) == 3, spread
    assert not list(tmp_path.glob(".*.partial"))
    if not unshare_works():
        pytest.skip("needs mount namespaces (unshare -Urm), which this machine refuses")

    # A fourth node that sees neither `hidden_state` nor `hidden_input`: once with the working folder there
    # (--state-dir), once with the input there.
    hidden_state, hidden_input = tmp_path / "hidden_state", tmp_path / "hidden_input"
    hidden_state.mkdir()
    shutil.copytree(emb, hidden_input / "emb")
    runs = {}
    with _blind_node(cluster.address, [hidden_state, hidden_input]) as blind:
        for name, source, state_dir in (("state", emb, hidden_state), ("input", hidden_input / "emb", None)):
            before = _task_ids()
            runs[name] = dedup(source, tmp_path / f"apart-{name}", k=6, state_dir=state_dir)
            # validate, assign and group tasks (k-means' fit reads the object store only)
            pinned = _curation_task_nodes({**names, blind: "blind"}, before, 16 + runs[name]["groups"])
            assert set(pinned) == {"head"} and runs[name]["nodes_left_out"] == [blind], (name, pinned, runs[name])
            # Planned for the head's one CPU (2 groups a CPU), not the cluster's four (k = 6: 6 groups, as shared)
            assert runs[name]["groups"] == 2 and shared["groups"] == 6, (runs[name]["groups"], shared["groups"])
            for got, want in zip(result(tmp_path / f"apart-{name}"), result(tmp_path / "shared"), strict=True):
                np.testing.assert_equal(got, want)
        # Balanced sampling reads the input in its tasks too (and keeps no working folder).
        before = _task_ids()
        drawn = sample(hidden_input / "emb", tmp_path / "sample-apart", n=100, levels=2, k=[12, 3], resample_steps=2)
        assert set(_task_nodes({**names, blind: "blind"}, before, ("_validate_piece", "_piece_candidates"), 16)) == \
            {"head"} and drawn["nodes_left_out"] == [blind], drawn
    assert list(hidden_state.iterdir()) == []  # the state removed when done
    spread = sample(emb, tmp_path / "sample-shared", n=100, levels=2, k=[12, 3], resample_steps=2)
    assert spread["nodes_left_out"] == []
    for name in ("sampled", "hierarchy/level-1.parquet", "hierarchy/level-2.parquet"):
        assert pq.read_table(tmp_path / "sample-apart" / name).equals(pq.read_table(tmp_path / "sample-shared" / name))

    # A driver whose own files no node sees (a mount namespace of its own, its temp folder there): into an object
    # store, the run moves to a task on a node that sees the input, with the same result; into a folder of its own,
    # it is refused with one error line, nothing written.
    staging = tmp_path / "staging"
    staging.mkdir()
    with s3_server() as s3:
        out = s3.uri("dedup")
        proc = driver_alone(cluster.address, staging, ["jobs.dedup", str(emb), "--out", out, "--k", "6"],
                            env={"TMPDIR": str(staging)})
        moved = json.loads(proc.stdout.splitlines()[-1])
        assert "{'stage': 'assign'" in proc.stdout, proc.stdout[-2000:]  # its progress came back
        local = tmp_path / "from-store"
        for name in storage.files(out):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(storage.read_bytes(storage.join(out, name)))
    # The task's temp folder is the machine's /tmp, which every node here shares: its tasks spread.
    assert moved["nodes_left_out"] == [] and moved["coordinator_node"] in names, moved
    for got, want in zip(result(local), result(tmp_path / "shared"), strict=True):
        np.testing.assert_equal(got, want)
    proc = driver_alone(cluster.address, staging, ["jobs.dedup", str(emb), "--out", str(staging / "out"), "--k", "6"],
                        check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no Ray node with a CPU sees both" in last, proc.stderr[-3000:]
