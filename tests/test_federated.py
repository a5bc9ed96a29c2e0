"""Federated k-means: partitions, privacy and secure aggregation in-process, then FederatedKMeans on a real Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import make_blobs
from typer.testing import CliRunner

from engine.cluster import KMeans, partial_stats
from engine.config import PrivacyConfig, config_from_dict, load_config
from engine.data.schema import vector_array
from engine.errors import ConfigError, DataError
from engine.federated import (
    Accountant,
    FederatedClient,
    FederatedKMeans,
    ParquetPartition,
    QuorumError,
    Release,
    partitions_from_column,
    partitions_from_folders,
    secure,
    split_indices,
)
from engine.federated.run import build_partitions

K = 4
K_LOCAL = 2
D = 3
SIZES = {"a": 150, "b": 170, "c": 130}  # never K, K_LOCAL or a masked vector's length
MASKED_LEN = K * D + 2 * K + 1  # sums, counts, per-cluster SSE, SSE


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs with one OpenMP / torch thread (see conftest)."""


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=sum(SIZES.values()), n_features=D, centers=K, cluster_std=0.6, random_state=3)
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def parts(data) -> dict[str, np.ndarray]:
    X, _ = data
    cuts = np.cumsum(list(SIZES.values()))[:-1]
    return dict(zip(SIZES, np.split(X, cuts), strict=True))


@pytest.fixture(scope="module")
def init(data) -> np.ndarray:
    X, y = data
    return np.stack([X[np.flatnonzero(y == c)[0]] for c in range(K)])  # one row of each blob


def arrays_in(payload) -> list[np.ndarray]:
    """Every numpy array inside a message (dicts, tuples, lists, dataclasses)."""
    if isinstance(payload, np.ndarray):
        return [payload]
    if isinstance(payload, dict):
        return [a for v in payload.values() for a in arrays_in(v)]
    if isinstance(payload, list | tuple):
        return [a for v in payload for a in arrays_in(v)]
    if hasattr(payload, "__dataclass_fields__"):
        return [a for f in payload.__dataclass_fields__ for a in arrays_in(getattr(payload, f))]
    return []


def assert_only_aggregates(messages: list[dict], rows: set[int]) -> None:
    """What the server received holds no row-level array: every array has k or k' rows (or is one masked
    vector of the stats), never a partition's row count."""
    received = [m for m in messages if m["direction"] == "up"]
    assert received
    for m in received:
        for arr in arrays_in(m["payload"]):
            assert arr.shape[0] in {K, K_LOCAL, MASKED_LEN}, (m["kind"], m["partition"], arr.shape)
            assert arr.shape[0] not in rows


# --- partitions, privacy and secure aggregation, in-process ------------------------------------------


def test_simulated_splits_report_their_label_mix():
    labels = np.repeat(np.arange(5), 40)
    iid = split_indices(200, 4, seed=0)
    assert sorted(np.concatenate(list(iid.values())).tolist()) == list(range(200))
    assert [len(v) for v in iid.values()] == [50, 50, 50, 50]

    def labels_per_partition(split):
        return np.mean([len(np.unique(labels[rows])) for rows in split.values()])

    skewed = split_indices(200, 4, split="dirichlet", labels=labels, alpha=0.05, seed=0, min_rows=3)
    even = split_indices(200, 4, split="dirichlet", labels=labels, alpha=100.0, seed=0)
    assert sorted(np.concatenate(list(skewed.values())).tolist()) == list(range(200))
    assert min(len(v) for v in skewed.values()) >= 3  # topped up from the largest partition
    assert labels_per_partition(skewed) < labels_per_partition(even) == 5
    kfed = split_indices(200, 5, split="clusters", labels=labels, clusters_per_partition=2, seed=0)
    assert list(kfed) == ["p0", "p1", "p2", "p3", "p4"]
    assert all(len(np.unique(labels[rows])) == 2 for rows in kfed.values())
    assert sorted(np.concatenate(list(kfed.values())).tolist()) == list(range(200))
    with pytest.raises(ConfigError, match="hold fewer labels than the data has"):
        split_indices(200, 2, split="clusters", labels=labels, clusters_per_partition=2)
    with pytest.raises(ConfigError, match="the data has no labels"):
        split_indices(200, 2, split="dirichlet")


def test_simulated_partitions_from_a_config():
    cfg = load_config("federated", ["data.n_samples=400", "federated.partitions.n_partitions=4",
                                    "federated.partitions.server_rows=40"])
    built = build_partitions(cfg)
    assert list(built.partitions) == ["p0", "p1", "p2", "p3"]
    assert sum(r["rows"] for r in built.report.values()) == 360 == len(built.pooled) == len(built.labels)
    assert built.server_points.shape == (40, 16)
    assert all(sum(r["labels"].values()) == r["rows"] for r in built.report.values())
    with pytest.raises(ConfigError, match="federated.partitions.server_rows=400"):
        build_partitions(load_config("federated", ["data.n_samples=400", "federated.partitions.server_rows=400"]))
    with pytest.raises(ConfigError, match="data.normalize=max needs statistics of the pooled data"):
        build_partitions(config_from_dict({"data": {"source": "parquet", "path": "x", "normalize": "max"},
                                           "federated": {"partitions": {"by": "folders"}}}))


def test_pipeline_embeddings_as_input(tmp_path, data):
    from engine.data.folders import staged_folder, write_manifest

    X, y = data
    folder = tmp_path / "run" / "embeddings"
    with staged_folder(folder) as tmp:
        pq.write_table(pa.table({"id": pa.array(np.arange(len(X))), "z": vector_array(X), "label": pa.array(y)}),
                       tmp / "part-0.parquet")
        write_manifest(tmp, stage="embed", config_hash="test", rows=len(X), files=["part-0.parquet"])
    cfg = load_config("federated_embeddings", [f"data.path={folder}", "cluster.k=4",
                                               "federated.partitions.n_partitions=3"])
    built = build_partitions(cfg)
    assert len(built.pooled) == len(X) and built.pooled.shape[1] == D
    assert sorted(built.pooled.tolist()) == sorted(X.tolist())
    assert sum(sum(r["labels"].values()) for r in built.report.values()) == len(X)


def test_job_entry_point_reports_bad_input(capsys):
    from jobs.federated import main

    assert main(["--config", "federated", "--set", "federated.privacy.epsilon=0"]) == 2
    assert "'federated.privacy.epsilon': Input should be greater than 0" in capsys.readouterr().err


def test_partitions_from_folders_and_columns_are_read_by_their_clients(tmp_path, parts):
    for i, name in enumerate(("site_a", "site_b")):
        (tmp_path / "sites" / name).mkdir(parents=True)
        X = parts["a"][i * 50:(i + 1) * 50]
        pq.write_table(pa.table({"z": vector_array(X), "label": pa.array(np.arange(50) % (2 + i))}),
                       tmp_path / "sites" / name / "part-0.parquet")
    found = partitions_from_folders(str(tmp_path / "sites"))
    assert list(found) == ["site_a", "site_b"]
    info = FederatedClient("site_b", found["site_b"]).load()
    assert (info["rows"], info["dim"], info["labels"]) == (50, D, {"0": 17, "1": 17, "2": 16})
    nothing = ParquetPartition(str(tmp_path / "sites"), filter_column="label", value=99)
    assert FederatedClient("empty", nothing).load()["rows"] == 0
    with pytest.raises(DataError, match="partition 'site_a': .*part-0.parquet: no column 'x2'"):
        FederatedClient("site_a", ParquetPartition(found["site_a"].path, column="x2")).load()
    with pytest.raises(DataError, match="no subfolder holds Parquet files"):
        partitions_from_folders(str(tmp_path / "sites" / "site_a"))


def in_process_clients(parts: dict[str, np.ndarray]) -> dict[str, FederatedClient]:
    clients = {name: FederatedClient(name, X) for name, X in parts.items()}
    identities = {name: c.load()["identity"] for name, c in clients.items()}
    names = tuple(sorted(clients))
    keys = {name: c.enrol(identities, names, len(names) - 1, 0, 2) for name, c in clients.items()}
    for c in clients.values():
        c.agree_keys(keys)
    return clients


def test_secure_aggregation_masks_each_view_and_the_sum_is_exact(parts, init):
    clients = in_process_clients(parts)
    names = tuple(clients)
    clear = {n: c.lloyd(init, 1, Release(round=1)) for n, c in clients.items()}
    views = {n: c.lloyd(init, 1, Release(round=1, participants=names))["masked"] for n, c in clients.items()}
    encoded = {n: secure.encode(np.concatenate([a["sums"].ravel(), a["counts"], a["cluster_sse"], [a["sse"]]]),
                                len(names), n) for n, a in clear.items()}
    for n in names:
        assert views[n].dtype == np.uint64 and views[n].shape == (MASKED_LEN,)
        assert np.mean(views[n] != encoded[n]) > 0.9  # the server's view of each client is masked
    total_view, total_true = np.zeros(MASKED_LEN, np.uint64), np.zeros(MASKED_LEN, np.uint64)
    for n in names:
        total_view += views[n]
        total_true += encoded[n]
    assert np.array_equal(total_view, total_true)  # the masks cancel exactly, mod 2^64
    X = np.concatenate(list(parts.values()))
    pooled = partial_stats(X, init)
    decoded = secure.decode(total_view)
    assert np.allclose(decoded[:K * D].reshape(K, D), pooled.sums, atol=1e-4)
    assert np.array_equal(decoded[K * D:K * D + K], pooled.counts)
    # A fresh round gets fresh masks: two views of one client never differ by its true difference.
    again = clients["a"].lloyd(init, 1, Release(round=2, participants=names))["masked"]
    assert not np.array_equal(again, views["a"])
    # A subset of the participants (a redone round) still cancels.
    pair = ("a", "c")
    sub = [clients[n].lloyd(init, 1, Release(round=1, attempt=1, participants=pair))["masked"] for n in pair]
    assert np.allclose(secure.unmasked_sum(sub)[K * D:K * D + K], clear["a"]["counts"] + clear["c"]["counts"])
    # min_count: a cluster smaller than that is not shared at all.
    small = clients["c"].lloyd(init, 1, Release(round=1, min_count=int(clear["c"]["counts"].min()) + 1))
    assert small["suppressed"] >= 1 and np.count_nonzero(small["counts"]) == K - small["suppressed"]
    assert np.all(small["sums"][small["counts"] == 0] == 0)
    with pytest.raises(DataError, match="cannot encode 1e\\+20"):
        secure.encode(np.array([1e20]), 3, "partition 'a'")


def test_dp_noise_scales_with_epsilon_and_the_accountant_sums_to_the_budget(parts, init):
    def noise_std(epsilon: float) -> tuple[float, float]:
        cfg = PrivacyConfig(epsilon=epsilon, delta=1e-5, clip_norm=10.0)
        accountant = Accountant(cfg, releases=4)
        noise = accountant.next_noise()
        client = FederatedClient("a", parts["a"], clip_norm=10.0)
        client.load()
        clean = client.lloyd(init, 1, Release(round=1))["sums"]
        draws = [client.lloyd(init, 1, Release(round=1, noise=noise))["sums"] - clean for _ in range(200)]
        return float(np.std(draws)), noise.sigma_sums

    (std_1, sigma_1), (std_10, sigma_10) = noise_std(1.0), noise_std(10.0)
    assert std_1 == pytest.approx(sigma_1, rel=0.1) and std_10 == pytest.approx(sigma_10, rel=0.1)
    assert std_1 / std_10 > 5  # less budget, more noise

    cfg = PrivacyConfig(epsilon=2.0, delta=1e-6, clip_norm=1.0)
    accountant = Accountant(cfg, releases=5, counts_releases=1)
    reports = [accountant.spend(accountant.next_noise(counts_only=i == 0)) for i in range(5)]
    totals = [r["epsilon_total"] for r in reports]
    assert totals == sorted(totals) and 2.0 * 0.99 <= totals[-1] <= 2.0 * (1 + 1e-3)
    assert all(r["epsilon"] < 2.0 / 2 for r in reports)  # composition beats adding epsilons
    # The PLD accountant is tighter than the zCDP bound the same noise would get.
    zcdp_rho = 5 * (1 / (2 * accountant.noise_multiplier ** 2))  # Gaussian-equivalent rho of the plan
    zcdp_epsilon = zcdp_rho + 2 * np.sqrt(zcdp_rho * np.log(1 / cfg.delta))
    assert totals[-1] < zcdp_epsilon


def test_bad_input_is_named_before_ray_starts(parts):
    cases = [
        ({**parts, "c": np.zeros((0, D), np.float32)}, {}, DataError, "partition 'c' holds no rows"),
        ({**parts, "b": parts["b"][:, :2]}, {}, DataError, "partition 'b' has 2 dimensions, but partition 'a' has 3"),
        ({**parts, "c": parts["c"][:4]}, {"mode": "one_shot", "local_k": 5}, ConfigError,
         r"local_k=5 should be <= the rows of partition 'c' \(4\) \(config: federated.local_k\)\.$"),
        (parts, {"privacy": {"epsilon": 0, "clip_norm": 1.0}}, ConfigError,
         r"privacy.epsilon.*\(config: federated.privacy\)"),
        (parts, {"privacy": {"epsilon": -1.0, "clip_norm": 1.0}}, ConfigError, "privacy.epsilon"),
        (parts, {"privacy": {"epsilon": 1.0}}, ConfigError, "clip_norm is required with epsilon"),
        (parts, {"privacy": {"epsilon": 1.0, "clip_norm": 1.0}}, ConfigError,
         r"needs init= an array.*\(config: federated.init_points\)"),
        (parts, {"privacy": {"epsilon": 1.0, "clip_norm": 1.0}, "mode": "one_shot"}, ConfigError,
         r"needs mode='rounds'.*\(config: federated.mode\)"),
        (parts, {"placement": {"a": "partition:a", "zz": "partition:zz"}}, ConfigError,
         r"placement names partition 'zz', which is not one of the partitions.*\(config: federated.placement\)"),
        (parts, {"mode": "one_shot", "secure_aggregation": True}, ConfigError,
         r"secure_aggregation applies to.*\(config: federated.secure_aggregation\)"),
        (parts, {"quorum": 1.5}, ConfigError, r"quorum=1.5 should be a share.*\(config: federated.quorum\)"),
        (parts, {"max_rounds": 0}, ConfigError, r"max_rounds=0 should be >= 1 \(config: federated.max_rounds\)"),
        ({"a": parts["a"], "b": [[1.0, 2.0]]}, {}, ConfigError, "partition 'b' should be a numpy array"),
        ({**parts, "c": parts["c"][:3]}, {"mode": "one_shot"}, ConfigError,
         r"n_clusters=4 should be <= the rows of partition 'c' \(3\): every client clusters its own rows first "
         r"\(config: cluster.k\)\.$"),
        (parts, {"transport": "grpc"}, ConfigError, r"transport='grpc' should be one of ray, in_process, flower\.$"),
        (parts, {"clients_per_actor": 0}, ConfigError,
         r"clients_per_actor=0 should be >= 1 \(config: federated\.clients_per_actor\)\.$"),
        (parts, {"secure_neighbours": 1}, ConfigError,
         r"secure_neighbours=1 should be >= 2 \(config: federated\.secure_neighbours\)\.$"),
        (parts, {"placement": "resource", "transport": "in_process"}, ConfigError, "placement needs transport='ray'"),
    ]
    for partitions, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            FederatedKMeans(K, **kwargs).fit(partitions)


# --- FederatedKMeans on a real local Ray -----------------------------------------------------------------


def test_rounds_equal_centralised_lloyd_from_the_same_init(ray_local, parts, init, data, tmp_path):
    X, _ = data
    # Three kinds of partition: an array, a Parquet file its client reads, a Ray Dataset.
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"x": vector_array(parts["b"])}), path)
    ds = ray_local.data.from_arrow(pa.table({"z": vector_array(parts["c"])}))
    km = FederatedKMeans(K, init=init, max_rounds=6, tol=0, audit=True).fit({"a": parts["a"], "b": str(path), "c": ds})
    ref = KMeans(K, init=init, max_iter=6, tol=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-6)
    assert [r["objective"] for r in km.history_[:6]] == pytest.approx([r["objective"] for r in ref.history_], rel=1e-6)
    assert km.n_rounds_ == 6 and [r["kind"] for r in km.history_] == ["lloyd"] * 6 + ["evaluate"]
    assert np.array_equal(km.predict(X), ref.predict(X))
    assert {n: p["rows"] for n, p in km.partitions_.items()} == SIZES
    assert all(p["node_id"] for p in km.partitions_.values())
    assert km.bytes_up_ > 0 and km.bytes_down_ > 0
    assert_only_aggregates(km.messages_, set(SIZES.values()))
    # Every partition's own inertia is reported, and they add up to the global one.
    last = km.history_[-1]["partition_inertia"]
    assert sum(last.values()) == pytest.approx(km.inertia_, rel=1e-9)


@pytest.mark.parametrize("secure_aggregation", [False, True])
def test_rounds_repair_an_empty_cluster_as_kmeans_does(ray_local, parts, init, data, secure_aggregation):
    X, _ = data
    init = init.copy()
    init[3] = 1e3  # starts empty
    km = FederatedKMeans(K, init=init, max_rounds=5, tol=0, secure_aggregation=secure_aggregation).fit(parts)
    ref = KMeans(K, init=init, max_iter=5, tol=0).fit(X)
    assert km.history_[0]["empty"] == km.history_[0]["empty_repaired"] == ref.history_[0]["empty_repaired"] == 1
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    assert np.bincount(km.predict(X), minlength=K).min() > 0


def test_one_shot_kfed_with_experiment_metrics(ray_local, data):
    # k-FED's setting: each partition holds k' of the k clusters.
    X, y = data
    split = split_indices(len(X), 3, split="clusters", labels=y, clusters_per_partition=K_LOCAL, seed=0)
    kfed = {name: X[rows] for name, rows in split.items()}
    km = FederatedKMeans(K, mode="one_shot", local_k=K_LOCAL, compare_centralised=True, audit=True,
                         privacy={"min_count": 5}).fit(kfed)
    first = km.history_[0]
    assert first["kind"] == "local_kmeans" and first["local_centroids"] == 3 * K_LOCAL and km.n_rounds_ == 1
    assert km.reference_["inertia_ratio"] <= 1.05 and km.reference_["ari_to_centralised"] > 0.95
    assert first["inertia_ratio"] == pytest.approx(km.reference_["inertia_ratio"])
    assert km.history_[-1]["kind"] == "evaluate" and km.inertia_ == pytest.approx(km.reference_["federated_inertia"])
    assert_only_aggregates(km.messages_, {len(rows) for rows in split.values()})


def test_secure_aggregation_end_to_end(ray_local, parts, init, data):
    X, _ = data
    km = FederatedKMeans(K, init=init, max_rounds=4, tol=0, secure_aggregation=True, audit=True).fit(parts)
    ref = KMeans(K, init=init, max_iter=4, tol=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_, ref.cluster_centers_, atol=1e-4)
    assert km.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    lloyd = [m for m in km.messages_ if m["direction"] == "up" and m["kind"] in ("lloyd", "evaluate")]
    assert lloyd and all(set(m["payload"]) == {"masked"} for m in lloyd)
    for m in lloyd:
        counts = secure.decode(m["payload"]["masked"])[K * D:K * D + K]
        assert not np.all((counts >= 0) & (counts <= SIZES[m["partition"]]))  # a view alone is noise
    assert all(r["secure"] and set(r["partition_inertia"].values()) == {None} for r in km.history_)
    assert_only_aggregates(km.messages_, set(SIZES.values()))


@pytest.mark.slow
def test_dp_with_secure_aggregation_reports_the_budget(ray_local, parts, data):
    X, _ = data
    candidates = X[::9]  # server-side points: the init counts rows nearest each, privately
    km = FederatedKMeans(K, init=candidates, max_rounds=3, secure_aggregation=True, compare_centralised=True,
                         privacy={"epsilon": 8.0, "delta": 1e-5, "clip_norm": 15.0, "count_noise": "gaussian"}
                         ).fit(parts)
    assert [r["kind"] for r in km.history_] == ["init", "lloyd", "lloyd", "lloyd"]  # no SSE, no evaluate round
    totals = [r["privacy"]["epsilon_total"] for r in km.history_]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(8.0, rel=1e-2) and totals[-1] <= 8.0 * 1.001
    assert km.privacy_spent_ == {"epsilon": pytest.approx(8.0, rel=1e-2), "delta": 1e-5}
    assert km.inertia_ is None and all(r["objective"] is None for r in km.history_)
    assert km.reference_["inertia_ratio"] < 3  # noisy, but the clusters are still found


def test_a_killed_client_is_dropped_and_secure_aggregation_redoes_the_round(ray_local, parts, init):
    def kill_after_round_1(record):
        if record["kind"] == "lloyd" and record["round"] == 1:
            ray_local.kill(km.clients_["b"])

    km = FederatedKMeans(K, init=init, max_rounds=3, tol=0, secure_aggregation=True,
                         callback=kill_after_round_1)
    km.fit(parts)
    second = km.history_[1]
    assert second["round"] == 2 and "client died" in second["dropped"]["b"] and second["attempts"] == 2
    assert [r["participants"] for r in km.history_] == [["a", "b", "c"]] + [["a", "c"]] * 3
    assert km.cluster_centers_.shape == (K, D) and np.isfinite(km.inertia_)


def test_too_few_clients_for_the_quorum(ray_local, parts, init):
    def kill_after_round_1(record):
        if record["round"] == 1:
            ray_local.kill(km.clients_["c"])

    km = FederatedKMeans(K, init=init, max_rounds=3, tol=0, quorum=1.0, callback=kill_after_round_1)
    with pytest.raises(QuorumError, match=r"2 of 3 clients answered, quorum=1 needs 3 \(c: client died"):
        km.fit(parts)


def test_clients_that_do_not_answer_in_time_are_dropped(ray_local, parts):
    # Starting an actor takes longer than a millisecond: no client can load in time.
    with pytest.raises(QuorumError, match=r"load \(round 0\): 0 of 3 clients answered.*no answer within "
                                          r"round_timeout=0.001 s"):
        FederatedKMeans(K, round_timeout=0.001).fit(parts)


def test_placement_on_a_resource_no_node_offers(ray_local, parts):
    with pytest.raises(ConfigError, match="partition 'a' needs the custom resource 'partition:a'"):
        FederatedKMeans(K, placement="resource").fit(parts)


def test_dce_federate_on_a_partition_column(ray_local, parts, tmp_path):
    from engine.cli import app

    names = np.repeat(list(SIZES), list(SIZES.values()))
    X = np.concatenate(list(parts.values()))
    pq.write_table(pa.table({"x": vector_array(X), "partition": pa.array(names)}), tmp_path / "sites.parquet")
    assert list(partitions_from_column(str(tmp_path / "sites.parquet"))) == list(SIZES)
    config = tmp_path / "sites.yaml"
    config.write_text(json.dumps({
        "name": "sites", "data": {"source": "parquet", "path": str(tmp_path / "sites.parquet")},
        "cluster": {"k": K}, "federated": {"max_rounds": 5, "partitions": {"by": "column"}, "secure_aggregation": True,
                                           "dropout_recovery": True, "clients_per_actor": 2},
    }))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["federate", str(config), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "federated" / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "federated" / "summary.json").read_text())
    assert rounds[0]["kind"] == "init" and rounds[-1]["kind"] == "evaluate"
    assert {n: p["rows"] for n, p in summary["partitions"].items()} == SIZES
    assert summary["inertia"] == rounds[-1]["objective"] and summary["reference"] is None
    assert summary["secure_aggregation"] is True and summary["dropout_recovery"] is True
    assert np.load(out / "centroids.npy").shape == (K, D)
    assert json.loads((out / "federated" / "_manifest.json").read_text())["stage"] == "federated"
    bad = CliRunner().invoke(app, ["federate", str(config), "--out", str(tmp_path / "bad"), "--quiet",
                                   "--set", "federated.placement={zz: partition:zz}"])
    assert bad.exit_code == 2 and "placement names partition 'zz'" in bad.output
    bad = CliRunner().invoke(app, ["federate", str(config), "--out", str(tmp_path / "bad"), "--quiet",
                                   "--set", "federated.secure_aggregation=false"])
    assert bad.exit_code == 2 and "federated.dropout_recovery" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()
