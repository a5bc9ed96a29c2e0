"""The model-agnostic training loop in plain torch (no Ray): epochs of batches, callbacks at epoch end.

A model trains by its single `loss(x, forward)` under one Adam optimizer, unless it brings its own steps:
`configure_optimizers(lr, weight_decay) -> {name: optimizer}` and
`train_step(x, optimizers, forward) -> {term: float}` (with a `loss` term), e.g. a GAN's alternating
critic and generator updates. `forward` is the DDP wrapper of the model (or the model): every step's
forward must go through it, since DDP all-reduces only the gradients of a backward its forward armed.
With `precision="bf16"` that forward runs under torch.autocast in bfloat16 (matrix products at twice the
float32 rate on CPUs with AVX512-BF16 or AMX and on recent GPUs) and hands back float32 outputs, so the losses,
the gradients' accumulation and the weights stay float32. A CPU without native bfloat16 trains in float32
(`native_precision`): autocast emulates bfloat16 there, several times slower.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from engine.errors import CheckpointError

EpochBatches = Callable[[int], Iterable[torch.Tensor]]
"""epoch -> the batches of that epoch (already on the model's device)."""

Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model)."""
    return model.module if hasattr(model, "module") else model


def configure_optimizers(model: torch.nn.Module, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    """The model's own named optimizers, or one Adam over all its parameters."""
    core = unwrap(model)
    if hasattr(core, "configure_optimizers"):
        return dict(core.configure_optimizers(lr, weight_decay))
    return {"model": torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)}


def load_optimizer_states(optimizers: Mapping[str, torch.optim.Optimizer], states: Mapping[str, Any],
                          *, where: str = "checkpoint") -> None:
    """Restore each named optimizer's state; the names must be those the checkpoint was saved with."""
    if set(states) != set(optimizers):
        raise CheckpointError(f"{where}: holds the state of optimizers {sorted(states)} but the model "
                              f"trains with {sorted(optimizers)}")
    for name, opt in optimizers.items():
        opt.load_state_dict(states[name])


def native_precision(precision: str, device_type: str, *, cpu_has_bf16: bool | None = None) -> str:
    """The precision to train in on `device_type`: `precision`, except bf16 where the device has no native bfloat16.

    On a CPU without AVX512-BF16 or AMX, autocast emulates bfloat16 and a step runs about 8x slower than in float32
    (measured on a 2-core AMD EPYC without AVX-512): bf16 is a speed setting, so such a CPU trains in float32 and
    says so. A CUDA GPU before Ampere (compute capability < 8.0: V100, T4) has no bfloat16 matrix units either (and
    some of its kernels none at all): it trains in float32 too, with one warning, rather than fail or crawl.
    `cpu_has_bf16` overrides the probe of this machine's CPU (oneDNN's).
    """
    if precision != "bf16" or device_type not in ("cpu", "cuda"):
        return precision
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 0):
            return precision
        warnings.warn(f"train.precision=bf16: this GPU (compute capability {major}.{minor}) has no native bfloat16 "
                      "(Ampere, 8.0, or newer has); training in fp32 instead", RuntimeWarning, stacklevel=2)
        return "fp32"
    if cpu_has_bf16 is None:
        cpu_has_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if cpu_has_bf16:
        return precision
    warnings.warn("train.precision=bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where autocast "
                  "runs several times slower than float32; training in fp32 instead", RuntimeWarning,
                  stacklevel=2)
    return "fp32"


def to_device(x: Any, device: torch.device) -> torch.Tensor:
    """A host array (numpy, or a tensor) on `device`: to a GPU through page-locked memory with a non-blocking copy,
    so the copy overlaps the compute already queued; a writable copy on the CPU (Arrow's buffers are read-only)."""
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(x if x.flags.writeable else x.copy())
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def mixed_precision(model: torch.nn.Module, precision: str) -> Callable[..., Any]:
    """`model`'s forward in `precision` (a key of PRECISIONS) with its floating outputs cast back to float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r} should be one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return model
    device_type = next(model.parameters()).device.type

    def as_float32(out: Any) -> Any:
        if isinstance(out, tuple):
            return tuple(as_float32(o) for o in out)
        if isinstance(out, dict):
            return {k: as_float32(v) for k, v in out.items()}
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            out = model(*args, **kwargs)
        return as_float32(out)

    return forward


def run_epoch(model: torch.nn.Module, optimizer: Optimizers, batches: Iterable[torch.Tensor],
              precision: str = "fp32") -> dict[str, float]:
    """One pass: returns row-weighted sums of each loss term and the row count (for exact averaging)."""
    model.train()
    core = unwrap(model)
    forward = mixed_precision(model, precision)
    if hasattr(core, "train_step"):
        def step(x: torch.Tensor) -> dict[str, float]:
            return core.train_step(x, optimizer, forward=forward)
    else:
        single = optimizer if isinstance(optimizer, torch.optim.Optimizer) else _only(optimizer)

        def step(x: torch.Tensor) -> dict[str, float]:
            single.zero_grad(set_to_none=True)
            # The model computes its own loss terms; it gets the wrapper to call for the forward.
            loss, terms = core.loss(x, forward=forward)
            loss.backward()
            single.step()
            return {"loss": float(loss.detach()), **terms}

    sums: dict[str, float] = {}
    rows = 0
    for x in batches:
        terms = step(x)
        n = x.shape[0]
        rows += n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
    sums["rows"] = float(rows)
    return sums


def _only(optimizers: Mapping[str, torch.optim.Optimizer]) -> torch.optim.Optimizer:
    if len(optimizers) != 1:
        raise ValueError(f"a model without train_step trains with one optimizer, got {sorted(optimizers)}")
    return next(iter(optimizers.values()))


def train(model: torch.nn.Module, optimizer: Optimizers, epoch_batches: EpochBatches, *,
          epochs: int, start_epoch: int = 0, precision: str = "fp32",
          reduce: Callable[[dict[str, float]], dict[str, float]] = lambda s: s,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, float]]:
    """Train from `start_epoch` to `epochs`; `reduce` sums the epoch's stats over workers (identity alone).

    A model with `learning_rate(epoch) -> float | None` sets every optimizer's learning rate for that epoch (VaDE's
    epochs after pretraining, `model.vade_lr`); None keeps the optimizers' own. Asked every epoch, so a resumed run
    trains each epoch at the rate an uninterrupted one would."""
    history = []
    rate = getattr(unwrap(model), "learning_rate", None)
    for epoch in range(start_epoch, epochs):
        lr = rate(epoch) if rate is not None else None
        if lr is not None:
            for opt in [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer.values():
                for group in opt.param_groups:
                    group["lr"] = lr
        t0 = time.perf_counter()
        sums = reduce(run_epoch(model, optimizer, epoch_batches(epoch), precision))
        rows = max(sums.pop("rows"), 1.0)
        metrics = {k: v / rows for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, rows=rows)
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    return history
