"""The reference of the DDP parity tests: a model trained in this process by the plain-torch loop, no Ray.

A Ray Train run costs ~16 s here whatever its size (controller, worker processes, gloo, Ray Data's split), and a
1-worker run was only ever the reference the 2-worker run is held to. This trains as one Ray Train worker does
(`engine.train.trainer`): the run's seed set before the model is built, inputs normalised by shift and scale, full
batches of `train.batch_size` rows, a model's `begin_epoch` on every row before its epoch; and it saves the
checkpoint a run's model folder holds, so the tests read both runs alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models import build_model
from engine.train import save_checkpoint
from engine.train.checkpoint import FILENAME
from engine.train.loop import configure_optimizers, train


def train_in_process(rows: np.ndarray, *, shift: np.ndarray, scale: np.ndarray, model: dict[str, Any], train_cfg: Any,
                     seed: int, out: Path, image_shape: list[int] | None = None) -> Path:
    """Train `model` on `rows` ((n, d) float32, in id order) as one worker would; returns the folder holding its
    checkpoint (a run's `model/`)."""
    torch.manual_seed(seed)  # as every worker does, before the model's initial weights
    shape = list(image_shape) if image_shape else None
    net = build_model(in_dim=rows.shape[1], image_shape=shape, **model)
    optimizers = configure_optimizers(net, train_cfg.lr, train_cfg.weight_decay)
    shift_t = torch.as_tensor(np.asarray(shift, dtype=np.float32))
    scale_t = torch.as_tensor(np.asarray(scale, dtype=np.float32))
    x = (torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) - shift_t) * scale_t

    def epoch_batches(epoch: int) -> Iterator[torch.Tensor]:
        # A generator, as the worker's: begin_epoch runs once the loop has put the model in training mode.
        if hasattr(net, "begin_epoch"):
            net.begin_epoch(epoch, rows=lambda: iter([x]), gather=lambda a: a)
        yield from x.split(train_cfg.batch_size)

    history = train(net, optimizers, epoch_batches, epochs=train_cfg.epochs)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / FILENAME, model=net, shift=np.asarray(shift, dtype=np.float32),
                    scale=np.asarray(scale, dtype=np.float32), epoch=train_cfg.epochs, history=history,
                    optimizers={name: opt.state_dict() for name, opt in optimizers.items()}, image_shape=shape)
    return out


def refine_in_process(rows: np.ndarray, *, pretrained: Path, centers: np.ndarray, name: str, refine: Any, seed: int,
                      out: Path) -> dict[str, Any]:
    """Refine the model in `pretrained` with DEC or IDEC (`name`) on `rows` (in the order one worker reads them) as
    the single worker of `engine.train.refine.refine_model` would; writes its checkpoint to `out` (a run's
    `refined/`) and returns what refine_model returns of it: rows, stopped, history."""
    from engine.train import load_checkpoint
    from engine.train.refine import refine_loop

    state = load_checkpoint(pretrained)
    base_args = dict(state["model"])
    base = base_args.pop("name")
    centers = np.ascontiguousarray(centers, dtype=np.float32)
    model_args = {"name": name, **base_args, "base": base, "n_clusters": len(centers), "alpha": refine.alpha,
                  **({"gamma": refine.gamma} if name == "idec" else {})}
    torch.manual_seed(seed)
    net = build_model(**model_args)
    net.autoencoder.load_state_dict(state["state_dict"])
    with torch.no_grad():
        net.centers.copy_(torch.from_numpy(centers))
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=refine.lr)
    x = (torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)) - state["input"]["shift"]) \
        * state["input"]["scale"]
    history, stopped = refine_loop(net, optimizer, x, update_interval=refine.update_interval, max_iter=refine.max_iter,
                                   tol=refine.tol, batch_size=max(1, min(refine.batch_size, len(x))),
                                   seed=seed * 100_003)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / FILENAME, model=net, shift=state["input"]["shift"].numpy(),
                    scale=state["input"]["scale"].numpy(), epoch=int(history[-1]["iteration"]), history=history,
                    image_shape=state["input"]["image_shape"])
    return {"rows": int(history[-1]["rows"]), "stopped": stopped, "history": history}
