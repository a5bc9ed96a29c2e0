"""Client-side privacy: what a client does to its statistics before they leave it, and what that costs.

The mechanisms are those of FedDP-Lloyds (Scott et al., ICML 2025): for fixed centroids, a client's rows are
clipped to L2 norm `clip_norm`, so adding or removing one row moves the sums by at most clip_norm (L2) and the
counts by 1; the sums get Gaussian noise and the counts Laplace (or Gaussian) noise. The SSE is not released
under DP.

Accounting is in zero-concentrated DP (Bun & Steinke 2016): a Gaussian mechanism with sensitivity D and scale
sigma is (D^2 / 2 sigma^2)-zCDP, an eps-DP Laplace mechanism is (eps^2 / 2)-zCDP, rho adds up over releases,
and rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP. The run's (epsilon, delta) is turned into a
rho budget, split evenly over the planned releases and, within each, between sums and counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from engine.config import PrivacyConfig, format_validation_error
from engine.errors import ConfigError


class _Settings(BaseModel):
    # Validating under a `privacy` key makes every message name `privacy.<key>`.
    privacy: PrivacyConfig


def privacy_config(privacy: Any) -> PrivacyConfig | None:
    """None, a PrivacyConfig or a dict of its keys, validated; errors name the key as `privacy.<key>`."""
    if privacy is None or isinstance(privacy, PrivacyConfig):
        return privacy
    if not isinstance(privacy, dict):
        raise ConfigError(f"privacy should be None, a dict or a PrivacyConfig, got {type(privacy).__name__}.")
    try:
        return _Settings.model_validate({"privacy": privacy}).privacy
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def rho_for(epsilon: float, delta: float) -> float:
    """The largest zCDP rho whose (epsilon, delta) conversion is at most `epsilon`."""
    log = math.log(1 / delta)
    return (math.sqrt(log + epsilon) - math.sqrt(log)) ** 2


def epsilon_for(rho: float, delta: float) -> float:
    """The epsilon of rho-zCDP at `delta`."""
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


@dataclass(frozen=True)
class Noise:
    """The noise of one release, as each client adds it."""

    sigma_sums: float  # Gaussian standard deviation on every coordinate of the sums (0: sums not released)
    count_noise: str  # "laplace" or "gaussian"
    count_scale: float  # Laplace scale b, or Gaussian standard deviation, on every count


class Accountant:
    """Splits an (epsilon, delta) budget over `releases` releases and reports what each one spends.

    `next_noise(counts_only)` gives the noise of the next release; `spend()` records it once it happened and
    returns the per-release and cumulative (epsilon, delta).
    """

    def __init__(self, cfg: PrivacyConfig, releases: int):
        self.cfg = cfg
        self.releases = releases
        self.rho_per_release = rho_for(cfg.epsilon, cfg.delta) / releases
        self.rho_spent = 0.0
        self.spent_releases = 0

    def next_noise(self, counts_only: bool = False) -> Noise:
        rho = self.rho_per_release
        rho_counts = rho if counts_only else rho * self.cfg.count_share
        rho_sums = 0.0 if counts_only else rho - rho_counts
        sigma_sums = self.cfg.clip_norm / math.sqrt(2 * rho_sums) if rho_sums > 0 else 0.0
        # Counts have sensitivity 1: Laplace b = 1 / eps with eps^2 / 2 = rho, and Gaussian sigma = 1 / sqrt(2 rho),
        # the same number.
        return Noise(sigma_sums, self.cfg.count_noise, 1 / math.sqrt(2 * rho_counts))

    def spend(self, noise: Noise) -> dict[str, Any]:
        """Record one completed release; returns its report for the round record."""
        self.rho_spent += self.rho_per_release
        self.spent_releases += 1
        return {
            "epsilon": epsilon_for(self.rho_per_release, self.cfg.delta),
            "epsilon_total": self.total()[0],
            "delta": self.cfg.delta,
            "rho": self.rho_per_release,
            "rho_total": self.rho_spent,
            **asdict(noise),
        }

    def total(self) -> tuple[float, float]:
        """(epsilon, delta) of every release so far."""
        return epsilon_for(self.rho_spent, self.cfg.delta), self.cfg.delta


def clip_rows(X: np.ndarray, clip_norm: float) -> np.ndarray:
    """Rows scaled down to L2 norm clip_norm where longer; shorter rows are unchanged."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    factor = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-300))
    return (X * factor[:, None]).astype(np.float32)


def add_noise(sums: np.ndarray, counts: np.ndarray, noise: Noise, rng: np.random.Generator,
              shares: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copies of sums and counts.

    shares > 1: the Gaussian noise is split over that many clients whose sum the server sees (secure
    aggregation), each adding sigma / sqrt(shares) so the sum carries sigma. Laplace noise does not split that
    way, so every client adds the full scale.
    """
    split = math.sqrt(shares)
    sums = sums + rng.normal(0.0, noise.sigma_sums / split, size=sums.shape) if noise.sigma_sums > 0 else sums
    if noise.count_noise == "laplace":
        counts = counts + rng.laplace(0.0, noise.count_scale, size=counts.shape)
    else:
        counts = counts + rng.normal(0.0, noise.count_scale / split, size=counts.shape)
    return sums, counts


def suppress_small(sums: np.ndarray, counts: np.ndarray, min_count: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Zero the sums and counts of clusters with count < min_count; returns them and how many were zeroed."""
    if min_count <= 0:
        return sums, counts, 0
    small = counts < min_count
    suppressed = int(np.count_nonzero(small & (counts != 0)))
    sums, counts = sums.copy(), counts.copy()
    sums[small] = 0.0
    counts[small] = 0.0
    return sums, counts, suppressed
