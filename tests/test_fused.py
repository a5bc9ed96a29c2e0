"""The fused distance + argmin kernel (engine/cluster/_fused.py) in Triton's interpreter, against plain torch.

The interpreter runs the kernel's own code on CPU tensors; what it cannot show (speed, the compiled
bfloat16 dot) benchmarks/gpu.py checks on a CUDA device against the same reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.cluster._fused import available, fused_assign, reference_assign


def _triton_interprets() -> bool:
    """Import triton in interpreter mode; False when it was imported before in compiled mode.

    Triton decorates its own jitted helpers (tl.min, tl.max, ...) when it is imported, in the mode
    TRITON_INTERPRET says at that moment, and the interpreter cannot call compiled-mode helpers.
    """
    if "triton" not in sys.modules:
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        finally:
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.min, InterpretedFunction)


if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the fused kernel cannot be interpreted here", allow_module_level=True)
if not _triton_interprets():
    pytest.skip("triton was imported before this module, in compiled mode: run tests/test_fused.py in a "
                "process of its own", allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _data(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(k, d, generator=g) * 2
    X = C[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return X, C, (C * C).sum(dim=1)


def _assert_same(fused, reference, *, rtol: float = 1e-5):
    labels, best, second = fused
    ref_labels, ref_best, ref_second = reference
    scale = ref_best.abs().max().item() + 1
    torch.testing.assert_close(best, ref_best, rtol=0, atol=rtol * scale)
    torch.testing.assert_close(second, ref_second, rtol=0, atol=rtol * scale)
    # Labels may differ only where the reference itself cannot tell the two best apart.
    differ = labels != ref_labels
    assert (ref_second[differ] - ref_best[differ] <= rtol * scale).all()
    assert differ.float().mean() < 0.01


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("n,d,k", [(300, 10, 37), (257, 64, 130), (129, 128, 20), (40, 3, 200)])
def test_fused_matches_torch(n, d, k, precision):
    X, C, c_sq = _data(n, d, k)
    labels, best, second = out = fused_assign(X, C, c_sq, precision=precision)
    assert labels.dtype == torch.int64 and best.dtype == second.dtype == torch.float32
    assert labels.shape == best.shape == second.shape == (n,)
    assert (second >= best).all()
    _assert_same(out, reference_assign(X, C, c_sq, precision=precision))


@pytest.mark.parametrize("block_rows,block_centroids", [(16, 16), (64, 32), (128, 128)])
def test_fused_block_sizes(block_rows, block_centroids):
    X, C, c_sq = _data(200, 16, 100, seed=1)
    out = fused_assign(X, C, c_sq, block_rows=block_rows, block_centroids=block_centroids)
    _assert_same(out, reference_assign(X, C, c_sq))


def test_fused_bfloat16_inputs_and_strided_rows():
    X, C, c_sq = _data(100, 24, 50, seed=2)
    wide = torch.zeros(100, 48)
    wide[:, ::2] = X
    wide = wide[:, ::2]  # X again, as a view with stride 2 along the features
    assert wide.stride(1) == 2
    _assert_same(fused_assign(wide, C, c_sq), reference_assign(X, C, c_sq))
    Xb, Cb = X.bfloat16(), C.bfloat16()
    for precision in ("fp32", "bf16"):
        _assert_same(fused_assign(Xb, Cb, c_sq, precision=precision),
                     reference_assign(Xb, Cb, c_sq, precision=precision))


def test_fused_ties_one_centroid_and_no_rows():
    X, C, c_sq = _data(64, 8, 40, seed=3)
    # Centroid 37 repeats centroid 5 (in another tile with 16-wide tiles): the lower index wins, and the
    # second best equals the best.
    C[37] = C[5]
    c_sq = (C * C).sum(dim=1)
    labels, best, second = fused_assign(X, C, c_sq, block_centroids=16)
    near_5 = labels == 5
    assert near_5.any() and not (labels == 37).any()
    assert torch.equal(best[near_5], second[near_5])
    labels, best, second = fused_assign(X, C[:1], c_sq[:1])
    assert (labels == 0).all() and torch.isinf(second).all()
    torch.testing.assert_close(best, c_sq[0] - 2 * X @ C[0])
    labels, best, second = fused_assign(X[:0], C, c_sq)
    assert labels.shape == best.shape == second.shape == (0,)


def test_fused_bad_input(monkeypatch):
    X, C, c_sq = _data(10, 8, 4)
    with pytest.raises(ValueError, match="X has 8 features but the centroids have 7"):
        fused_assign(X, C[:, :7], c_sq)
    with pytest.raises(ValueError, match="at most 128"):
        fused_assign(torch.zeros(3, 129), torch.zeros(2, 129), torch.zeros(2))
    with pytest.raises(ValueError, match="c_sq should be float32 of shape"):
        fused_assign(X, C, c_sq.double())
    with pytest.raises(ValueError, match="precision='fp16' should be one of"):
        fused_assign(X, C, c_sq, precision="fp16")
    with pytest.raises(ValueError, match="X should be float32 or bfloat16"):
        fused_assign(X.half(), C, c_sq)
    with pytest.raises(ValueError, match="block_rows=48 should be a power of two"):
        fused_assign(X, C, c_sq, block_rows=48)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on a CUDA device .* X is on cpu"):
        fused_assign(X, C, c_sq)


def test_available_only_on_cuda_and_import_needs_no_triton():
    assert not available("cpu")
    assert available("cuda") == (torch.cuda.is_available())
    # Importing the module (what engine.cluster does) must not import triton: a CPU install has none.
    code = "import sys, engine.cluster._fused; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# Compiles the kernel for an H100/H200 (sm_90) without a GPU, in a process of its own (this one runs Triton's
# interpreter), and reads each default configuration's registers with the cuobjdump that Triton ships.
_COMPILE = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.cluster import _fused, _fused_kernel

kernel = _fused_kernel.assign_rows_kernel()
pointers = {"x_ptr": "*fp32", "c_ptr": "*fp32", "c_sq_ptr": "*fp32", "labels_ptr": "*i64", "best_ptr": "*fp32",
            "second_ptr": "*fp32", "n": "i32", "k": "i32", "stride_x": "i32", "stride_c": "i32"}
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = {}
for d, precision in json.loads(sys.argv[1]):
    config = _fused.kernel_config(d, precision)
    options = {key: config.pop(key) for key in ("num_warps", "num_stages")}
    source = ASTSource(fn=kernel, signature={**pointers, **{key: "constexpr" for key in config}}, constexprs=config)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    usage = None
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        usage = [int(v) for v in re.search(r"REG:(\\d+) STACK:(\\d+)", text).groups()]
    out[f"{d} {precision}"] = {"usage": usage, "wgmma": "wgmma" in compiled.asm["ptx"]}
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90_without_spills():
    cases = [[d, p] for d in (10, 16, 32, 64, 128) for p in ("fp32", "tf32", "bf16")]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == len(cases)
    for key, r in results.items():
        # tf32 and bf16 products on the tensor cores (Hopper's wgmma); IEEE float32 on the FMA units.
        assert r["wgmma"] == (not key.endswith("fp32")), key
        if r["usage"] is not None:
            registers, stack = r["usage"]
            assert stack == 0 and registers <= 255, (key, r)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_device_rows_ranking_through_the_fused_kernel_gives_fp32_labels(precision):
    """The wiring DeviceRows uses on CUDA (engine.cluster._device.nearest with fused=True): the kernel's best and
    second best, the re-check of near ties in fp32, and the winner's distance in fp32."""
    from engine.cluster._device import nearest

    X, C, c_sq = _data(600, 16, 48, seed=4)
    # Rows half-way between two centroids: the ties a low-precision ranking gets wrong.
    X[:150] = (C[torch.arange(150) % 48] + C[(torch.arange(150) + 7) % 48]) / 2 + 1e-3 * torch.randn(150, 16)
    x_sq = (X * X).sum(dim=1)
    labels, sq = nearest(X, x_sq, C, c_sq, precision, fused=True)
    ref_labels, ref_sq = nearest(X, x_sq, C, c_sq, "fp32", fused=False)
    assert (labels != ref_labels).sum() == 0
    torch.testing.assert_close(sq, ref_sq, rtol=1e-4, atol=1e-3)
