"""The MLP autoencoder of DEC (Xie et al. 2016): d-500-500-2000-latent, ReLU, mirrored decoder, MSE loss."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.registry import register_model
from engine.widths import MLP_HIDDEN


@dataclass
class MLPAutoencoderConfig:
    in_dim: int  # features of a flattened input row
    latent_dim: int = 10  # DEC uses 10 for MNIST-size data
    hidden: list[int] = field(default_factory=lambda: list(MLP_HIDDEN))  # encoder widths; decoder mirrors
    dropout: float = 0.0  # on the input only (a denoising AE when > 0)


class MLPAutoencoder(nn.Module):
    def __init__(self, cfg: MLPAutoencoderConfig):
        super().__init__()
        if cfg.in_dim < 1:
            raise ConfigError(f"the input has {cfg.in_dim} features; the autoencoder needs at least 1")
        if cfg.latent_dim < 1:
            raise ConfigError(f"model.latent_dim={cfg.latent_dim} should be >= 1")
        self.cfg = cfg
        widths = [cfg.in_dim, *cfg.hidden, cfg.latent_dim]
        self.encoder = _mlp(widths)
        self.decoder = _mlp(widths[::-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = F.dropout(x, self.cfg.dropout, self.training) if self.cfg.dropout else x
        z = self.encoder(noisy)
        return self.decoder(z), z

    def loss(self, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE reconstruction loss; `forward` is the callable to run (a DDP wrapper of self, or self)."""
        recon, _ = (forward or self)(x)
        mse = F.mse_loss(recon, x)
        return mse, {"reconstruction": float(mse.detach())}


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:  # no activation on the latent code or the reconstruction
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@register_model("mlp_ae")
def build_mlp_autoencoder(*, in_dim: int, latent_dim: int = 10, hidden: list[int] | None = None,
                          dropout: float = 0.0) -> MLPAutoencoder:
    # Images reach an MLP as flat rows: it takes no image_shape.
    return MLPAutoencoder(MLPAutoencoderConfig(in_dim=in_dim, latent_dim=latent_dim,
                                               hidden=list(MLP_HIDDEN if hidden is None else hidden),
                                               dropout=dropout))
