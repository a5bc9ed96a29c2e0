"""The convolutional autoencoder of DCEC (Guo et al. 2017): stride-2 convolutions, a linear code, mirrored decoder.

For 28x28 MNIST the defaults give DCEC's network exactly: conv 32 (5x5) -> 14x14, conv 64 (5x5) -> 7x7,
conv 128 (3x3, no padding) -> 3x3, flatten, linear to the code; then linear, ReLU, and transposed
convolutions back to 28x28. Other image sizes follow the same rule: each convolution halves the size
(padding k // 2, "same"), except the last, which pads nothing when its input size is odd (DCEC's 7 -> 3).
The transposed convolutions get the output padding that restores each size exactly. Rows arrive flat,
(n, C*H*W) or (n, H*W); the model reshapes them with the image shape from the data source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError, DataError
from engine.models.registry import register_model

STRIDE = 2


@dataclass
class ConvAutoencoderConfig:
    in_dim: int  # features of a flattened input row: the product of image_shape
    image_shape: list[int] | None  # (height, width) or (channels, height, width), channels first
    latent_dim: int = 10  # DCEC uses 10 for MNIST
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # one stride-2 convolution each
    kernels: list[int] = field(default_factory=lambda: [5, 5, 3])  # odd kernel size of each convolution
    dropout: float = 0.0  # on the input only (a denoising AE when > 0)


class ConvAutoencoder(nn.Module):
    def __init__(self, cfg: ConvAutoencoderConfig):
        super().__init__()
        _check(cfg)
        self.cfg = cfg
        in_channels, *size = [1, *cfg.image_shape] if len(cfg.image_shape) == 2 else cfg.image_shape
        self.image_shape = (in_channels, *size)
        widths = [in_channels, *cfg.channels]
        encoder: list[nn.Module] = []
        decoder: list[list[nn.Module]] = []  # one block per convolution, outermost first
        for i, k in enumerate(cfg.kernels):
            last = i == len(cfg.kernels) - 1
            pad = tuple(0 if last and s % 2 and s >= k else k // 2 for s in size)
            out = [(s + 2 * p - k) // STRIDE + 1 for s, p in zip(size, pad, strict=True)]
            # The transposed convolution's output is (out - 1) * stride - 2 * pad + k + output_padding:
            # this output padding gives back exactly the size the convolution took.
            restore = tuple(s - ((o - 1) * STRIDE - 2 * p + k) for s, o, p in zip(size, out, pad, strict=True))
            encoder += [nn.Conv2d(widths[i], widths[i + 1], k, stride=STRIDE, padding=pad), nn.ReLU()]
            up = nn.ConvTranspose2d(widths[i + 1], widths[i], k, stride=STRIDE, padding=pad, output_padding=restore)
            decoder.append([up] if i == 0 else [up, nn.ReLU()])  # no activation on the reconstruction
            size = out
        code_shape = (widths[-1], *size)
        flat = math.prod(code_shape)
        self.encoder = nn.Sequential(*encoder, nn.Flatten(), nn.Linear(flat, cfg.latent_dim))
        self.decoder = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.ReLU(), nn.Unflatten(1, code_shape),
                                     *[m for block in decoder[::-1] for m in block])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(-1, *self.image_shape))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Flat reconstructions, like the input rows (IDEC on this autoencoder is DCEC, Guo et al. 2017)."""
        return self.decoder(z).reshape(len(z), -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, flat like `x`; code)."""
        noisy = F.dropout(x, self.cfg.dropout, self.training) if self.cfg.dropout else x
        z = self.encode(noisy)
        return self.decoder(z).reshape(x.shape), z

    def loss(self, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE reconstruction loss; `forward` is the callable to run (a DDP wrapper of self, or self)."""
        recon, _ = (forward or self)(x)
        mse = F.mse_loss(recon, x)
        return mse, {"reconstruction": float(mse.detach())}


def _check(cfg: ConvAutoencoderConfig) -> None:
    if cfg.image_shape is None:
        raise ConfigError(
            f"model.name='conv_ae' needs images, but the data source gives flat vectors of {cfg.in_dim} features "
            "and no image shape; use an image source (digits, idx, 3-D npy) or model.name=mlp_ae"
        )
    shape = list(cfg.image_shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise DataError(f"image shape {shape}: conv_ae takes (height, width) or (channels, height, width) images")
    if math.prod(shape) != cfg.in_dim:
        raise DataError(f"image shape {shape} holds {math.prod(shape)} values but the input rows have "
                        f"{cfg.in_dim} features")
    if cfg.latent_dim < 1:
        raise ConfigError(f"model.latent_dim={cfg.latent_dim} should be >= 1")
    if not cfg.channels:
        raise ConfigError("model.channels is empty; conv_ae needs at least one convolution")
    if len(cfg.kernels) != len(cfg.channels):
        raise ConfigError(f"model.kernels has {len(cfg.kernels)} entries but model.channels has "
                          f"{len(cfg.channels)}; give one kernel size per convolution")
    bad = [k for k in cfg.kernels if k < 1 or k % 2 == 0]
    if bad:
        raise ConfigError(f"model.kernels={list(cfg.kernels)}: kernel sizes must be odd and >= 1 (got {bad[0]})")
    if min(cfg.channels) < 1:
        raise ConfigError(f"model.channels={list(cfg.channels)}: every convolution needs >= 1 channel")


@register_model("conv_ae")
def build_conv_autoencoder(*, in_dim: int, image_shape: list[int] | None = None, latent_dim: int = 10,
                           dropout: float = 0.0, channels: list[int] | None = None,
                           kernels: list[int] | None = None) -> ConvAutoencoder:
    return ConvAutoencoder(ConvAutoencoderConfig(
        in_dim=in_dim, image_shape=image_shape, latent_dim=latent_dim,
        channels=list(channels) if channels is not None else [32, 64, 128],
        kernels=list(kernels) if kernels is not None else [5, 5, 3], dropout=dropout,
    ))
