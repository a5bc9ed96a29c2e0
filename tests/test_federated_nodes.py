"""Federated clients pinned to their partitions' nodes: a 3-node ray.cluster_utils.Cluster, one partition each."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cluster_nodes import shutdown_cluster
from markers import needs
from sklearn.datasets import make_blobs

from engine.cluster import KMeans
from engine.data.schema import vector_array
from engine.federated import FederatedKMeans

K = 3
SIZES = {"a": 90, "b": 110, "c": 70}


@pytest.fixture(scope="module")
@needs("own_cluster")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    # This module needs its own multi-node cluster; conftest's `ray_local` starts the shared one again later.
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"partition:a": 1}})
    c.add_node(num_cpus=1, resources={"partition:b": 1})
    c.add_node(num_cpus=1, resources={"partition:c": 1})
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    shutdown_cluster(c)


def test_each_client_runs_on_its_partitions_node_and_only_aggregates_reach_the_server(cluster, tmp_path):
    import ray

    X, _ = make_blobs(n_samples=sum(SIZES.values()), n_features=2, centers=K, cluster_std=0.5, random_state=1)
    X = X.astype(np.float32)
    paths, start = {}, 0
    for name, rows in SIZES.items():
        # Parquet files that each client reads itself, where it runs: rows never travel through the driver.
        paths[name] = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"x": vector_array(X[start:start + rows])}), paths[name])
        start += rows
    init = X[[0, 100, 200]]
    km = FederatedKMeans(K, init=init, max_rounds=5, tol=0, placement="resource", audit=True).fit(paths)

    node_of = {res: node["NodeID"] for node in ray.nodes() if node["Alive"] for res in node["Resources"]
               if res.startswith("partition:")}
    assert {name: info["node_id"] for name, info in km.partitions_.items()} == {
        name: node_of[f"partition:{name}"] for name in SIZES}
    assert len({info["node_id"] for info in km.partitions_.values()}) == 3
    # The server's inputs: every array it received has k rows (stats) or is a count vector, never n rows.
    received = [m for m in km.messages_ if m["direction"] == "up"]
    assert {m["kind"] for m in received} == {"load", "lloyd", "evaluate"}
    for m in received:
        for value in m["payload"].values():
            if isinstance(value, np.ndarray):
                assert value.shape[0] == K, (m["partition"], value.shape)
    ref = KMeans(K, init=init, max_iter=5, tol=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
