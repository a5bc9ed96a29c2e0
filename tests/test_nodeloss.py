"""A worker node removed mid-stage from a ray.cluster_utils.Cluster (head + 2 workers): the stage finishes on the
nodes left, with nothing lost: every id embedded exactly once, and the sharded k-means ends where a fit without the
failure ends."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from waiting import wait_for

from engine.cluster import ShardedKMeans
from engine.config import config_from_dict
from engine.data import open_source, read_dataset, read_table
from engine.data.describe import describe
from engine.data.schema import Z, vector_array
from engine.embed import embed_dataset
from engine.models import build_model
from engine.train import save_checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.own_cluster]

# The head has no CPU, so every actor and task runs on a worker node, and removing one always takes work with it.
WORKER = {"num_cpus": 2}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # conftest's `ray_local` starts the shared local Ray again for later modules
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def two_workers(cluster):
    """Two live worker nodes, whatever an earlier test removed."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    return cluster


def _node_of_an_actor(cluster, class_part: str):
    """The worker node of a live actor whose class name contains `class_part`, from the GCS's actor table."""
    from ray._private.state import actors

    nodes = {a["Address"]["NodeID"] for a in actors().values()
             if a["State"] == "ALIVE" and class_part in a["ActorClassName"]}
    return next((n for n in cluster.worker_nodes if n.node_id in nodes), None)


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
        cluster.remove_node(node)
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
            cluster.remove_node(node)
            removed_after.append(record["iter"])

    seen = []
    with caplog.at_level(logging.WARNING, logger="engine.cluster._sharded"):
        fitted = ShardedKMeans(**settings, callback=lambda r: (seen.append(r["iter"]), remove_a_node(r))).fit(shards)
    assert removed_after == [3] and len(cluster.worker_nodes) == 1
    assert "iteration 4: 1 shard actor(s) died" in caplog.text
    assert seen == list(range(1, 9)) and fitted.n_samples_ == 1200
    np.testing.assert_allclose(fitted.cluster_centers_, reference.cluster_centers_, rtol=1e-5, atol=1e-6)
    assert fitted.inertia_ == pytest.approx(reference.inertia_, rel=1e-6)
