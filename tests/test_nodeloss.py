"""A ray.cluster_utils.Cluster (a head without CPUs + 2 workers): a worker node lost mid-stage (while embedding and
clustering, its raylet and workers SIGKILLed, as a crashed machine goes: nothing tells the GCS; while training,
drained), and the stage finishes on the nodes left with nothing lost (every id embedded exactly once, the sharded
k-means ends where a fit without the failure ends, training restarts from its last checkpoint and runs every epoch);
and a run into an s3:// run directory on nodes that share no file system with the driver."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cluster_nodes import remove_node, shutdown_cluster
from markers import needs
from namespaces import driver_alone
from s3_server import s3_server
from typer.testing import CliRunner
from waiting import wait_for

from engine import storage
from engine.cli import app
from engine.cluster import ShardedKMeans
from engine.config import config_from_dict, load_config
from engine.data import open_source, read_dataset, read_manifest, read_table
from engine.data.describe import describe
from engine.data.schema import Z, vector_array
from engine.embed import embed_dataset
from engine.errors import CheckpointError
from engine.models import build_model
from engine.train import load_checkpoint, save_checkpoint, train_encoder

pytestmark = pytest.mark.slow

# The head has no CPU, so every actor and task runs on a worker node, and removing one always takes work with it.
WORKER = {"num_cpus": 2}
# Logical CPUs (more than the machine has): either node alone holds both 1-CPU training workers and a CPU for Ray
# Data's ingest tasks, so that the workers can restart on the node left.
TRAINING_NODE = {"num_cpus": 3}


@pytest.fixture(scope="module")
@needs("own_cluster")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # conftest's `ray_local` starts the shared local Ray again for later modules
    # The GCS declares a node that stopped answering dead after 8 missed health checks 1 s apart (Ray's default: 5,
    # 3 s apart): an abruptly lost node (`remove_node(..., abrupt=True)`) costs its test ~8 s of waiting, not 15,
    # still long enough for a few bounded retries of a call to its actors to be spent (with 3 s, not always).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_period_ms": 1000, "health_check_failure_threshold": 8}})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    shutdown_cluster(c)


@pytest.fixture
def two_workers(cluster):
    """Two live worker nodes, whatever an earlier test removed."""
    return _two_workers(cluster, WORKER)


@pytest.fixture
def two_training_nodes(cluster):
    """Two live worker nodes of TRAINING_NODE's size."""
    return _two_workers(cluster, TRAINING_NODE)


def _two_workers(cluster, node_args: dict):
    """Two live worker nodes with at least `node_args`' CPUs: smaller ones (an earlier test's) are replaced."""
    import ray

    cpus = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]}
    for node in list(cluster.worker_nodes):
        if cpus.get(node.node_id, 0) < node_args["num_cpus"]:
            remove_node(cluster, node)
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    return cluster


def _nodes_of_actors(cluster, class_part: str) -> list:
    """The worker nodes of the live actors whose class name contains `class_part`, from the GCS's actor table."""
    from ray._private.state import actors

    nodes = {a["Address"]["NodeID"] for a in actors().values()
             if a["State"] == "ALIVE" and class_part in a["ActorClassName"]}
    return [n for n in cluster.worker_nodes if n.node_id in nodes]


def _node_of_an_actor(cluster, class_part: str):
    """The worker node of a live actor whose class name contains `class_part`; None when there is none."""
    return next(iter(_nodes_of_actors(cluster, class_part)), None)


def test_node_removed_while_embedding_every_id_written_once(two_workers, tmp_path):
    cluster = two_workers
    rows = 1000
    cfg = config_from_dict({"data": {"source": "blobs", "n_samples": rows, "n_features": 6, "centers": 3,
                                     "rows_per_shard": 50, "normalize": "standard"},
                            "model": {"hidden": [8], "latent_dim": 3}})
    info = describe(read_dataset(open_source(cfg.data)), normalize=cfg.data.normalize)
    torch.manual_seed(0)
    model = build_model(in_dim=info.dim, **cfg.model.pretrain_options())
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, shift=info.shift, scale=info.scale, epoch=0, history=[])
    marker = tmp_path / "node-removed"

    def gate(batch: pa.Table, from_id: int) -> pa.Table:
        # Holds back the rows from `from_id` on until the node is gone, so part of the stream runs after it.
        # Nested, so Ray pickles it by value: the workers cannot import this test module.
        if batch.num_rows and batch.column("id").to_numpy().max() >= from_id:
            deadline = time.monotonic() + 120
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return batch

    ds = read_dataset(open_source(cfg.data)).map_batches(
        gate, fn_kwargs={"from_id": rows // 2}, batch_format="pyarrow", batch_size=None)
    done = tmp_path / ".embeddings.partial" / "_done"
    removed: list[int] = []

    def remove_a_node():
        wait_for(lambda: done.is_dir() and len(list(done.glob("*.json"))) >= 5, 120, "the first shards")
        node = wait_for(lambda: _node_of_an_actor(cluster, "Embedder"), 30, "an embedding actor on a worker")
        removed.append(len(list(done.glob("*.json"))))
        remove_node(cluster, node, abrupt=True)
        marker.touch()

    remover = threading.Thread(target=remove_a_node, daemon=True)
    remover.start()
    out = tmp_path / "embeddings"
    manifest = embed_dataset(ds, tmp_path / "checkpoint.pt", out, dim=info.dim, expected_rows=rows, config_hash="h",
                             batch_size=10, concurrency=2)
    remover.join(timeout=5)
    # The node went while at most half of the 100 shards were written; the rest were written after it.
    assert removed and removed[0] <= 50 and len(manifest["files"]) == 100
    assert len(cluster.worker_nodes) == 1
    ids = np.sort(read_table(out, stage="embed", columns=["id"]).column("id").to_numpy())
    np.testing.assert_array_equal(ids, np.arange(rows))
    assert manifest["rows"] == rows and not (tmp_path / ".embeddings.partial").exists()


def _write_shards(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        z = rng.normal(size=(300, 4)).astype(np.float32) + 3 * (i % 2)
        path = folder / f"shard-{i}.parquet"
        pq.write_table(pa.table({"id": np.arange(300 * i, 300 * (i + 1)), Z: vector_array(z)}), path)
        paths.append(str(path))
    return paths


def test_node_removed_during_sharded_kmeans_its_shards_are_reloaded(two_workers, tmp_path, caplog):
    cluster = two_workers
    shards = _write_shards(tmp_path)
    settings = dict(n_clusters=5, max_iter=8, tol=0, seed=1, num_actors=2, init="k-means||")
    reference = ShardedKMeans(**settings).fit(shards)
    removed_after: list[int] = []

    def remove_a_node(record):
        # Called by the driver between two Lloyd iterations: the next one finds an actor gone with its node.
        if record["iter"] == 3:
            node = _node_of_an_actor(cluster, "ShardActor")
            assert node is not None, "no shard actor on a worker node"
            remove_node(cluster, node, abrupt=True)
            removed_after.append(record["iter"])

    seen = []
    with caplog.at_level(logging.WARNING, logger="engine.cluster._shard_actors"):
        fitted = ShardedKMeans(**settings, callback=lambda r: (seen.append(r["iter"]), remove_a_node(r))).fit(shards)
    assert removed_after == [3] and len(cluster.worker_nodes) == 1
    # One redo: the node is lost abruptly, and its actor is replaced once the GCS has declared it dead, on the node
    # left (replaced at once, while the GCS still counted the node alive, it could be placed there and die again).
    assert "iteration 4: 1 shard actor(s) died" in caplog.text and caplog.text.count("shard actor(s) died") == 1
    assert seen == list(range(1, 9)) and fitted.n_samples_ == 1200
    np.testing.assert_allclose(fitted.cluster_centers_, reference.cluster_centers_, rtol=1e-5, atol=1e-6)
    assert fitted.inertia_ == pytest.approx(reference.inertia_, rel=1e-6)


def test_node_removed_while_training_the_workers_restart_on_the_node_left(two_training_nodes, tmp_path):
    cluster = two_training_nodes
    rows, epochs = 400, 8
    cfg = config_from_dict({"data": {"source": "blobs", "n_samples": rows, "n_features": 6, "centers": 3,
                                     "rows_per_shard": 50, "normalize": "standard"},
                            "model": {"hidden": [16], "latent_dim": 3},
                            "train": {"epochs": epochs, "batch_size": 64, "num_workers": 2, "checkpoint_every": 2,
                                      "max_failures": 2, "placement_strategy": "SPREAD"}})
    info = describe(read_dataset(open_source(cfg.data)), normalize=cfg.data.normalize)
    held, released = tmp_path / "epoch-3-seen", tmp_path / "node-removed"

    def gate(batch: pa.Table) -> pa.Table:
        # Once the driver has seen epoch 3, no row is read until the node is gone: training cannot end before the
        # loss. Nested, so Ray pickles it by value: the workers cannot import this test module.
        if held.exists():
            deadline = time.monotonic() + 120
            while not released.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return batch

    # Not materialized: every epoch, and the restarted workers, read the rows again through the gate.
    ds = read_dataset(open_source(cfg.data)).map_batches(gate, batch_format="pyarrow", batch_size=None)
    seen: list[int] = []

    def on_epoch(record: dict) -> None:
        seen.append(record["epoch"])
        if record["epoch"] == 3:
            held.touch()

    snapshot = tmp_path / "train" / "checkpoint_manager_snapshot.json"
    removed: dict = {}

    def remove_a_node():
        wait_for(held.exists, 600, "epoch 3")
        # Ray Train has recorded a checkpoint (of epoch 2 or later), so the workers restart from it, not afresh.
        wait_for(lambda: snapshot.is_file() and '"checkpoint_dir_name"' in snapshot.read_text(), 60,
                 "the first checkpoint")
        nodes = wait_for(lambda: _nodes_of_actors(cluster, "RayTrainWorker"), 30, "the training workers")
        removed.update(after_epoch=max(seen), nodes=len(nodes))
        remove_node(cluster, nodes[0])  # drained: Ray Train restarts as well after a crash (tried), 10 s later
        released.touch()

    remover = threading.Thread(target=remove_a_node, daemon=True)
    remover.start()
    model_dir = train_encoder(ds.select_columns(["x"]), in_dim=info.dim, shift=info.shift, scale=info.scale,
                              model=cfg.model.pretrain_options(), train=cfg.train, seed=cfg.seed, run_dir=tmp_path,
                              config_hash=cfg.hash(), on_epoch=on_epoch)
    remover.join(timeout=5)
    # A training worker on each node (SPREAD), and one of the nodes removed after epoch 3, before the last epoch.
    assert removed and removed["nodes"] == 2 and 3 <= removed["after_epoch"] < epochs, removed
    assert len(cluster.worker_nodes) == 1
    state = load_checkpoint(model_dir)
    # The second attempt started from a checkpoint (epoch 2 or later), and every epoch read every row once.
    starts = read_manifest(model_dir, stage="train")["starts"]
    assert starts == state["starts"] and len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < epochs, starts
    assert [h["epoch"] for h in state["history"]] == list(range(1, epochs + 1))
    assert all(h["rows"] == rows for h in state["history"]), state["history"]
    # The driver saw the restarted workers' epochs too: the progress queue outlived the node.
    assert seen[-(epochs - starts[1]):] == list(range(starts[1] + 1, epochs + 1)), seen

    # A resume (`--resume` after the driver died) of these checkpoints with another model is refused before any
    # worker starts, naming what differs (from an object store: the s3 test below).
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: a checkpoint of another model \(latent_dim=3 there, "
                                              r"4 now\); set them back, or start a fresh run instead of resuming"):
        train_encoder(ds.select_columns(["x"]), in_dim=info.dim, shift=info.shift, scale=info.scale, train=cfg.train,
                      seed=cfg.seed, run_dir=tmp_path, config_hash=cfg.hash(), resume=True,
                      model={**cfg.model.pretrain_options(), "latent_dim": 4})


ROWS = 600
TINY = [
    "data.source=blobs", f"data.n_samples={ROWS}", "data.n_features=6", "data.centers=3", "data.rows_per_shard=100",
    "data.normalize=standard", "model.hidden=[16]", "model.latent_dim=3", "train.epochs=1", "train.batch_size=64",
    "train.num_workers=2", "embed.concurrency=2", "embed.batch_size=50", "cluster.k=3", "cluster.n_init=1",
    "cluster.method=kmeans", "cluster.manifold=none", "report.enabled=false",
]


# The pipeline job, then (as if the run had died while embedding: its embeddings' manifest deleted) the job resumed,
# in one driver process (a second one cost ~8 s more of the suite). The staging folder the resumed run starts from is
# empty but for driver_alone's own file: nothing of the first run's is left there for it, as on another machine.
# (Stage jobs: test_jobs.py, test_stage_jobs.py; shard actors on worker nodes:
# test_node_removed_during_sharded_kmeans_its_shards_are_reloaded.)
PIPELINE_THEN_RESUMED = """
import sys
from pathlib import Path
from engine import storage
from jobs import pipeline
staging, uri, *first = sys.argv[1:]
assert pipeline.main(first) == 0
storage.delete(storage.join(uri, "embeddings", storage.MANIFEST))
assert [p.name for p in Path(staging).iterdir() if p.name != "driver-only"] == [], list(Path(staging).iterdir())
assert pipeline.main(["--resume", uri]) == 0
"""


def test_s3_run_on_nodes_that_do_not_see_the_drivers_staging_folder(two_workers, tmp_path):
    """The pipeline and a resumed run into an s3:// run directory with ray.shared_storage false, the training
    workers, embedding actors and assignment tasks on two worker nodes, none of which can read the driver's staging
    folder (ray.staging_dir) or write into it; then `dce assign` of that run, and its training resumed from Ray
    Train's checkpoints in the store."""
    staging = tmp_path / "staging"
    staging.mkdir()
    with s3_server() as s3:
        uri = s3.uri("runs/nodes")
        sets = [a for s in [*TINY, f"ray.staging_dir={staging}"] for a in ("--set", s)]
        proc = driver_alone(two_workers.address, staging,
                            ["-c", PIPELINE_THEN_RESUMED, str(staging), uri, "--config", "digits", *sets, "--out", uri])
        first, resumed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')]
        assert first["metrics"]["ari"] > 0.5, first  # three blobs: rows matched to the wrong ids would score ~0
        assert "train" in first["seconds"] and "train" not in resumed["seconds"], resumed
        assert "embed" in resumed["seconds"] and resumed["metrics"]["ari"] > 0.5, resumed
        names = storage.files(uri)
        for name in ("config.yaml", "run.json", "centroids.npy", "cluster.json", "metrics.json", "model/checkpoint.pt",
                     "model/_manifest.json", "embeddings/_manifest.json", "assignments/_manifest.json"):
            assert name in names, (name, names)
        # Ray Train's own state went to the store directly, for a resume from any machine.
        assert any(n.startswith("train/checkpoint_") and n.endswith("/checkpoint.pt") for n in names), names
        for folder, stage in (("embeddings", "embed"), ("assignments", "assign")):
            ids = read_table(storage.join(uri, folder), stage=stage, columns=["id"]).column("id").to_numpy()
            np.testing.assert_array_equal(np.sort(ids), np.arange(ROWS))  # every id exactly once

        # A resume of the training with another model is refused before any worker starts, naming what differs.
        cfg = load_config("digits", TINY)
        ds = read_dataset(open_source(cfg.data)).materialize()
        info = describe(ds, normalize=cfg.data.normalize)
        common = dict(in_dim=info.dim, shift=info.shift, scale=info.scale, seed=cfg.seed, run_dir=tmp_path / "b",
                      config_hash=cfg.hash(), train_storage=uri, resume=True)
        with pytest.raises(CheckpointError, match=r"s3://.*/train/checkpoint_[^/]*/checkpoint.pt\?.*: a checkpoint of "
                                                  r"another model \(latent_dim=3 there, 4 now\)"):
            train_encoder(ds.select_columns(["x"]), model={**cfg.model.pretrain_options(), "latent_dim": 4},
                          train=cfg.train, **common)

        # `dce assign` reads the run from the store; its actors get the model through Ray's object store.
        rows = sorted(ds.take_all(), key=lambda r: r["id"])
        np.save(tmp_path / "new.npy", np.stack([r["x"] for r in rows]).astype(np.float32))  # ids 0..ROWS-1
        out = s3.uri("assigned")
        result = CliRunner().invoke(app, ["assign", uri, "--input", str(tmp_path / "new.npy"), "--out", out, "--quiet"])
        assert result.exit_code == 0, result.output
        new = read_table(out, stage="assign").sort_by("id")
        run = read_table(storage.join(uri, "assignments"), stage="assign").sort_by("id")
        assert new.column("id").equals(run.column("id")) and new.column("cluster").equals(run.column("cluster"))

        # A resume of the training from another machine (this process: no staging folder of the run's) reads Ray
        # Train's checkpoints from the store and continues from the latest one, on the worker nodes: one more epoch.
        model_dir = train_encoder(ds.select_columns(["x"]), model=cfg.model.pretrain_options(),
                                  train=cfg.train.model_copy(update={"epochs": 2}), **common)
        state = load_checkpoint(model_dir)
        assert state["starts"] == [0, 1] and [h["epoch"] for h in state["history"]] == [1, 2], state["starts"]
        assert not (tmp_path / "b" / "train").exists()  # Ray Train's state stayed in the store
