"""A Gaussian VAE (Kingma & Welling 2014) with DEC-sized MLPs; `encode` gives the posterior means.

The encoder maps a row to the mean and log-variance of a diagonal Gaussian q(z|x); training samples
z = mu + sigma * eps (the reparameterisation trick, so gradients reach mu and sigma) and decodes it.
Loss per row: reconstruction + beta * KL(q(z|x) || N(0, I)), each summed over its features (pixels,
latent dimensions), then averaged over the batch, the convention of the VAE paper and VaDE. With
recon_loss=mse the reconstruction is the sum of squared errors (a unit-variance Gaussian decoder,
up to a constant and a factor 2); with bce the decoder outputs logits of Bernoulli pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError, DataError
from engine.models.registry import register_model
from engine.widths import MLP_HIDDEN

RECON_LOSSES = ("mse", "bce")


@dataclass
class VAEConfig:
    in_dim: int  # features of a flattened input row
    latent_dim: int = 10  # VaDE uses 10 for MNIST
    hidden: list[int] = field(default_factory=lambda: list(MLP_HIDDEN))  # encoder widths; decoder mirrors
    beta: float = 1.0  # weight of the KL term; 1 is the plain VAE
    recon_loss: str = "mse"  # mse: squared error; bce: Bernoulli pixels, inputs in [0, 1]
    dropout: float = 0.0  # on the input only
    center_input: bool = False  # the encoder reads 2x - 1: inputs in [0, 1] centred on 0 (see CenterUnit)


class CenterUnit(nn.Module):
    """x -> 2x - 1: inputs in [0, 1] centred on 0 before the encoder reads them; the decoder still models x.

    Bernoulli pixels (recon_loss bce) need inputs in [0, 1], so the data cannot be centred before the model as
    `data.normalize: center` does for squared error. An encoder that reads raw [0, 1] pixels trains differently on
    an image set and on its inverse (dark on light): the inverse's background feeds every first-layer unit a large
    constant. Read as 2x - 1, an inverted image is the negative of its original, and the encoder's and decoder's
    initial weights are symmetric about 0, so both train alike (in distribution; the logits' sign flips with the
    targets)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * x - 1.0


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) of each row, in closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """The batch mean of each row's reconstruction term, summed over its features: squared error (`mse`), or
    Bernoulli cross-entropy of the decoder's logits (`bce`, inputs in [0, 1])."""
    if kind == "bce":
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"model.recon_loss='bce' needs inputs in [0, 1], but a batch spans [{lo:.4g}, "
                            f"{hi:.4g}]; use data.normalize=minmax (or max on non-negative data), or mse")
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(dim=1).mean()
    return (out - x).pow(2).sum(dim=1).mean()


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """A sample of N(mu, diag(exp(logvar))) that is differentiable in mu and logvar."""
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.in_dim < 1:
            raise ConfigError(f"the input has {cfg.in_dim} features; the VAE needs at least 1")
        if cfg.latent_dim < 1:
            raise ConfigError(f"model.latent_dim={cfg.latent_dim} should be >= 1")
        if cfg.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"model.recon_loss={cfg.recon_loss!r} should be one of {list(RECON_LOSSES)}")
        if cfg.beta < 0:
            raise ConfigError(f"model.beta={cfg.beta} should be >= 0")
        self.cfg = cfg
        # No parameters: the checkpoint's keys do not depend on it.
        self.input_map: nn.Module = CenterUnit() if cfg.center_input else nn.Identity()
        widths = [cfg.in_dim, *cfg.hidden]
        body: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            body += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*body)
        self.mu = nn.Linear(widths[-1], cfg.latent_dim)
        self.logvar = nn.Linear(widths[-1], cfg.latent_dim)
        out = [cfg.latent_dim, *widths[::-1]]
        decoder: list[nn.Module] = []
        for a, b in zip(out[:-1], out[1:], strict=True):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        self.decoder = nn.Sequential(*decoder[:-1])  # no activation on the output (values or logits)

    def posterior(self, x: torch.Tensor, noisy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z|x); `noisy`: with the input dropout of training (after the centring, so
        a dropped pixel reads as 0 whichever way the image is lit)."""
        h = self.input_map(x)
        if noisy and self.cfg.dropout and self.training:
            h = F.dropout(h, self.cfg.dropout, True)
        h = self.encoder(h)
        return self.mu(h), self.logvar(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder output for a sampled z: values for mse, logits for bce; mu; logvar)."""
        mu, logvar = self.posterior(x, noisy=True)
        return self.decoder(reparameterize(mu, logvar)), mu, logvar

    def loss(self, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative ELBO (beta-weighted); `forward` is the callable to run (a DDP wrapper of self, or self)."""
        out, mu, logvar = (forward or self)(x)
        recon = reconstruction_loss(out, x, self.cfg.recon_loss)
        kl = kl_divergence(mu, logvar).mean()
        return recon + self.cfg.beta * kl, {"reconstruction": float(recon.detach()), "kl": float(kl.detach())}


@register_model("vae")
def build_vae(*, in_dim: int, latent_dim: int = 10, hidden: list[int] | None = None, dropout: float = 0.0,
              beta: float = 1.0, recon_loss: str = "mse", center_input: bool = False) -> VAE:
    # An MLP VAE: images reach it as flat rows.
    return VAE(VAEConfig(in_dim=in_dim, latent_dim=latent_dim,
                         hidden=list(MLP_HIDDEN if hidden is None else hidden),
                         beta=beta, recon_loss=recon_loss, dropout=dropout, center_input=center_input))
