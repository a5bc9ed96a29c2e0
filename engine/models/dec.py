"""DEC (Xie et al. 2016) and IDEC (Guo et al. 2017): trainable cluster centres on a pretrained autoencoder's code.

For embeddings z_i = f(x_i) and centres mu_j:

    q_ij = (1 + ||z_i - mu_j||^2 / alpha)^(-(alpha+1)/2), normalised over j     soft assignment (Student-t)
    f_j  = sum_i q_ij, over EVERY row of the data set                          soft cluster sizes
    p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')                            sharpened target
    DEC:  L = KL(P || Q)
    IDEC: L = MSE(x, g(z)) + gamma * KL(P || Q)                                 (gamma = 0.1 in the paper)

P is held fixed between target updates (engine/train/refine.py recomputes it every `update_interval` steps).
Computing f_j over a batch instead of the data set is a common bug: the target then depends on which rows
share the batch. Under DDP each worker sums q over its own rows and the sums are all-reduced.

argmax_j q_ij is the nearest centre for any alpha > 0, so DEC's labels are a nearest-centre assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.registry import build_model, model_names, register_model


@dataclass
class DECConfig:
    n_clusters: int = 10  # k: one trainable centre per cluster
    alpha: float = 1.0  # Student-t degrees of freedom; 1 in both papers
    gamma: float | None = None  # idec: weight of KL(P || Q) against the reconstruction MSE; None: dec, no decoder


# ---- the maths -------------------------------------------------------------------------------------


def log_soft_assignment(z: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """log q (rows x clusters): the Student-t kernel normalised over the clusters, computed in log space so
    that far-away centres underflow to a tiny probability instead of log(0)."""
    d2 = (z[:, None, :] - centers[None, :, :]).square().sum(-1)
    return torch.log_softmax(-(alpha + 1) / 2 * torch.log1p(d2 / alpha), dim=1)


def soft_assignment(z: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """q_ij: the probability that row i belongs to cluster j."""
    return log_soft_assignment(z, centers, alpha).exp()


def cluster_frequencies(q: torch.Tensor) -> torch.Tensor:
    """f_j = sum_i q_ij of these rows, in float64: workers all-reduce it to get the data set's f."""
    return q.sum(0, dtype=torch.float64)


def target_distribution(q: torch.Tensor, frequencies: torch.Tensor | None = None) -> torch.Tensor:
    """p_ij = (q_ij^2 / f_j) normalised over j; `frequencies` is f over the whole data set (default: these
    rows are the whole data set)."""
    f = cluster_frequencies(q) if frequencies is None else frequencies.to(torch.float64)
    weight = q.to(torch.float64).square() / f
    return (weight / weight.sum(1, keepdim=True)).to(q.dtype)


def kl_divergence(p: torch.Tensor, log_q: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """KL(P || Q) per row, averaged (or summed) over the rows; 0 log 0 counts as 0."""
    per_row = (torch.xlogy(p, p) - p * log_q).sum(1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


# ---- the model -------------------------------------------------------------------------------------


class DEC(nn.Module):
    """An autoencoder with a clustering head; encode(x) is the autoencoder's, so embedding is unchanged."""

    def __init__(self, autoencoder: nn.Module, cfg: DECConfig, *, in_dim: int):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder
        params = [p for p in autoencoder.parameters() if p.requires_grad]
        z = autoencoder.encode(torch.zeros(2, in_dim))
        self.centers = nn.Parameter(torch.zeros(cfg.n_clusters, z.shape[1]))
        if cfg.gamma is None:
            # DEC trains the encoder and the centres only. Freezing what the encoder does not use (the decoder)
            # also keeps DDP from waiting for gradients that never come.
            grads = torch.autograd.grad(z.sum(), params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    p.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x)

    def log_soft_assign(self, x: torch.Tensor) -> torch.Tensor:
        return log_soft_assignment(self.encode(x), self.centers, self.cfg.alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log q, the reconstruction or None for dec)."""
        z = self.encode(x)
        log_q = log_soft_assignment(z, self.centers, self.cfg.alpha)
        return log_q, (self.autoencoder.decode(z) if self.cfg.gamma is not None else None)

    def loss(self, x: torch.Tensor, forward=None, *, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """KL(target || Q) for dec, MSE + gamma * KL for idec; `target` is P's rows for this batch, computed
        over the whole data set. `forward` is the callable to run (a DDP wrapper of self, or self)."""
        log_q, recon = (forward or self)(x)
        kl = kl_divergence(target, log_q)
        if recon is None:
            return kl, {"kl": float(kl.detach())}
        mse = F.mse_loss(recon, x)
        return mse + self.cfg.gamma * kl, {"kl": float(kl.detach()), "reconstruction": float(mse.detach())}


def check_base(base: str) -> None:
    """`model.base` must name a registered model that is not itself a clustering model."""
    # Here, not at the top: engine.config needs pydantic, and the models build without it (benchmarks/gpu.py).
    from engine.config import REFINED_MODELS

    if base in REFINED_MODELS or base not in model_names():
        choices = [m for m in model_names() if m not in REFINED_MODELS]
        raise ConfigError(f"model.base={base!r} is not an autoencoder to pretrain; choose one of {choices}")


def _build(*, in_dim: int, base: str, cfg: DECConfig, base_options: dict) -> DEC:
    check_base(base)
    if cfg.n_clusters < 1:
        raise ConfigError(f"cluster.k={cfg.n_clusters} should be >= 1")
    autoencoder = build_model(base, in_dim=in_dim, **base_options)
    if cfg.gamma is not None and not hasattr(autoencoder, "decode"):
        raise ConfigError(f"model.base={base!r} has no decode(z): idec needs a decoder (dec does not)")
    return DEC(autoencoder, cfg, in_dim=in_dim)


@register_model("dec")
def build_dec(*, in_dim: int, base: str = "mlp_ae", n_clusters: int = 10, alpha: float = 1.0,
              **base_options) -> DEC:
    """DEC on `base` (any registered encoder); `base_options` build it (latent_dim, hidden...)."""
    return _build(in_dim=in_dim, base=base, cfg=DECConfig(n_clusters=n_clusters, alpha=alpha),
                  base_options=base_options)


@register_model("idec")
def build_idec(*, in_dim: int, base: str = "mlp_ae", n_clusters: int = 10, alpha: float = 1.0, gamma: float = 0.1,
               **base_options) -> DEC:
    """IDEC on `base`, an autoencoder with decode(z); `base_options` build it (latent_dim, hidden...)."""
    if gamma <= 0:
        raise ConfigError(f"refine.gamma={gamma} should be > 0 (the weight of the clustering loss)")
    return _build(in_dim=in_dim, base=base, cfg=DECConfig(n_clusters=n_clusters, alpha=alpha, gamma=gamma),
                  base_options=base_options)
