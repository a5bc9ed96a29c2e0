"""The pipeline on a 3-node ray.cluster_utils.Cluster: training workers and embedding actors spread over the nodes
(read from Ray's state API), and a local run directory refused there unless declared shared."""

from __future__ import annotations

import json

import numpy as np
import pytest
from markers import needs

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
    c.shutdown()


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
