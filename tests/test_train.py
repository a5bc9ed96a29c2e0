"""Models, checkpoints, the plain-torch loop, Ray Train with 2 workers (the train stage of a shared tiny `dce run`), and
embedding shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from engine.config import config_from_dict
from engine.data import open_source, read_dataset, read_manifest
from engine.data.describe import describe
from engine.embed import embed_dataset
from engine.errors import CheckpointError, ConfigError
from engine.models import build_model, model_names
from engine.train import load_checkpoint, model_from_checkpoint, save_checkpoint, train_encoder
from engine.train.loop import train

SMALL_MODEL = {"name": "mlp_ae", "latent_dim": 3, "hidden": [32, 16], "dropout": 0.0}


def _blobs_cfg(**train):
    return config_from_dict({
        "data": {"source": "blobs", "n_samples": 600, "n_features": 8, "centers": 4, "rows_per_shard": 150,
                 "normalize": "standard"},
        "model": {k: v for k, v in SMALL_MODEL.items()},
        "train": {"epochs": 4, "batch_size": 64, "lr": 3e-3, "num_workers": 2, "checkpoint_every": 2, **train},
        "cluster": {"k": 4},
    })


class Payload:
    """Stands for an arbitrary object smuggled into a checkpoint file."""


# ---- no Ray ----------------------------------------------------------------------------------------


def test_mlp_autoencoder_shapes_and_registry():
    assert "mlp_ae" in model_names()
    m = build_model("mlp_ae", in_dim=64, latent_dim=7)
    x = torch.randn(5, 64)
    recon, z = m(x)
    assert recon.shape == (5, 64) and z.shape == (5, 7)
    assert m.build_args == {"name": "mlp_ae", "in_dim": 64, "latent_dim": 7}
    # DEC's architecture: d-500-500-2000-latent, ReLU between layers, none on the code.
    linear = [layer for layer in m.encoder if isinstance(layer, torch.nn.Linear)]
    assert [(la.in_features, la.out_features) for la in linear] == [(64, 500), (500, 500), (500, 2000), (2000, 7)]
    assert not isinstance(m.encoder[-1], torch.nn.ReLU)


def test_bad_model_settings():
    with pytest.raises(ConfigError, match=r"model.name='nope' is not a known model"):
        build_model("nope", in_dim=4)
    with pytest.raises(ConfigError, match=r"model.latent_dim=0 should be >= 1"):
        build_model("mlp_ae", in_dim=4, latent_dim=0)
    with pytest.raises(ConfigError, match=r"model.latent_dim"):
        config_from_dict({"model": {"latent_dim": 0}})


def test_plain_loop_decreases_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 2) @ torch.randn(2, 8)  # rank 2: a 2-D code can reconstruct it
    m = build_model("mlp_ae", in_dim=8, latent_dim=2, hidden=[16])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    history = train(m, opt, lambda epoch: x.split(32), epochs=5)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["rows"] == 256


def test_checkpoint_round_trip(tmp_path):
    m = build_model("mlp_ae", in_dim=6, latent_dim=2, hidden=[8])
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model=m, shift=np.zeros(6), scale=np.full(6, 0.5), epoch=3,
                    history=[{"loss": 1.0}], image_shape=(2, 3))
    state = load_checkpoint(path)
    m2 = model_from_checkpoint(state)
    x = torch.randn(4, 6)
    assert torch.equal(m.encode(x), m2.encode(x))
    assert state["epoch"] == 3 and state["input"]["image_shape"] == [2, 3]
    assert torch.equal(state["input"]["scale"], torch.full((6,), 0.5))


def test_checkpoint_refuses_pickled_objects_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    # Any class outside torch's allow-list needs real unpickling, which weights_only loading refuses.
    torch.save({"format": "dce-checkpoint/1", "obj": Payload()}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt: not a readable checkpoint"):
        load_checkpoint(evil)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"not a Deep Cluster Engine checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match=r"checkpoint not found"):
        load_checkpoint(tmp_path / "missing")


class TrainerBuilt(Exception):
    """Carries the arguments of a stand-in TorchTrainer out of train_encoder, before anything runs."""


def test_placement_strategy_reaches_ray_trains_scaling_config(tmp_path, monkeypatch):
    import ray
    import ray.train.torch

    def trainer(*args, **kwargs):
        raise TrainerBuilt(kwargs)

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    for strategy in ("PACK", "SPREAD"):
        cfg = _blobs_cfg(placement_strategy=strategy)
        with pytest.raises(TrainerBuilt) as built:
            train_encoder(None, in_dim=8, shift=np.zeros(8), scale=np.ones(8), model=cfg.model.pretrain_options(),
                          train=cfg.train, seed=0, run_dir=tmp_path, config_hash=cfg.hash())
        assert built.value.args[0]["scaling_config"].placement_strategy == strategy
        # The one TorchTrainer setup of train and refine (engine.train.trainer.build_trainer) names its backend.
        assert built.value.args[0]["torch_config"].backend == "gloo"
    assert _blobs_cfg().train.placement_strategy == "PACK"  # Ray's own default
    with pytest.raises(ConfigError, match=r"'train.placement_strategy': Input should be 'PACK' or 'SPREAD'"):
        _blobs_cfg(placement_strategy="STRICT_SPREAD")


# ---- real Ray Train and Ray Data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_local, tracked_tiny_run):
    """The 2-worker Ray Train run of the tiny `dce run` that other modules share (conftest's `tracked_tiny_run`,
    tests/tiny.py: 400 rows of 6 features, latent 3, 3 epochs; a run costs ~25 s here); read only."""
    run_dir, _ = tracked_tiny_run
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    ds = read_dataset(open_source(cfg.data)).materialize()
    info = describe(ds, normalize=cfg.data.normalize)
    return cfg, ds, info, run_dir, run_dir / "model"


def test_ray_train_two_workers(trained):
    cfg, _, info, run_dir, model_dir = trained
    manifest = read_manifest(model_dir, stage="train")
    assert manifest["num_workers"] == 2 and manifest["epochs"] == 3
    state = load_checkpoint(model_dir)
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # Every epoch covered all 400 rows once across the 2 workers. (The driver's view of each epoch, through the
    # progress queue, is what test_tracking.py checks in MLflow and TensorBoard.)
    assert all(h["rows"] == 400 for h in state["history"])
    # The checkpoint alone rebuilds the model, with the input normalisation.
    model = model_from_checkpoint(state)
    assert model.encode(torch.zeros(1, info.dim)).shape == (1, 3)
    np.testing.assert_allclose(state["input"]["shift"].numpy(), info.shift, rtol=1e-6)
    # Ray Train's own checkpoints (for resume) are kept in the run directory.
    assert any((run_dir / "train").glob("checkpoint_*/checkpoint.pt"))


def test_embed_writes_every_id_once(trained, tmp_path):
    cfg, ds, info, _, model_dir = trained
    out = tmp_path / "embeddings"
    manifest = embed_dataset(ds, model_dir, out, dim=info.dim, expected_rows=info.n_rows, config_hash="h",
                             batch_size=100, concurrency=2)
    assert manifest["rows"] == 400 and manifest["latent_dim"] == 3 and manifest["stage"] == "embed"
    table = pq.read_table([str(out / f) for f in manifest["files"]])
    assert table.schema.field("z").type.list_size == 3
    assert str(table.schema.field("z").type.value_type) == "float"
    ids = np.sort(table.column("id").to_numpy())
    np.testing.assert_array_equal(ids, np.arange(400))
    # The embedding equals the checkpoint's model applied to the normalised input.
    state = load_checkpoint(model_dir)
    model = model_from_checkpoint(state).eval()
    row = read_dataset(open_source(cfg.data)).take(1)[0]
    x = (torch.tensor(row["x"]) - state["input"]["shift"]) * state["input"]["scale"]
    z = table.filter(table.column("id").to_numpy() == row["id"]).column("z").to_pylist()[0]
    np.testing.assert_allclose(z, model.encode(x[None]).detach().numpy()[0], rtol=1e-4, atol=1e-5)


def test_embed_refuses_checkpoint_of_other_input_size(trained, tmp_path):
    _, ds, _, _, model_dir = trained
    with pytest.raises(CheckpointError, match=r"takes 6 input features but the data has 5"):
        embed_dataset(ds, model_dir, tmp_path / "emb", dim=5, expected_rows=400, config_hash="h")
    assert not (tmp_path / "emb").exists()
