"""DEC / IDEC: the target distribution by hand and all-reduced over gloo workers, the refinement loop, the
refine stage under Ray Train (2 workers against 1), the pipeline's use of the refined model, bad settings."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from markers import needs
from typer.testing import CliRunner

from engine.cli import app
from engine.config import config_from_dict
from engine.data import read_manifest, read_table
from engine.errors import ConfigError
from engine.models import build_model
from engine.models.dec import cluster_frequencies, kl_divergence, soft_assignment, target_distribution
from engine.train import load_checkpoint, model_from_checkpoint, save_checkpoint
from engine.train.refine import batch_indices, refine_loop, update_target

SMALL = {"latent_dim": 2, "hidden": [16]}


def _blobs(n: int = 300, seed: int = 0, std: float = 1.5) -> torch.Tensor:
    """Three overlapping 6-D blobs, standardised: k-means leaves some rows for DEC to move."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(3, 6))
    x = centers[rng.integers(0, 3, n)] + rng.normal(scale=std, size=(n, 6))
    return torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)


def _dec(name: str, x: torch.Tensor, k: int = 3, **options) -> torch.nn.Module:
    """A dec / idec model on a briefly pretrained small autoencoder, centres at k random rows' codes."""
    torch.manual_seed(0)
    model = build_model(name, in_dim=x.shape[1], n_clusters=k, **SMALL, **options)
    opt = torch.optim.Adam(model.autoencoder.parameters(), lr=1e-2)
    for _ in range(100):
        loss, _ = model.autoencoder.loss(x[torch.randint(0, len(x), (64,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.centers.copy_(model.encode(x[torch.randperm(len(x))[:k]]))
    return model


# ---- the maths, by hand ----------------------------------------------------------------------------


def test_soft_assignment_and_target_by_hand():
    # z = 0, 1, 4 on a line; centres at 0 and 2; alpha = 1: kernel 1 / (1 + d^2).
    z = torch.tensor([[0.0], [1.0], [4.0]], dtype=torch.float64)
    mu = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    # row 0: kernels 1, 1/5 -> q = 5/6, 1/6; row 1: 1/2, 1/2; row 2: 1/17, 1/5 -> 5/22, 17/22
    q_hand = [[Fraction(5, 6), Fraction(1, 6)], [Fraction(1, 2), Fraction(1, 2)], [Fraction(5, 22), Fraction(17, 22)]]
    # f_j = column sums = 103/66 and 95/66
    f_hand = [sum(r[j] for r in q_hand) for j in range(2)]
    assert f_hand == [Fraction(103, 66), Fraction(95, 66)]
    # p_ij proportional to q_ij^2 / f_j: row 0 -> (25/103, 1/95) -> (2375, 103) / 2478, and so on.
    p_hand = [[Fraction(2375, 2478), Fraction(103, 2478)], [Fraction(95, 198), Fraction(103, 198)],
              [Fraction(2375, 32142), Fraction(29767, 32142)]]

    q = soft_assignment(z, mu)
    np.testing.assert_allclose(q.numpy(), np.array(q_hand, dtype=float), rtol=1e-12)
    np.testing.assert_allclose(cluster_frequencies(q).numpy(), np.array(f_hand, dtype=float), rtol=1e-12)
    p = target_distribution(q)
    np.testing.assert_allclose(p.numpy(), np.array(p_hand, dtype=float), rtol=1e-12)
    # KL(P || Q) per row, averaged.
    kl = np.mean([sum(float(pi) * np.log(float(pi) / float(qi)) for pi, qi in zip(pr, qr, strict=True))
                  for pr, qr in zip(p_hand, q_hand, strict=True)])
    assert float(kl_divergence(p, q.log())) == pytest.approx(kl, rel=1e-12)

    # alpha = 3: kernel (1 + d^2 / 3)^-2; row 2 has d^2 = 16, 4.
    k = np.array([(1 + 16 / 3) ** -2, (1 + 4 / 3) ** -2])
    np.testing.assert_allclose(soft_assignment(z, mu, alpha=3.0)[2].numpy(), k / k.sum(), rtol=1e-12)


def test_target_needs_the_whole_data_sets_frequencies():
    """The common bug: f_j over a batch. P of a batch must use f over every row."""
    q = soft_assignment(torch.randn(50, 3, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3))
    whole = target_distribution(q)
    batch = q[:10]
    np.testing.assert_allclose(target_distribution(batch, cluster_frequencies(q)).numpy(), whole[:10].numpy(),
                               rtol=1e-6)
    assert not np.allclose(target_distribution(batch).numpy(), whole[:10].numpy(), rtol=1e-3)


# ---- the target all-reduced over two real torch.distributed (gloo) workers ------------------------


def test_target_is_all_reduced_across_two_gloo_workers(tmp_path):
    import torch.multiprocessing as mp
    from gloo_worker import target_share

    x = _blobs(13)
    model = _dec("idec", x, gamma=0.1)
    torch.save({"args": model.build_args, "state": model.state_dict(), "x": x, "shift_centers": 0.3},
               tmp_path / "setup.pt")
    # Real processes, a real gloo all-reduce; shares of different sizes (5 and 8 rows).
    mp.spawn(target_share, args=(2, str(tmp_path), [0, 5, 13]), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    first = update_target(model, x)
    with torch.no_grad():
        model.centers.add_(0.3)
    second = update_target(model, x, previous=first)
    np.testing.assert_allclose(torch.cat([r["p"] for r in results]).numpy(), second.p.numpy(), rtol=1e-5, atol=1e-7)
    for r in results:  # every worker reads the same totals: the data set's, not its share's
        assert r["record"]["rows"] == 13 and r["first"]["rows"] == 13
        for key in ("kl_start", "kl_end", "label_change"):
            assert r["record"][key] == pytest.approx(second.record[key], rel=1e-5, abs=1e-9), key
    assert second.record["label_change"] > 0


# ---- the loop (plain torch) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dec", "idec"])
def test_kl_falls_between_target_updates(one_thread, name):
    x = _blobs()
    model = _dec(name, x, **({"gamma": 0.1} if name == "idec" else {}))
    decoder_before = [p.detach().clone() for p in model.autoencoder.decoder.parameters()]
    encoder_before = [p.detach().clone() for p in model.autoencoder.encoder.parameters()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history, _ = refine_loop(model, opt, x, update_interval=20, max_iter=100, tol=0.0, batch_size=32)
    assert [h["iteration"] for h in history] == [0, 20, 40, 60, 80, 100]
    assert all(h["rows"] == 300 for h in history)
    # With P held fixed, the steps lower KL(P || Q) over the whole data set, every interval.
    for before, after in zip(history, history[1:], strict=False):
        assert after["kl_end"] < before["kl_start"]
    assert {"loss", "kl"} <= set(history[1]) and ("reconstruction" in history[1]) == (name == "idec")
    changed = [not torch.equal(a, b) for a, b in zip(encoder_before, model.autoencoder.encoder.parameters(),
                                                      strict=True)]
    assert all(changed)
    decoder_same = all(torch.equal(a, b) for a, b in zip(decoder_before, model.autoencoder.decoder.parameters(),
                                                         strict=True))
    assert decoder_same == (name == "dec")  # DEC never trains the decoder; IDEC does


def test_stops_when_few_labels_change(one_thread):
    x = _blobs()
    model = _dec("dec", x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # tol = 1: any update that keeps one label stops the run, at the second update.
    history, stopped = refine_loop(model, opt, x, update_interval=7, max_iter=1000, tol=1.0, batch_size=32)
    assert stopped == "tol" and [h["iteration"] for h in history] == [0, 7] and history[-1]["label_change"] < 1
    # tol = 0 never stops early; the last update is at max_iter, off the interval's grid.
    history, stopped = refine_loop(model, opt, x, update_interval=7, max_iter=17, tol=0.0, batch_size=32)
    assert stopped == "max_iter" and [h["iteration"] for h in history] == [0, 7, 14, 17]
    # A realistic tol on well-separated data: labels settle, and the run stops before max_iter.
    history, stopped = refine_loop(model, opt, x, update_interval=10, max_iter=1000, tol=0.01, batch_size=32)
    assert stopped == "tol" and history[-1]["iteration"] < 1000 and history[-1]["label_change"] < 0.01


def test_batches_cover_every_row_each_pass():
    batches = batch_indices(10, 4, torch.Generator().manual_seed(0))
    rows = torch.cat([next(batches) for _ in range(5)])  # 20 rows = 2 passes
    assert all(len(b) == 4 for b in rows.split(4))
    assert sorted(rows[:8].tolist()) != list(range(8))  # shuffled
    assert torch.bincount(rows, minlength=10).tolist() == [2] * 10


def test_dec_checkpoint_round_trip(tmp_path):
    x = _blobs(50)
    model = _dec("idec", x, gamma=0.5)
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, shift=np.zeros(6), scale=np.ones(6), epoch=40,
                    history=[{"update": 1.0, "kl_start": 0.1}])
    state = load_checkpoint(tmp_path)
    assert state["model"] == {"name": "idec", "in_dim": 6, "n_clusters": 3, "gamma": 0.5, **SMALL}
    again = model_from_checkpoint(state)
    torch.testing.assert_close(again.encode(x), model.encode(x))
    torch.testing.assert_close(again.centers, model.centers)
    assert again.cfg.gamma == 0.5 and state["epoch"] == 40


# ---- bad settings ----------------------------------------------------------------------------------


def _idec_cfg(**sections):
    raw = {"model": {"name": "idec"}, "data": {"source": "blobs", "n_samples": 100}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"'refine.gamma': Input should be greater than 0"):
        _idec_cfg(refine={"gamma": -0.1})
    with pytest.raises(ConfigError, match=r"'refine.update_interval': Input should be greater than or equal to 1"):
        _idec_cfg(refine={"update_interval": 0})
    with pytest.raises(ConfigError, match=r"'refine.tol'"):
        _idec_cfg(refine={"tol": 2})
    with pytest.raises(ConfigError, match=r"unknown key 'refine.epochs'"):
        _idec_cfg(refine={"epochs": 3})
    with pytest.raises(ConfigError, match=r"model.base='dec' should be an autoencoder to pretrain"):
        _idec_cfg(model={"base": "dec"})
    with pytest.raises(ConfigError, match=r"cluster.k=200 should be <= data.n_samples=100"):
        _idec_cfg(cluster={"k": 200})
    # The cluster section only sets up the partition the centres start from: one of k clusters (a density-based
    # method finds its own number), after UMAP or not.
    for method in ("hdbscan", "dbscan", "sharded", "posterior"):
        with pytest.raises(ConfigError, match=rf"cluster.method={method} does not apply to model.name=idec: its "
                                              r"centres start from a partition into cluster.k clusters \(kmeans, "
                                              r"gmm, agglomerative\)"):
            _idec_cfg(cluster={"method": method})
    assert _idec_cfg(cluster={"method": "gmm", "manifold": "umap", "umap": {"n_init": 2}}).cluster.method == "gmm"
    with pytest.raises(ConfigError, match=r"cluster.spherical does not apply to model.name=idec"):
        _idec_cfg(cluster={"spherical": True})
    with pytest.raises(ConfigError, match=r"model.base='vae' has no decode\(z\)"):
        build_model("idec", in_dim=4, base="vae", hidden=[4])
    dec_on_vae = build_model("dec", in_dim=4, base="vae", hidden=[4])  # DEC needs no decoder
    assert not any(p.requires_grad for p in dec_on_vae.autoencoder.decoder.parameters())
    with pytest.raises(ConfigError, match=r"model.base='nope' is not an autoencoder to pretrain"):
        build_model("idec", in_dim=4, base="nope")
    with pytest.raises(ConfigError, match=r"refine.gamma=0 should be > 0"):
        build_model("idec", in_dim=4, gamma=0)
    # The CLI: one line naming the key, exit code 2, before Ray starts.
    result = CliRunner().invoke(app, ["run", "digits_idec", "--set", "refine.update_interval=0", "--quiet"])
    assert result.exit_code == 2 and "refine.update_interval" in result.output


def test_dec_pretrains_its_base():
    cfg = _idec_cfg(model={"hidden": [8]})
    options = cfg.model.pretrain_options()
    assert cfg.model.refines and options["name"] == "mlp_ae" and options["hidden"] == [8] and "base" not in options
    assert set(options) == set(cfg.model.model_dump()) - {"base"}
    plain = config_from_dict({})
    assert not plain.model.refines and "base" not in plain.model.pretrain_options()


def test_idec_on_the_conv_autoencoder_is_dcec(one_thread):
    x = _blobs(64).repeat(1, 6)[:, :36]  # 6x6 "images"
    torch.manual_seed(0)
    model = build_model("idec", in_dim=36, base="conv_ae", image_shape=[6, 6], channels=[4], kernels=[3],
                        latent_dim=2, n_clusters=3, gamma=0.1)
    with torch.no_grad():
        model.centers.copy_(model.encode(x[:3]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history, _ = refine_loop(model, opt, x, update_interval=5, max_iter=10, tol=0.0, batch_size=16)
    assert history[-1]["rows"] == 64 and history[-1]["reconstruction"] > 0
    assert history[1]["kl_end"] < history[0]["kl_start"]


# ---- Ray Train and the pipeline --------------------------------------------------------------------

TINY = [
    "--set", "data.source=blobs", "--set", "data.n_samples=400", "--set", "data.n_features=6",
    "--set", "data.centers=4", "--set", "data.cluster_std=2.0", "--set", "data.rows_per_shard=100",
    "--set", "data.normalize=standard", "--set", "model.name=idec", "--set", "model.hidden=[32]",
    "--set", "model.latent_dim=3", "--set", "train.epochs=3", "--set", "train.batch_size=64",
    "--set", "train.num_workers=2", "--set", "cluster.k=4", "--set", "cluster.n_init=2",
    "--set", "cluster.method=kmeans", "--set", "cluster.manifold=none", "--set", "refine.update_interval=5",
    "--set", "refine.max_iter=400", "--set", "refine.tol=0.01", "--set", "refine.batch_size=64",
    "--set", "refine.lr=0.003", "--set", "tracking.backend=tensorboard",
]


@pytest.fixture(scope="module")
@needs("ray", "train")
def idec_run(ray_local, tmp_path_factory):
    """`dce run` with model.name=idec on 2 Ray Train workers: train, refine, embed, cluster, evaluate."""
    out = tmp_path_factory.mktemp("runs") / "idec"
    result = CliRunner().invoke(app, ["run", *TINY, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _normalised_input(run_dir):
    from engine.data import open_source, read_dataset
    from engine.rundir import load_run_config

    table = read_dataset(open_source(load_run_config(run_dir).data)).to_pandas()
    state = load_checkpoint(run_dir / "refined")
    x = torch.tensor(np.stack(table["x"].to_numpy()), dtype=torch.float32)
    return table["id"].to_numpy(), (x - state["input"]["shift"]) * state["input"]["scale"]


def test_refine_stage_writes_the_refined_model(idec_run):
    run = json.loads((idec_run / "run.json").read_text())
    assert set(run["seconds"]) == {"train", "refine", "embed", "cluster", "evaluate", "report"}
    refine = run["refine"]
    manifest = read_manifest(idec_run / "refined", stage="refine")
    assert manifest["rows"] == 400 and manifest["num_workers"] == 2
    # Every target update saw every row exactly once across the two workers.
    assert all(h["rows"] == 400 for h in refine["history"])
    assert refine["stopped"] == "tol" and refine["iterations"] < 400 and refine["label_change"] < 0.01
    assert {"acc", "nmi", "inertia"} <= set(refine["initial"])
    state = load_checkpoint(idec_run / "refined")
    assert state["model"]["name"] == "idec" and state["model"]["base"] == "mlp_ae"
    assert state["history"] == refine["history"] and state["epoch"] == refine["iterations"]
    centers = np.load(idec_run / "refined" / "centers.npy")
    np.testing.assert_array_equal(centers, state["state_dict"]["centers"].numpy())
    assert not np.allclose(centers, np.load(idec_run / "refined" / "initial_centers.npy"))
    cluster = json.loads((idec_run / "cluster.json").read_text())
    assert cluster["method"] == "idec" and cluster["n_iter"] == refine["iterations"]
    assert json.loads((idec_run / "metrics.json").read_text())["ari"] > 0.8


def test_refinement_is_tracked_per_target_update(idec_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(idec_run / "tensorboard"))
    events.Reload()
    history = json.loads((idec_run / "run.json").read_text())["refine"]["history"]
    kl = events.Scalars("refine/kl_start")
    assert [e.step for e in kl] == list(range(1, len(history) + 1)) and len(history) > 1
    assert [e.value for e in kl] == pytest.approx([h["kl_start"] for h in history], rel=1e-6)
    assert [e.value for e in events.Scalars("refine/label_change")] == pytest.approx(
        [h["label_change"] for h in history[1:]], rel=1e-6)
    assert len(events.Scalars("train/loss")) == 3  # the pretraining's epochs, before the refinement's updates


def test_embed_and_cluster_use_the_refined_model(idec_run):
    from engine.cluster.assignments import load_vectors

    ids, z, _ = load_vectors(idec_run / "embeddings")
    input_ids, x = _normalised_input(idec_run)
    x = x[torch.as_tensor(np.argsort(input_ids))][torch.as_tensor(ids)]
    refined = model_from_checkpoint(load_checkpoint(idec_run / "refined")).eval()
    pretrained = model_from_checkpoint(load_checkpoint(idec_run / "model")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(z, refined.encode(x).numpy(), rtol=1e-4, atol=1e-5)
        assert not np.allclose(z, pretrained.encode(x).numpy(), atol=1e-3)
        dec_labels = refined.log_soft_assign(x).argmax(1).numpy()
    # The cluster stage assigned with DEC's centres (no new k-means): its labels are argmax_j q_ij.
    np.testing.assert_array_equal(np.load(idec_run / "centroids.npy"), refined.centers.detach().numpy())
    table = read_table(idec_run / "assignments", stage="assign")
    order = np.argsort(table.column("id").to_numpy())
    np.testing.assert_array_equal(table.column("cluster").to_numpy()[order][ids], dec_labels)


def test_new_rows_are_assigned_by_the_refined_model(idec_run, tmp_path):
    """`dce assign` of an IDEC run: each new row through the refined encoder to its nearest refined centre, so the
    run's own rows, given as new ones, get the run's labels."""
    from engine.data import open_source, read_dataset
    from engine.rundir import load_run_config

    table = read_dataset(open_source(load_run_config(idec_run).data)).to_pandas().sort_values("id")
    np.save(tmp_path / "new.npy", np.stack(table["x"].to_numpy()).astype(np.float32))  # ids 0..399
    result = CliRunner().invoke(app, ["assign", str(idec_run), "--input", str(tmp_path / "new.npy"),
                                      "--out", str(tmp_path / "assigned"), "--quiet"])
    assert result.exit_code == 0, result.output
    new = read_table(tmp_path / "assigned", stage="assign").sort_by("id")
    run = read_table(idec_run / "assignments", stage="assign").sort_by("id")
    assert new.column("id").equals(run.column("id")) and new.column("cluster").equals(run.column("cluster"))


def test_centres_can_start_from_another_partition_than_kmeans(idec_run):
    """`cluster.method` gmm after UMAP (N2D's partition, as configs/digits_idec.yaml): the initial centres are the mean
    codes of that partition of the pretrained embeddings (Ray Data actors encode them), and its ACC is the baseline."""
    from engine.cluster._in_memory import fit_labels
    from engine.config import ClusterConfig
    from engine.data import open_source, read_dataset
    from engine.metrics import clustering_accuracy
    from engine.rundir import load_run_config
    from engine.train.refine import initial_centers

    cfg = load_run_config(idec_run)
    ds = read_dataset(open_source(cfg.data))
    cluster = ClusterConfig(k=4, method="gmm", covariance_type="diag", n_init=2, manifold="umap",
                            umap={"n_neighbors": 15})
    centers, summary = initial_centers(ds, idec_run / "model", dim=6, n_rows=400, cluster=cluster, seed=3)

    table = ds.to_pandas().sort_values("id")
    state = load_checkpoint(idec_run / "model")
    x = (torch.tensor(np.stack(table["x"].to_numpy()), dtype=torch.float32) - state["input"]["shift"])
    with torch.no_grad():
        z = model_from_checkpoint(state).eval().encode(x * state["input"]["scale"]).numpy()
    labels, _ = fit_labels(z, cluster, seed=3)
    means = np.stack([z[labels == j].mean(0) for j in range(4)])
    np.testing.assert_allclose(centers, means, rtol=1e-4, atol=1e-5)
    assert summary["acc"] == pytest.approx(clustering_accuracy(table["label"].to_numpy(), labels))
    assert summary["inertia"] == pytest.approx(float(((z - means[labels]) ** 2).sum()), rel=1e-4)
    assert summary["in_driver"] and summary["acc"] > 0.5  # four blobs, a partition not a random one


def test_a_partition_without_k_clusters_is_refused():
    from engine.config import ClusterConfig
    from engine.errors import DataError
    from engine.train.refine import _partition_means

    z = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 10.0)]).astype(np.float32)
    z += np.random.default_rng(0).normal(scale=0.1, size=z.shape).astype(np.float32)
    with pytest.raises(DataError, match=r"the codes: dbscan found 2 clusters, not cluster.k=4; the refinement needs "
                                        r"k initial centres"):
        _partition_means(z, ClusterConfig(k=4, method="dbscan", eps=1.0), seed=0, where="the codes")
    centers, labels, _ = _partition_means(z, ClusterConfig(k=2, method="agglomerative"), seed=0, where="the codes")
    np.testing.assert_allclose(np.sort(centers[:, 0]), [0.0, 10.0], atol=0.1)


def test_one_worker_agrees_with_two(idec_run, tmp_path):
    """The same refinement on 1 worker (in this process, as refine_model's single worker refines:
    tests/single_process.py): P of the first update is identical (f all-reduced), the result close."""
    from single_process import refine_in_process
    from sklearn.metrics import adjusted_rand_score

    from engine.data import open_source, read_dataset
    from engine.rundir import load_run_config

    cfg = load_run_config(idec_run)
    two = json.loads((idec_run / "run.json").read_text())["refine"]
    rows = np.stack(read_dataset(open_source(cfg.data)).to_pandas()["x"].to_numpy())  # as one worker reads them
    one = refine_in_process(rows, pretrained=idec_run / "model", name="idec", refine=cfg.refine, seed=cfg.seed,
                            centers=np.load(idec_run / "refined/initial_centers.npy"), out=tmp_path / "refined")
    assert one["rows"] == 400 and one["stopped"] == "tol"
    # Same model, same centres: the first target, over all 400 rows, does not depend on the split.
    assert one["history"][0]["kl_start"] == pytest.approx(two["history"][0]["kl_start"], rel=1e-5)
    # After the first interval (different batches, same expected gradient) the objectives stay close.
    assert one["history"][1]["kl_end"] == pytest.approx(two["history"][1]["kl_end"], rel=0.2)
    _, x = _normalised_input(idec_run)
    labels = []
    for folder in (idec_run / "refined", tmp_path / "refined"):
        with torch.no_grad():
            labels.append(model_from_checkpoint(load_checkpoint(folder)).log_soft_assign(x).argmax(1).numpy())
    assert adjusted_rand_score(*labels) > 0.9


def test_refine_refuses_bad_input(idec_run, tmp_path):
    from engine.data import open_source, read_dataset
    from engine.rundir import load_run_config
    from engine.train.refine import refine_model

    cfg = load_run_config(idec_run)
    ds = read_dataset(open_source(cfg.data)).limit(3)
    with pytest.raises(ConfigError, match=r"cluster.k=4 should be <= the number of rows \(3\)"):
        refine_model(ds, pretrained=idec_run / "model", centers=np.zeros((4, 3)), name="idec", refine=cfg.refine,
                     num_workers=2, seed=0, run_dir=tmp_path, config_hash="h")
    # A plain autoencoder run has nothing to refine.
    result = CliRunner().invoke(app, ["refine", str(idec_run), "--set", "model.name=mlp_ae", "--quiet"])
    assert result.exit_code == 2 and "model.name='mlp_ae' has no refine stage" in result.output
