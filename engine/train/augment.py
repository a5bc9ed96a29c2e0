"""Random affine transforms (rotation, shift) of flat image rows, for training on augmented images as DEC-DA does.

DEC-DA (Guo et al., ACML 2018) trains the autoencoder on randomly rotated and shifted copies of the images and
has it reconstruct them: the codes become invariant to small placement changes, which k-means on them rewards
(ACC 0.78 -> 0.92 on MNIST after 50 epochs here, see benchmarks/RESULTS.md). Rows stay flat: each batch is
viewed as images of the source's `image_shape`, warped with one bilinear `grid_sample` call, and flattened
back. Pixels moved in from outside an image take its background: the median of its outermost ring of pixels, per
channel (0 for MNIST's digits, 255 for the same digits inverted; zeros instead had the inverted digits' autoencoder
reconstruct black wedges, and `mnist_n2d` fell from 0.975 to 0.809 on them, benchmarks/RESULTS.md). The transform
runs before the input normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from engine.errors import ConfigError


def augment_options(augment: Any, image_shape: Sequence[int] | None) -> dict[str, float] | None:
    """random_affine's settings from `augment` (train.augment), None when it is off; a ConfigError when it is on
    but the rows are not images."""
    if not augment.enabled:
        return None
    options = {"rotation": float(augment.rotation), "shift": float(augment.shift)}
    if not image_shape:
        raise ConfigError(f"train.augment={options} rotates and shifts images, but the input rows have no image "
                          "shape (image sources: digits, idx, npy of 3-D arrays); set train.augment.rotation=0 and "
                          "train.augment.shift=0")
    return options


def affine(x: torch.Tensor, image_shape: Sequence[int], angles: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
    """`x` (n, prod(image_shape)) with row i rotated by `angles[i]` radians about the image centre and moved by
    `moves[i]` (x, y), as fractions of the image's width and height; what comes in from outside is the image's
    background (`background`)."""
    n = x.shape[0]
    channels, height, width = [1, *image_shape] if len(image_shape) == 2 else list(image_shape)
    images = x.reshape(n, channels, height, width)
    fill = background(images)
    # affine_grid's coordinates span [-1, 1] over the image: a move of a fraction f is 2 f there.
    cos, sin, move = torch.cos(angles), torch.sin(angles), 2 * moves
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], dim=1),
                         torch.stack([sin, cos, move[:, 1]], dim=1)], dim=1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Zero padding of the image less its background is the background outside: what grid_sample pads with is 0.
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (out + fill).reshape(n, -1)
    # Every output is a weighted mean of inputs and of the background (one of the inputs), so in the range below,
    # but for rounding: 255-valued pixels came out as 255.00003, which the VAE's bce check (inputs in [0, 1])
    # rightly refused after / 255.
    lo, hi = (float(v) for v in torch.aminmax(x))
    return out.clamp_(lo, hi)


def background(images: torch.Tensor) -> torch.Tensor:
    """The background of each image of `images` (n, channels, height, width), per channel: the median of its
    outermost ring of pixels (robust to the strokes that touch the edge), shaped (n, channels, 1, 1)."""
    if images.shape[-2] < 3 or images.shape[-1] < 3:
        ring = images.flatten(2)
    else:
        ring = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    return ring.median(dim=-1).values[..., None, None]


def random_affine(x: torch.Tensor, image_shape: Sequence[int], *, rotation: float, shift: float,
                  generator: torch.Generator) -> torch.Tensor:
    """`x` (n, prod(image_shape)) with each row rotated by up to +-`rotation` degrees and moved by up to
    +-`shift` of the image's width and height, uniformly at random from `generator` (a CPU generator, so a
    seed gives the same transforms on any device)."""
    uniform = torch.rand(x.shape[0], 3, generator=generator).mul_(2).sub_(1)  # in [-1, 1)
    return affine(x, image_shape, uniform[:, 0] * math.radians(rotation), uniform[:, 1:] * shift)
