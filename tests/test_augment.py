"""Training on augmented images (train.augment) and in bfloat16 (train.precision): the transforms, the
mixed-precision forward, the settings' checks, and one Ray Train run with both."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import yaml

from engine.config import config_from_dict
from engine.data import read_manifest
from engine.errors import ConfigError
from engine.models import build_model
from engine.pipeline import open_input
from engine.progress import epoch_terms
from engine.report import history_terms
from engine.tracking import _scalars
from engine.train import load_checkpoint
from engine.train.augment import affine, background, random_affine
from engine.train.loop import mixed_precision, native_precision, run_epoch


def _bar(height: int = 9, width: int = 9) -> torch.Tensor:
    """One image with a horizontal bar through the middle row, as a flat row."""
    img = torch.zeros(height, width)
    img[height // 2, 2:width - 2] = 1.0
    return img.reshape(1, -1)


# ---- the transforms --------------------------------------------------------------------------------


def test_affine_identity_quarter_turn_and_one_pixel_shift():
    x = _bar()
    np.testing.assert_allclose(affine(x, (9, 9), torch.zeros(1), torch.zeros(1, 2)), x, atol=1e-6)
    turned = affine(x, (9, 9), torch.tensor([math.pi / 2]), torch.zeros(1, 2)).reshape(9, 9)
    np.testing.assert_allclose(turned, x.reshape(9, 9).T, atol=1e-5)  # the bar stands upright
    moved = affine(x, (9, 9), torch.zeros(1), torch.tensor([[0.0, 1 / 9]])).reshape(9, 9)
    # One pixel of nine, vertically: the bar moves one row, and nothing is left where it was.
    np.testing.assert_allclose(moved, torch.roll(x.reshape(9, 9), shifts=-1, dims=0), atol=1e-5)


def test_random_affine_is_seeded_bounded_and_keeps_channels():
    x = torch.rand(64, 2 * 8 * 8)
    a = random_affine(x, (2, 8, 8), rotation=15, shift=0.1, generator=torch.Generator().manual_seed(3))
    b = random_affine(x, (2, 8, 8), rotation=15, shift=0.1, generator=torch.Generator().manual_seed(3))
    c = random_affine(x, (2, 8, 8), rotation=15, shift=0.1, generator=torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, x)
    # Off: the rows come back as they were.
    np.testing.assert_allclose(random_affine(x, (2, 8, 8), rotation=0, shift=0,
                                             generator=torch.Generator().manual_seed(3)), x, atol=1e-6)
    # A rotation of at most 15 degrees never turns the bar upright: its row keeps most of the mass.
    bars = _bar().repeat(200, 1)
    out = random_affine(bars, (9, 9), rotation=15, shift=0, generator=torch.Generator().manual_seed(0))
    assert (out.reshape(200, 9, 9)[:, 3:6].sum(dim=(1, 2)) > 0.9 * out.sum(dim=1)).all()


# ---- bfloat16 ----------------------------------------------------------------------------------------


def test_affine_never_leaves_the_input_range():
    # Bilinear weights do not sum to exactly 1 in float32: without a clamp, saturated pixels (255) came out as
    # 255.00003 and a VAE with the bce loss refused the batch after the / 255 normalisation.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (512, 784), generator=g).float()
    x[x < 128], x[x > 200] = 0.0, 255.0
    y = random_affine(x, (28, 28), rotation=20, shift=0.075, generator=g)
    assert float(y.min()) == 0.0 and float(y.max()) == 255.0
    assert float((y * torch.tensor(1 / 255, dtype=torch.float32)).max()) <= 1.0
    # Negative inputs keep their range too; what moves in from outside is the background, inside it.
    z = random_affine(x - 300.0, (28, 28), rotation=20, shift=0.075, generator=g)
    assert float(z.min()) >= -300.0 and float(z.max()) <= -45.0


def test_what_comes_in_from_outside_is_the_image_background():
    # A dark bar on a white ground (MNIST inverted): a shift brings in white, not black.
    x = 1.0 - _bar()
    moved = affine(x, (9, 9), torch.zeros(1), torch.tensor([[0.0, 1 / 9]])).reshape(9, 9)
    np.testing.assert_allclose(moved, torch.roll(x.reshape(9, 9), shifts=-1, dims=0), atol=1e-5)
    assert float(moved[-1].min()) == pytest.approx(1.0)
    # Every pixel of a plain image stays its value, whatever the turn and move; per image and per channel.
    plain = torch.tensor([[3.0] * 49 + [7.0] * 49, [5.0] * 98])
    out = random_affine(plain, (2, 7, 7), rotation=45, shift=0.3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out, plain, atol=1e-5)
    # A stroke touching the edge does not make the background: the median of the ring.
    touching = _bar()
    touching[0, 4 * 9:5 * 9] = 1.0  # the bar runs through both side edges
    np.testing.assert_allclose(background(touching.reshape(1, 1, 9, 9)).flatten(), [0.0])


def test_mixed_precision_forward_gives_float32_and_close_losses():
    torch.manual_seed(0)
    model = build_model("mlp_ae", in_dim=16, latent_dim=3, hidden=[32])
    x = torch.rand(128, 16)
    assert mixed_precision(model, "fp32") is model
    recon, z = mixed_precision(model, "bf16")(x)
    assert recon.dtype == torch.float32 and z.dtype == torch.float32
    full, _ = model.loss(x)
    half, _ = model.loss(x, forward=mixed_precision(model, "bf16"))
    assert half.item() == pytest.approx(full.item(), rel=2e-2) and half.item() != full.item()
    with pytest.raises(ValueError, match=r"train.precision='fp16' should be one of \['fp32', 'bf16'\]"):
        mixed_precision(model, "fp16")


def test_bf16_epoch_trains_float32_weights():
    torch.manual_seed(0)
    model = build_model("mlp_ae", in_dim=8, latent_dim=2, hidden=[16])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(256, 2) @ torch.randn(2, 8)
    first = run_epoch(model, opt, x.split(32), precision="bf16")["loss"]
    for _ in range(4):
        last = run_epoch(model, opt, x.split(32), precision="bf16")["loss"]
    assert last < 0.5 * first
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- settings ----------------------------------------------------------------------------------------


def test_augment_settings_are_checked():
    with pytest.raises(ConfigError, match=r"'train.augment.shift'"):
        config_from_dict({"train": {"augment": {"shift": 0.5}}})
    with pytest.raises(ConfigError, match=r"'train.augment.rotation'"):
        config_from_dict({"train": {"augment": {"rotation": -1}}})
    with pytest.raises(ConfigError, match=r"'train.precision'"):
        config_from_dict({"train": {"precision": "fp16"}})
    # Rows without an image shape cannot be rotated: refused before any data is read.
    blobs = config_from_dict({"data": {"source": "blobs", "n_samples": 100}, "train": {"augment": {"rotation": 10}}})
    with pytest.raises(ConfigError, match=r"train.augment=.*no image shape.*train.augment.rotation=0"):
        open_input(blobs)
    digits = config_from_dict({"train": {"augment": {"rotation": 10}}})
    assert open_input(digits).image_shape == (8, 8)


# ---- Ray Train -----------------------------------------------------------------------------------------


def test_ray_train_with_augmented_images_in_bf16(digits_run):
    """Two Ray Train workers of a `dce run` (conftest's `digits_run`) transform every row of every epoch (their
    counts, all-reduced, are in the history) and train in bf16 (fp32 on a CPU without native bfloat16) to a falling
    loss; what the transform does is tested above, without Ray."""
    cfg = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert cfg["train"]["augment"] == {"rotation": 20.0, "shift": 0.1} and cfg["train"]["precision"] == "bf16"
    manifest = read_manifest(digits_run / "model", stage="train")
    assert manifest["num_workers"] == 2
    # train.steps=35 in batches of 128: 15 batches an epoch over the 1,797 rows, so 3 epochs (the third complete).
    assert cfg["train"]["steps"] == 35 and manifest["epochs"] == 3
    state = load_checkpoint(digits_run / "model")
    history = state["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # Every row a worker trained on was transformed; an equal split over 2 workers leaves out at most 1 row.
    assert all(h["augmented_rows"] == h["rows"] >= 1797 - 1 for h in history), history
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(p.dtype == torch.float32 for p in state["state_dict"].values() if p.is_floating_point())


def test_the_count_of_augmented_rows_is_bookkeeping_not_a_loss_term():
    record = {"epoch": 2, "loss": 0.25, "reconstruction": 0.25, "rows": 1796.0, "augmented_rows": 1796.0,
              "seconds": 1.5}
    assert epoch_terms(record) == "loss 0.25  reconstruction 0.25"
    assert history_terms([record]) == ["loss", "reconstruction"]
    assert _scalars(record, "train/") == {"train/loss": 0.25, "train/reconstruction": 0.25, "train/seconds": 1.5}


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bfloat16(monkeypatch):
    assert native_precision("bf16", "cpu", cpu_has_bf16=True) == "bf16"
    with pytest.warns(RuntimeWarning, match=r"train.precision=bf16: this CPU has no native bfloat16"):
        assert native_precision("bf16", "cpu", cpu_has_bf16=False) == "fp32"
    # A GPU with native bfloat16 (Ampere or newer; tests/test_gpu_cluster.py has the others) and fp32 are left alone,
    # whatever the CPU.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert native_precision("bf16", "cuda", cpu_has_bf16=False) == "bf16"
    assert native_precision("fp32", "cpu", cpu_has_bf16=False) == "fp32"
    # Without the override it asks this machine's CPU.
    here = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native_precision("bf16", "cpu") == ("bf16" if here else "fp32")
    assert len(caught) == (0 if here else 1)
