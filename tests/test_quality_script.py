"""benchmarks/quality.py's input variants (issue 26 item 3) on the digits, without Ray: what each writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.data.describe import normalisation  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("digits")
    return cfg, *quality._pixels(cfg)


def test_float16_rounds_the_rows_as_the_model_sees_them(digits, tmp_path):
    """The default recipe centres the digits (`normalize: center`): what that normalisation makes of the perturbed
    rows is the centred rows rounded to float16; the raw scale is kept (blank pixels stay about 0)."""
    cfg, x, _ = digits
    assert cfg.data.normalize == "center"
    new = load_config("digits", quality.perturbed_input(cfg, "float16", tmp_path / "f16"))
    assert new.data.normalize == "center"

    def seen(rows):
        shift, scale = normalisation("center", n=len(rows), s=rows.sum(0, dtype=np.float64),
                                     sq=np.square(rows, dtype=np.float64).sum(0), lo=rows.min(0), hi=rows.max(0))
        return (rows - shift) * scale

    before, after = seen(x), seen(np.load(tmp_path / "f16" / "x.npy").reshape(len(x), -1))
    rounded = before.astype(np.float16).astype(np.float32)
    assert not np.array_equal(rounded, before) and 0 < np.abs(after - before).max() < 2e-3
    np.testing.assert_allclose(after, rounded, atol=2e-4)
    raw = np.load(tmp_path / "f16" / "x.npy").reshape(len(x), -1)
    np.testing.assert_allclose(raw, x, atol=16 * 2e-3)


def test_float16_that_changes_nothing_the_model_sees_is_refused(tmp_path):
    """`digits_vae` divides the digits' 0..16 by 16: float16 holds every such value, so there is nothing to run."""
    cfg = load_config("digits_vae")
    with pytest.raises(quality.SameInput, match="float16 holds every value of its input exactly"):
        quality.perturbed_input(cfg, "float16", tmp_path / "f16")
    assert not (tmp_path / "f16").exists()


@pytest.mark.parametrize("kind", quality.PERTURBATIONS + quality.VARIANTS)
def test_every_variant_writes_a_data_set_the_config_reads(kind, digits, tmp_path):
    cfg, x, y = digits
    overrides = quality.perturbed_input(cfg, kind, tmp_path / kind, seed=3)
    new = load_config("digits", overrides)
    assert new.data.source == "npy"
    x2, y2 = np.load(tmp_path / kind / "x.npy"), np.load(tmp_path / kind / "y.npy")
    flat = x2.reshape(len(x2), -1)
    if kind == "invert":
        np.testing.assert_array_equal(flat, x.max() - x)
    elif kind == "rotate90":
        assert x2.shape[-2:] == (8, 8)
        np.testing.assert_array_equal(np.rot90(x2[0].reshape(8, 8), -1).ravel(), x[0])
    elif kind == "rescale16":
        assert x2.shape[-2:] == (16, 16) and np.isclose(flat.mean(), x.mean(), rtol=0.05)
    elif kind == "heldout":
        assert set(np.unique(y2)) == set(range(5)) and new.cluster.k == 5
        np.testing.assert_array_equal(flat, x[y < 5])
    elif kind == "drop1":
        assert len(x2) == len(x) - len(x) // 100
    elif kind == "float16":
        assert flat.shape == x.shape and not np.array_equal(flat, x)
    if kind not in ("drop1", "heldout"):
        np.testing.assert_array_equal(y2, y)


def test_generalisation_table_puts_each_recipe_on_every_input_beside_its_own():
    def line(data, config, acc, seed, impl="mlp_ae + umap + gmm"):
        return {"data": data, "config": config, "impl": impl, "acc": acc, "seed": seed}

    rows = {
        "digits": [line("digits", "scikit-learn", 0.70, 0, "kmeans_pixels"), line("digits", "digits", 0.90, 0),
                   line("digits", "digits", 0.92, 1), line("digits", "digits [drop1]", 0.93, 0)],
        "digits-invert": [line("digits-invert", "scikit-learn", 0.60, 0, "kmeans_pixels"),
                          line("digits-invert", "digits [invert]", 0.80, 0),
                          line("digits-invert", "digits [invert]", 0.82, 1)],
    }
    header, table = quality.generalisation_table(rows)
    assert header == ["recipe", "digits", "digits [drop1]", "digits-invert", "largest ACC loss (points)"]
    assert table == [["k-means on the pixels", "0.700 (1)", "-", "0.600 (1)", "+10.0"],
                     ["`digits`", "0.910 ± 0.010 (2)", "0.930 (1)", "0.810 ± 0.010 (2)", "+10.0"]]
    # Only the inputs as they are: no generalisation to show.
    assert quality.generalisation_table({"digits": rows["digits"][:3]}) is None


def test_a_recipe_on_another_data_set_is_named_by_that_data_set():
    assert quality.dataset_name(load_config("mnist_n2d").data) == "mnist"
    assert quality.dataset_name(load_config("digits").data) == "digits"
    # `--set data=...`: the MNIST recipe, unchanged but for its input, on the digits (a table of the digits).
    other = load_config("mnist_n2d", ["data={source: digits, normalize: center}"])
    assert other.train.steps == 11000 and quality.dataset_name(other.data) == "digits"


def test_configs_reading_one_input_read_one_perturbed_copy(tmp_path):
    """mnist_ae (normalize max) and mnist_n2d (center) read the same files: one perturbed copy for both, so that with
    the same normalisation (--set data.normalize=...) they share a train stage; another input gets its own."""
    ae, n2d = load_config("mnist_ae"), load_config("mnist_n2d")
    assert ae.data.normalize != n2d.data.normalize
    folder = quality.input_folder(tmp_path, ae, "drop1")
    assert folder == quality.input_folder(tmp_path, n2d, "drop1")
    assert folder != quality.input_folder(tmp_path, ae, "invert")
    other = load_config("mnist_ae", ["data.images=[../shared/data/mnist/t10k-images-idx3-ubyte.gz]"])
    assert quality.input_folder(tmp_path, other, "drop1") != folder
    assert folder.parent == tmp_path and folder.name.startswith("input-mnist-drop1-")


def test_the_pixel_peer_restarts_as_often_whatever_the_order_of_the_configs(monkeypatch):
    """The peer took the first config's `cluster.n_init`: `digits_conv` (one GMM start) listed first gave k-means on
    the pixels one restart (digits seed 0: ACC 0.706 against 0.792 with 10). Now the most any config uses, at
    least 10, and the table says how many."""
    conv, default = load_config("digits_conv"), load_config("digits")
    idec = load_config("digits_idec", ["cluster.method=kmeans", "cluster.manifold=none", "cluster.n_init=20"])
    assert (conv.cluster.n_init, default.cluster.n_init, idec.cluster.n_init) == (1, 10, 20)
    assert quality.peer_restarts([conv]) == 10
    assert quality.peer_restarts([conv, default]) == quality.peer_restarts([default, conv]) == 10
    assert quality.peer_restarts([conv, idec, default]) == quality.peer_restarts([idec, conv]) == 20

    appended = []
    monkeypatch.setattr(quality, "append_section", lambda title, header, table, notes: appended.append(table))
    peer = {"data": "digits", "config": "scikit-learn", "impl": "kmeans_pixels", "seed": 0, "restarts": 10,
            "acc": 0.79, "nmi": 0.74, "ari": 0.67, "seconds": 0.1}
    old = {k: v for k, v in peer.items() if k != "restarts"}  # a line recorded before the restarts were
    args = type("Args", (), {"overrides": [], "no_share": False})()
    quality._record("digits", [peer], args)
    quality._record("digits", [old], args)
    assert appended[0][0][0] == "k-means on the pixels (scikit-learn, 10 restarts)"
    assert appended[1][0][0] == "k-means on the pixels (scikit-learn)"
