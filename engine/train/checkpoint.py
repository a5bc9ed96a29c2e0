"""Encoder checkpoints: weights, the model's build arguments and the input normalisation, loadable without pickle."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import storage
from engine.errors import CheckpointError

FORMAT = "dce-checkpoint/1"
FILENAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, shift: np.ndarray, scale: np.ndarray,
                    epoch: int, history: list[dict[str, float]], optimizers: dict[str, dict] | None = None,
                    image_shape: tuple[int, ...] | None = None, config_hash: str = "",
                    starts: list[int] | None = None) -> None:
    """Write a checkpoint file atomically (temp file + rename); `optimizers` maps names to their state dicts;
    `starts`: the epoch each training attempt started from (more than one after a worker failure or a resume)."""
    from engine.version import __version__

    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    state = {
        "format": FORMAT,
        "engine_version": __version__,
        "model": dict(module.build_args),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "input": {
            "shift": torch.as_tensor(np.asarray(shift, dtype=np.float32)),
            "scale": torch.as_tensor(np.asarray(scale, dtype=np.float32)),
            "image_shape": list(image_shape) if image_shape else None,
        },
        "epoch": int(epoch),
        "history": [{k: float(v) for k, v in h.items()} for h in history],
        "optimizers": optimizers,
        "config_hash": config_hash,
        "starts": [int(s) for s in starts or [0]],
    }
    with storage.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file, or the one in a folder, from a local path or an object-store URI, with
    `weights_only=True`: tensors and plain containers only, never arbitrary pickle."""
    from engine import storage

    if storage.is_uri(path):
        if not storage.is_file(path):
            path = storage.join(path, FILENAME)
        if not storage.is_file(path):
            raise CheckpointError(f"{path}: checkpoint not found")
        source: Path | io.BytesIO = io.BytesIO(storage.read_bytes(path))
    else:
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        source = path
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Deep Cluster Engine checkpoint (format {FORMAT} expected)")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model from the checkpoint alone (its build arguments and weights)."""
    from engine.models import build_model

    args = dict(state["model"])
    name = args.pop("name")
    model = build_model(name, **args)
    model.load_state_dict(state["state_dict"])
    return model


def check_input_dim(state: dict[str, Any], dim: int, *, where: str) -> None:
    expected = int(state["model"]["in_dim"])
    if expected != dim:
        raise CheckpointError(
            f"{where}: the checkpoint's model takes {expected} input features but the data has {dim}"
        )
