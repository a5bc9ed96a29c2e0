"""ClusterGAN (Mukherjee et al., AAAI 2019): a WGAN-GP over a noise + one-hot code latent, with an encoder
trained to invert the generator, so that the code it reads back from a real row is that row's cluster.

Latent z = [z_n, z_c]: z_n ~ N(0, sigma^2 I) with a small sigma (0.1), so the code and not the noise decides
which mode G draws from, and z_c a one-hot code over `n_clusters`, every code equally often. The critic D
is trained with the WGAN-GP loss (Gulrajani et al. 2017), `critic_steps` times per generator step (with
fresh noise on the same real batch); G and E are trained jointly on

    -D(G(z)) + beta_n * mse(z_n, E_n(G(z))) + beta_c * cross_entropy(z_c, E_c(G(z))).

E only ever sees generated samples, unless `recon_weight` > 0: then real rows also pass through E and back
through G, and recon_weight times that reconstruction's error joins the loss above (E becomes an autoencoder's
encoder with G its decoder, whose codes a manifold step can cluster; on digits ClusterGAN's own code read
back from real rows stayed at ACC ~0.73; `embed_code: false` then embeds E_n(x) alone, as the near one-hot code
part split the manifold step's clusters along ClusterGAN's own, weaker, code). The embedding of a row is
[softmax(E_c(x)), E_n(x)] (n_clusters + latent_dim features): the code probabilities carry the cluster
(k-means on them recovers the argmax clusters, which `predict` returns, when the code is confident), and the
small noise part separates rows within a mode without outweighing the code. Fully connected networks (the
input is a flat vector) as in the paper's MLP experiments: LeakyReLU, batch norm in G only, and a sigmoid output
for data in [0, 1].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.registry import register_model


@dataclass
class ClusterGANConfig:
    in_dim: int  # features of a flattened input row
    n_clusters: int  # size of the one-hot code (the pipeline passes cluster.k)
    latent_dim: int = 10  # continuous noise z_n (the paper: 30 for MNIST)
    hidden: list[int] = field(default_factory=lambda: [256, 256])  # D and E widths; G mirrors them
    noise_sigma: float = 0.1  # std of z_n (the paper's value)
    beta_n: float = 10.0  # weight of the noise reconstruction mse(z_n, E_n(G(z)))
    beta_c: float = 10.0  # weight of the code cross-entropy
    critic_steps: int = 5  # critic updates per generator update (WGAN-GP's n_critic)
    gp_weight: float = 10.0  # WGAN-GP's lambda
    output_activation: Literal["linear", "sigmoid"] = "linear"  # the generator's; sigmoid for data in [0, 1]
    recon_weight: float = 0.0  # weight of the reconstruction of real rows through E then G; 0: the paper's
    embed_code: bool = True  # the embedding holds the code probabilities; False: the noise estimate E_n(x) alone


class ClusterGAN(nn.Module):
    def __init__(self, cfg: ClusterGANConfig):
        super().__init__()
        if cfg.in_dim < 1:
            raise ConfigError(f"the input has {cfg.in_dim} features; the GAN needs at least 1")
        for key in ("n_clusters", "latent_dim", "critic_steps"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"model.{key}={getattr(cfg, key)} should be >= 1")
        if not cfg.recon_weight >= 0:  # also refuses NaN
            raise ConfigError(f"model.recon_weight={cfg.recon_weight} should be >= 0")
        if cfg.noise_sigma <= 0:
            raise ConfigError(f"model.noise_sigma={cfg.noise_sigma} should be > 0")
        if cfg.output_activation not in ("linear", "sigmoid"):
            raise ConfigError(f"model.output_activation={cfg.output_activation!r} should be 'linear' or 'sigmoid'")
        self.cfg = cfg
        latent = cfg.latent_dim + cfg.n_clusters
        # Batch norm in the generator only, as in the paper's MLPs: the WGAN-GP penalty is per sample,
        # which batch statistics in the critic would break, and the encoder must embed rows one by one.
        self.generator = _mlp([latent, *cfg.hidden[::-1], cfg.in_dim], batch_norm=True)
        if cfg.output_activation == "sigmoid":
            self.generator.append(nn.Sigmoid())
        self.critic = _mlp([cfg.in_dim, *cfg.hidden, 1])
        self.encoder = _mlp([cfg.in_dim, *cfg.hidden, latent])

    # ---- latent, encoder, clusters -------------------------------------------------------------------

    def sample_latent(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` latents [z_n, one-hot z_c] and their codes; the codes of the global batch are balanced.

        Under torch.distributed every worker draws the whole global batch from its (identically seeded)
        generator and keeps its own rows: the workers get different samples, never copies of one another,
        and a run draws the same latents whatever the number of workers.
        """
        total, start = _global_rows(n)
        device = next(self.parameters()).device
        noise = torch.randn(total, self.cfg.latent_dim, device=device)[start:start + n] * self.cfg.noise_sigma
        codes = (torch.randperm(total, device=device) % self.cfg.n_clusters)[start:start + n]
        onehot = F.one_hot(codes, self.cfg.n_clusters).to(noise.dtype)
        return torch.cat([noise, onehot], dim=1), codes

    def encode_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_n estimate, code logits) of rows `x`."""
        out = self.encoder(x)
        return out[:, :self.cfg.latent_dim], out[:, self.cfg.latent_dim:]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        noise, logits = self.encode_parts(x)
        if not self.cfg.embed_code:
            return noise
        return torch.cat([logits.softmax(dim=1), noise], dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """ClusterGAN's own cluster of each row: the argmax of the code the encoder reads."""
        return self.encode_parts(x)[1].argmax(dim=1)

    # ---- losses --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, mode: str = "generator") -> tuple[torch.Tensor, dict[str, float]]:
        """The critic's or the generator+encoder's loss on real rows `x`.

        Training steps run through here (under DDP: through the wrapper's forward), never through the
        sub-modules directly: DDP all-reduces only the gradients of a backward its own forward armed.
        """
        if mode == "critic":
            return self._critic_loss(x)
        if mode == "generator":
            loss, terms = self._generator_loss(x.shape[0])
            if self.cfg.recon_weight:
                recon = self.reconstruction(x)
                loss = loss + self.cfg.recon_weight * recon
                terms["reconstruction"] = float(recon.detach())
            return loss, terms
        raise ValueError(f"mode={mode!r} should be 'critic' or 'generator'")

    def _critic_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        n = x.shape[0]
        with torch.no_grad():
            fake = self.generator(self.sample_latent(n)[0])
        distance = self.critic(x).mean() - self.critic(fake).mean()
        total, start = _global_rows(n)
        eps = torch.rand(total, 1, device=x.device)[start:start + n]
        mix = (eps * x + (1 - eps) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
        penalty = ((grad.norm(dim=1) - 1) ** 2).mean()
        loss = -distance + self.cfg.gp_weight * penalty
        return loss, {"critic": float(loss.detach()), "wasserstein": float(distance.detach()),
                      "gradient_penalty": float(penalty.detach())}

    def _generator_loss(self, n: int) -> tuple[torch.Tensor, dict[str, float]]:
        z, codes = self.sample_latent(n)
        fake = self.generator(z)
        adversarial = -self.critic(fake).mean()
        noise, logits = self.encode_parts(fake)
        noise_err = F.mse_loss(noise, z[:, :self.cfg.latent_dim])
        code_err = F.cross_entropy(logits, codes)
        loss = adversarial + self.cfg.beta_n * noise_err + self.cfg.beta_c * code_err
        return loss, {"generator": float(adversarial.detach()), "encoder_noise": float(noise_err.detach()),
                      "encoder_code": float(code_err.detach()),
                      "code_accuracy": float((logits.argmax(dim=1) == codes).float().mean())}

    def reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Real rows through the encoder and back through the generator, G([E_n(x), softmax(E_c(x))]), against x:
        summed over the features (Bernoulli for a sigmoid output, squared error for a linear one), averaged over
        the rows."""
        noise, logits = self.encode_parts(x)
        out = self.generator(torch.cat([noise, logits.softmax(dim=1)], dim=1))
        if self.cfg.output_activation == "sigmoid":
            per_row = F.binary_cross_entropy(out, x.clamp(0, 1), reduction="none").sum(1)
        else:
            per_row = (out - x).square().sum(1)
        return per_row.mean()

    def loss(self, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, float]]:
        """The generator+encoder objective on a batch of `x`'s size (`forward`: a DDP wrapper of self)."""
        return (forward or self)(x, mode="generator")

    # ---- the training loop's hooks -------------------------------------------------------------------

    def configure_optimizers(self, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
        # WGAN-GP's Adam betas: a low beta1 keeps the critic and generator from chasing stale momentum.
        def adam(params):
            return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), weight_decay=weight_decay)

        return {"critic": adam(self.critic.parameters()),
                "generator": adam(itertools.chain(self.generator.parameters(), self.encoder.parameters()))}

    def train_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
                   forward) -> dict[str, float]:
        """`critic_steps` critic updates, then one generator+encoder update; `loss` is the latter's objective."""
        critic_terms: dict[str, float] = {}
        for _ in range(self.cfg.critic_steps):
            optimizers["critic"].zero_grad(set_to_none=True)
            loss, terms = forward(x, mode="critic")
            loss.backward()
            optimizers["critic"].step()
            for k, v in terms.items():
                critic_terms[k] = critic_terms.get(k, 0.0) + v / self.cfg.critic_steps
        optimizers["generator"].zero_grad(set_to_none=True)
        loss, terms = forward(x, mode="generator")
        loss.backward()
        optimizers["generator"].step()
        return {"loss": float(loss.detach()), **critic_terms, **terms}


def _global_rows(n: int) -> tuple[int, int]:
    """(rows of the global batch, first row of this worker) when each of the workers holds `n` rows."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return n * torch.distributed.get_world_size(), n * torch.distributed.get_rank()
    return n, 0


def _mlp(widths: list[int], batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:  # linear outputs: critic score, logits, and data of any range
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


@register_model("gan")
def build_cluster_gan(*, in_dim: int, n_clusters: int | None = None, latent_dim: int = 10,
                      hidden: list[int] | None = None, noise_sigma: float = 0.1, beta_n: float = 10.0,
                      beta_c: float = 10.0, critic_steps: int = 5, gp_weight: float = 10.0,
                      output_activation: Literal["linear", "sigmoid"] = "linear",
                      recon_weight: float = 0.0, embed_code: bool = True) -> ClusterGAN:
    if n_clusters is None:
        raise ConfigError("model.n_clusters is not set: the gan model needs the number of clusters "
                          "(the pipeline takes cluster.k)")
    return ClusterGAN(ClusterGANConfig(in_dim=in_dim, n_clusters=n_clusters, latent_dim=latent_dim,
                                       hidden=list(hidden) if hidden is not None else [256, 256],
                                       noise_sigma=noise_sigma, beta_n=beta_n, beta_c=beta_c,
                                       critic_steps=critic_steps, gp_weight=gp_weight,
                                       output_activation=output_activation, recon_weight=recon_weight,
                                       embed_code=embed_code))
