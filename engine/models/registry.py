"""Model registry: encoders are built by the name in `model.name`, so new models plug in without pipeline changes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from engine.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = builder
        return builder

    return deco


def model_names() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, *, in_dim: int, image_shape: Sequence[int] | None = None, **options: Any) -> nn.Module:
    """Build a registered model for inputs of `in_dim` features (images of `image_shape` when the source has one).

    `options` may hold every ModelConfig field: each builder receives only the keywords it declares (a
    builder with **kwargs, such as dec / idec passing options on to their base, receives them all), so
    a model's settings never reach another model and `build_args` keeps only what built this one.
    Every model exposes `encode(x) -> z` and `loss(x, forward=None) -> (loss, {term: value})`
    (`forward` is a DDP wrapper of the model when training distributed), and keeps the
    arguments it was built with in `model.build_args` so a checkpoint can rebuild it alone.
    Rows always arrive flat, (n, in_dim); an image model reshapes them with `image_shape`.
    """
    if name not in _MODELS:
        raise ConfigError(f"model.name={name!r} is not a known model; choose one of {model_names()}")
    builder = _MODELS[name]
    # A plain list, not a tuple: checkpoints are loaded with weights_only=True.
    shape = [int(s) for s in image_shape] if image_shape is not None else None
    options = {"image_shape": shape, **options}
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    model = builder(in_dim=in_dim, **options)
    model.build_args = {"name": name, "in_dim": in_dim, **{k: v for k, v in options.items()
                                                           if k != "image_shape" or v is not None}}
    return model
