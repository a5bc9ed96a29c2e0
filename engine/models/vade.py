"""VaDE (Jiang et al., IJCAI 2017): a VAE whose prior is a mixture of Gaussians, one component per cluster.

Generative model: c ~ Cat(pi), z ~ N(mu_c, diag(var_c)), x ~ p(x|z) (the decoder). The encoder gives
q(z|x) = N(mu, diag(sigma^2)) as a VAE's does, and q(c|x) is approximated by the prior's posterior at a sample
z ~ q(z|x): gamma_c = pi_c N(z | mu_c, var_c) / sum_c' pi_c' N(z | mu_c', var_c'). Loss per row (the negative
ELBO, each term summed over its features and averaged over the batch as in vae.py):

    reconstruction + sum_c gamma_c KL(N(mu, sigma^2) || N(mu_c, var_c)) + KL(gamma || pi)

The paper's pretraining: for the first `pretrain_epochs` epochs the model is a plain autoencoder (x -> mu ->
decoder, no sampling, no prior); then a diagonal Gaussian mixture fitted on every row's code mu initialises
the prior (pi, mu_c, log var_c), the untrained log-variance head starts at the narrowest component's variance
(see `init_prior`), and training goes on with the loss above. The trainer calls `begin_epoch`
before each epoch with one pass over the worker's rows and an all-gather, so every worker fits the same
mixture on the codes of all rows. `encode` gives the posterior means; `cluster_posterior(z)` gives q(c|x)
at z = mu, whose argmax are VaDE's labels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.models.registry import register_model
from engine.models.vae import VAE, VAEConfig, reconstruction_loss, reparameterize
from engine.widths import MLP_HIDDEN


@dataclass
class VaDEConfig:
    in_dim: int  # features of a flattened input row
    n_clusters: int  # mixture components (the pipeline passes cluster.k)
    latent_dim: int = 10  # the paper's 10 for MNIST
    hidden: list[int] = field(default_factory=lambda: list(MLP_HIDDEN))  # encoder widths; decoder mirrors
    recon_loss: str = "mse"  # mse: squared error; bce: Bernoulli pixels (the paper's, inputs in [0, 1])
    dropout: float = 0.0  # on the input only
    pretrain_epochs: int = 10  # autoencoder epochs before the GMM initialises the prior; 0: no pretraining
    prior_variance: float = 1.0  # every component's variance until the GMM sets them (for good with 0 above)
    prior_init: str = "gmm"  # gmm: the paper's mixture of the codes; n2d: N2D's partition of them (see init_prior)
    anchor_epochs: int = 10  # n2d: epochs after pretraining in which q(c|x) is held at that partition
    prior_layouts: int = 1  # n2d: UMAP layouts of the codes, the most even partition kept
    center_input: bool = False  # the encoder reads 2x - 1 (vae.py's CenterUnit)
    vade_lr: float | None = None  # the learning rate of the epochs after pretraining and anchoring; None: train.lr


# ---- the maths -------------------------------------------------------------------------------------


def log_joint(z: torch.Tensor, log_pi: torch.Tensor, mu_c: torch.Tensor, logvar_c: torch.Tensor) -> torch.Tensor:
    """log p(c) + log N(z | mu_c, diag(exp(logvar_c))) for every row of z and component c: (rows, components)."""
    diff = z[:, None, :] - mu_c[None, :, :]
    log_density = -0.5 * (math.log(2 * math.pi) + logvar_c[None] + diff.square() / logvar_c.exp()[None]).sum(-1)
    return log_pi[None, :] + log_density


def mixture_kl(mu: torch.Tensor, logvar: torch.Tensor, log_gamma: torch.Tensor, log_pi: torch.Tensor,
               mu_c: torch.Tensor, logvar_c: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) q(c|x) || p(z|c) p(c)) of each row in closed form, for q(z|x) = N(mu, diag(exp(logvar))) and
    q(c|x) = exp(log_gamma): sum_c gamma_c KL(N(mu, sigma^2) || N(mu_c, var_c)) + KL(gamma || pi).

    gamma comes in as logarithms (a log_softmax): gamma log gamma computed from gamma itself has an infinite
    gradient where a component's probability underflows to 0, and one such row makes every weight NaN.
    """
    gamma = log_gamma.exp()
    var_ratio = (logvar[:, None, :] - logvar_c[None]).exp()
    mean_term = (mu[:, None, :] - mu_c[None]).square() / logvar_c.exp()[None]
    gaussian = 0.5 * (var_ratio + mean_term - 1.0 + logvar_c[None] - logvar[:, None, :]).sum(-1)
    categorical = (gamma * (log_gamma - log_pi[None])).sum(1)
    return (gamma * gaussian).sum(1) + categorical


# ---- the model -------------------------------------------------------------------------------------


class VaDE(VAE):
    """The VAE's encoder and decoder (vae.py) with a trainable mixture prior."""

    def __init__(self, cfg: VaDEConfig):
        if cfg.n_clusters < 1:
            raise ConfigError(f"cluster.k={cfg.n_clusters} should be >= 1 (vade's mixture components)")
        if cfg.pretrain_epochs < 0:
            raise ConfigError(f"model.pretrain_epochs={cfg.pretrain_epochs} should be >= 0")
        if cfg.prior_init not in ("gmm", "n2d"):
            raise ConfigError(f"model.prior_init={cfg.prior_init!r} should be 'gmm' or 'n2d'")
        if cfg.anchor_epochs < 0:
            raise ConfigError(f"model.anchor_epochs={cfg.anchor_epochs} should be >= 0")
        if cfg.prior_layouts < 1:
            raise ConfigError(f"model.prior_layouts={cfg.prior_layouts} should be >= 1")
        if cfg.vade_lr is not None and not cfg.vade_lr > 0:
            raise ConfigError(f"model.vade_lr={cfg.vade_lr} should be > 0 (or unset: train.lr)")
        if not cfg.prior_variance > 0:  # also refuses NaN
            raise ConfigError(f"model.prior_variance={cfg.prior_variance} should be > 0 (the variance of each "
                              f"component of vade's mixture prior)")
        super().__init__(VAEConfig(in_dim=cfg.in_dim, latent_dim=cfg.latent_dim, hidden=list(cfg.hidden),
                                   recon_loss=cfg.recon_loss, dropout=cfg.dropout,
                                   center_input=cfg.center_input))
        self.cfg = cfg  # type: ignore[assignment]  # the VAE reads dropout and recon_loss, which VaDEConfig has
        k, d = cfg.n_clusters, cfg.latent_dim
        # pi as logits: any value is a distribution, so Adam's steps never leave the simplex.
        self.pi_logits = nn.Parameter(torch.zeros(k))
        self.mu_c = nn.Parameter(torch.randn(k, d))
        self.logvar_c = nn.Parameter(torch.full((k, d), math.log(cfg.prior_variance)))
        # A buffer, so the checkpoint says which phase the model is in and a resumed run continues it; uint8, not
        # bool, as DDP broadcasts buffers and not every backend takes bool tensors.
        self.register_buffer("prior_ready", torch.tensor(int(cfg.pretrain_epochs == 0), dtype=torch.uint8))
        # prior_init n2d, during the anchor epochs: the pretrained encoder (a frozen copy), the codes it gave every
        # row and their partition; q(c|x) of a row is then its nearest code's cluster. Not in the checkpoint: a
        # run resumed inside the anchor epochs goes on as plain VaDE.
        self.anchor: Anchor | None = None

    @property
    def log_pi(self) -> torch.Tensor:
        return torch.log_softmax(self.pi_logits, dim=0)

    def cluster_posterior(self, z: torch.Tensor) -> torch.Tensor:
        """q(c|x) at the latent point z: the prior's posterior over the components (rows x components)."""
        return torch.softmax(log_joint(z, self.log_pi, self.mu_c, self.logvar_c), dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """VaDE's label of each row: the most probable component at the posterior mean."""
        return self.cluster_posterior(self.encode(x)).argmax(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(decoder output, mu, per-row mixture KL or None while pretraining).

        The prior's terms are computed here, in the forward: under DDP only what the wrapper's forward
        reaches has its gradients all-reduced.
        """
        mu, logvar = self.posterior(x, noisy=True)
        if not bool(self.prior_ready):  # pretraining: an autoencoder on the means
            return self.decoder(mu), mu, None
        z = reparameterize(mu, logvar)
        if self.anchor is not None:
            log_gamma = self.anchor.log_gamma(x)
        else:
            log_gamma = torch.log_softmax(log_joint(z, self.log_pi, self.mu_c, self.logvar_c), dim=1)
        return self.decoder(z), mu, mixture_kl(mu, logvar, log_gamma, self.log_pi, self.mu_c, self.logvar_c)

    def loss(self, x: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Negative ELBO (reconstruction while pretraining); `forward` is a DDP wrapper of self, or self."""
        out, _, kl = (forward or self)(x)
        recon = reconstruction_loss(out, x, self.cfg.recon_loss)
        if kl is None:
            return recon, {"reconstruction": float(recon.detach())}
        kl = kl.mean()
        return recon + kl, {"reconstruction": float(recon.detach()), "kl": float(kl.detach())}

    def train_step(self, x: torch.Tensor, optimizers: Mapping[str, torch.optim.Optimizer],
                   forward=None) -> dict[str, float]:
        """One Adam step. Own steps because pretraining leaves the log-variance head and the prior unused,
        which DDP must be told to expect (the trainer does so for models with a train_step)."""
        (optimizer,) = optimizers.values()
        optimizer.zero_grad(set_to_none=True)
        loss, terms = self.loss(x, forward=forward)
        loss.backward()
        optimizer.step()
        return {"loss": float(loss.detach()), **terms}

    def learning_rate(self, epoch: int) -> float | None:
        """The learning rate of `epoch` (0-based) for the training loop: `vade_lr` from the first epoch after
        pretraining and the anchor epochs (those VaDE trains with the mixture's own posterior), else None (train.lr,
        as the optimizers were built). The paper decays its rate over 300 epochs; a shorter run holds a lower one."""
        first = self.cfg.pretrain_epochs + (self.cfg.anchor_epochs if self.cfg.prior_init == "n2d" else 0)
        return self.cfg.vade_lr if self.cfg.vade_lr is not None and epoch >= first else None

    @torch.no_grad()
    def begin_epoch(self, epoch: int, rows: Callable[[], Iterable[torch.Tensor]],
                    gather: Callable[[np.ndarray], np.ndarray]) -> bool:
        """At the first epoch after pretraining, fit the prior to the codes of every row; True when it did.

        `rows()` yields this worker's rows (normalised, not augmented), `gather` concatenates an array over
        the workers (the identity alone). Every worker fits the same mixture on the same codes.
        """
        if self.anchor is not None and epoch >= self.cfg.pretrain_epochs + self.cfg.anchor_epochs:
            self.anchor = None  # every worker at the same epoch: q(c|x) is the prior's posterior from here on
        if bool(self.prior_ready) or epoch < self.cfg.pretrain_epochs:
            return False
        training = self.training
        self.eval()
        local = [self.encode(x).float().cpu().numpy() for x in rows()]
        self.train(training)
        codes = gather(np.concatenate(local) if local else np.zeros((0, self.cfg.latent_dim), np.float32))
        # In a fixed order: the mixture's k-means start then does not depend on how the rows were split.
        codes = codes[np.lexsort(codes.T[::-1])]
        # torch's seed is the run's (every worker sets it first): the mixture is reproducible.
        facts = self.init_prior(codes, seed=torch.initial_seed() % 2**32)
        if "labels" in facts and self.cfg.anchor_epochs > 0:
            device = self.mu_c.device
            frozen = copy.deepcopy(nn.Sequential(self.input_map, self.encoder, self.mu)).eval().requires_grad_(False)
            self.anchor = Anchor(frozen, torch.as_tensor(codes, device=device),
                                 torch.as_tensor(facts["labels"], device=device), self.cfg.n_clusters)
        return True

    @torch.no_grad()
    def init_prior(self, codes: np.ndarray, seed: int = 0) -> dict:
        """pi, mu_c and log var_c from `codes`; returns facts about the fit.

        prior_init gmm: a diagonal Gaussian mixture fitted on the codes (the paper's initialisation). n2d: N2D's
        partition of the codes (McConville et al. 2020, their published settings: UMAP to k dimensions over 20
        neighbours, min_dist 0, then a full-covariance Gaussian mixture), each component set to its cluster's share,
        mean and per-dimension variance of the codes; the facts then hold every row's `labels`. A Gaussian mixture
        in the code space finds clusters of the shape it can hold, which on digits split and merge classes by seed
        (ACC 0.67-0.80 at the start); UMAP's neighbourhood graph follows the classes' manifolds.
        """
        k = self.cfg.n_clusters
        if len(codes) < k:
            raise ConfigError(f"cluster.k={k} should be <= the number of rows ({len(codes)}): vade fits one "
                              f"mixture component per cluster to the rows' codes")
        facts: dict = {}
        labels = _n2d_partition(codes, k, seed, self.cfg.prior_layouts) if self.cfg.prior_init == "n2d" else None
        if labels is not None and len(np.unique(labels)) == k:
            weights = np.bincount(labels, minlength=k) / len(labels)
            means = np.stack([codes[labels == c].mean(0) for c in range(k)])
            # A floor as scikit-learn's reg_covar: a cluster of equal codes would have a variance of 0.
            variances = np.stack([codes[labels == c].var(0) for c in range(k)]) + 1e-6
            facts["labels"] = labels
        else:
            from sklearn.mixture import GaussianMixture

            # One start, as the paper: ten (the likeliest kept) gave no better clusters on digits (seed 2: 0.819
            # after VaDE against 0.922).
            gmm = GaussianMixture(n_components=k, covariance_type="diag", random_state=seed).fit(codes)
            weights, means, variances = gmm.weights_, gmm.means_, gmm.covariances_
            facts.update(converged=bool(gmm.converged_), n_iter=int(gmm.n_iter_), lower_bound=float(gmm.lower_bound_))
        device = self.mu_c.device
        self.pi_logits.copy_(torch.as_tensor(np.log(weights), dtype=torch.float32, device=device))
        self.mu_c.copy_(torch.as_tensor(means, dtype=torch.float32, device=device))
        self.logvar_c.copy_(torch.as_tensor(np.log(variances), dtype=torch.float32, device=device))
        # The encoder's log-variance head was not pretrained: left as it is, q(z|x) starts with variances near 1,
        # far above the components' on codes that span a few units, and the first steps' KL (thousands of nats on
        # 8x8 digits) sends the weights to NaN. It starts instead at every row's variance equal to the narrowest
        # component's in each dimension, so that q(z|x) fits inside every component.
        self.logvar.weight.zero_()
        self.logvar.bias.copy_(self.logvar_c.min(dim=0).values)
        self.prior_ready.fill_(True)
        return facts


def _n2d_partition(codes: np.ndarray, k: int, seed: int, layouts: int = 1) -> np.ndarray:
    """N2D's clusters of the codes (the engine's `cluster.manifold: umap` + `method: gmm` at N2D's settings), the
    most even of `layouts` partitions. The layouts run here, one after the other: a training worker holds its CPUs,
    so Ray tasks for them would wait for CPUs that do not come free."""
    from engine.cluster import fit_labels
    from engine.config import ClusterConfig, UmapConfig

    cfg = ClusterConfig(method="gmm", covariance_type="full", k=k, n_init=1, manifold="umap",
                        umap=UmapConfig(n_neighbors=min(20, len(codes) - 1), min_dist=0.0, n_init=layouts,
                                        select="even"))
    return fit_labels(codes, cfg, seed, ray_tasks=False)[0]


class Anchor:
    """q(c|x) held at a partition of the pretrained codes: the cluster of the code nearest to the frozen
    pretrained encoder's code of x (for a training row, that row's own code and cluster)."""

    def __init__(self, encoder: nn.Module, codes: torch.Tensor, labels: torch.Tensor, k: int):
        self.encoder, self.codes, self.k = encoder, codes.float(), k
        self.labels = labels.long()

    @torch.no_grad()
    def log_gamma(self, x: torch.Tensor) -> torch.Tensor:
        """log q(c|x) of rows `x`: 0 at the nearest code's cluster, log(1e-8) elsewhere (finite, so the
        categorical KL's gamma log gamma stays defined)."""
        nearest = torch.cdist(self.encoder(x).float(), self.codes).argmin(1)
        gamma = F.one_hot(self.labels[nearest], self.k).float().clamp_min(1e-8)
        return torch.log(gamma / gamma.sum(1, keepdim=True))


@register_model("vade")
def build_vade(*, in_dim: int, n_clusters: int = 10, latent_dim: int = 10, hidden: list[int] | None = None,
               recon_loss: str = "mse", dropout: float = 0.0, pretrain_epochs: int = 10,
               prior_variance: float = 1.0, prior_init: str = "gmm", anchor_epochs: int = 10,
               prior_layouts: int = 1, center_input: bool = False, vade_lr: float | None = None) -> VaDE:
    # An MLP VaDE, as the paper's: images reach it as flat rows.
    return VaDE(VaDEConfig(in_dim=in_dim, n_clusters=n_clusters, latent_dim=latent_dim,
                           hidden=list(MLP_HIDDEN if hidden is None else hidden), recon_loss=recon_loss,
                           dropout=dropout, pretrain_epochs=pretrain_epochs, prior_variance=prior_variance,
                           prior_init=prior_init, anchor_epochs=anchor_epochs, prior_layouts=prior_layouts,
                           center_input=center_input, vade_lr=vade_lr))
