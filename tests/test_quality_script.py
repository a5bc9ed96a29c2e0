"""benchmarks/quality.py's input variants (issue 26 item 3) on the digits, without Ray: what each writes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402

from engine.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("digits")
    return cfg, *quality._pixels(cfg)


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
        np.testing.assert_array_equal(flat, x.astype(np.float16).astype(np.float32))
    if kind not in ("drop1", "heldout"):
        np.testing.assert_array_equal(y2, y)
