"""The model-agnostic training loop in plain torch (no Ray): epochs of batches, callbacks at epoch end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

EpochBatches = Callable[[int], Iterable[torch.Tensor]]
"""epoch -> the batches of that epoch (already on the model's device)."""


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """One pass: returns row-weighted sums of each loss term and the row count (for exact averaging)."""
    model.train()
    core = model.module if hasattr(model, "module") else model
    sums: dict[str, float] = {}
    rows = 0
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        # The forward must go through the DDP wrapper (it arms the gradient all-reduce); the loss
        # terms are the model's own, so the model gets the wrapper to call.
        loss, terms = core.loss(x, forward=model)
        loss.backward()
        optimizer.step()
        n = x.shape[0]
        rows += n
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
    sums["rows"] = float(rows)
    return sums


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch_batches: EpochBatches, *,
          epochs: int, start_epoch: int = 0,
          reduce: Callable[[dict[str, float]], dict[str, float]] = lambda s: s,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> list[dict[str, float]]:
    """Train from `start_epoch` to `epochs`; `reduce` sums the epoch's stats over workers (identity alone)."""
    history = []
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        sums = reduce(run_epoch(model, optimizer, epoch_batches(epoch)))
        rows = max(sums.pop("rows"), 1.0)
        metrics = {k: v / rows for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, rows=rows)
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, metrics)
    return history
