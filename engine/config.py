"""Typed pipeline configuration: YAML loading, `--set a.b=c` overrides and validation errors that name the key."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ConfigError
from engine.methods import CLUSTER_METHODS, NO_MANIFOLD_METHODS, POSTERIOR_MODELS, REFINE_INIT_METHODS
from engine.widths import MLP_HIDDEN

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits.yaml"


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    # The docstring under a field is its description (docs/configuration.md is generated from them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# ---- data sources ----------------------------------------------------------------------------------


Normalize = Literal["none", "minmax", "standard", "max", "center"]


class _SourceBase(_Section):
    normalize: Normalize = "none"
    """How `x` is scaled before training: per-feature min-max, per-feature standardisation, division by the
    global maximum (images), or `center`: each feature less its mean, divided by the largest distance of any value
    from its feature's mean (one number for all features: pixels keep their relative scale; an image set and its
    inverse become the same rows up to sign). Statistics are computed in one pass over the data."""
    rows_per_shard: int = Field(default=50_000, ge=1)


class DigitsSource(_SourceBase):
    source: Literal["digits"] = "digits"
    normalize: Normalize = "max"


class BlobsSource(_SourceBase):
    source: Literal["blobs"] = "blobs"
    n_samples: int = Field(default=10_000, ge=1)
    n_features: int = Field(default=16, ge=1)
    centers: int = Field(default=8, ge=1)
    cluster_std: float = Field(default=1.0, gt=0)
    center_box: float = Field(default=10.0, gt=0)
    seed: int = 0


class ParquetSource(_SourceBase):
    source: Literal["parquet"] = "parquet"
    path: str
    """A file, a folder of .parquet files, or a glob."""
    column: str = "x"
    label_column: str | None = None
    id_column: str | None = "id"
    """Column of unique int64 ids; null numbers the rows in file order instead."""


class NpySource(_SourceBase):
    source: Literal["npy"] = "npy"
    path: str
    labels_path: str | None = None


class IdxSource(_SourceBase):
    source: Literal["idx"] = "idx"
    images: list[str]
    """One or more idx image files (gzipped or not); they are concatenated in order."""
    labels: list[str] | None = None
    normalize: Normalize = "max"


DataConfig = Annotated[
    DigitsSource | BlobsSource | ParquetSource | NpySource | IdxSource, Field(discriminator="source")
]


# ---- stages ----------------------------------------------------------------------------------------


REFINED_MODELS = ("dec", "idec")
"""Models that pretrain `model.base` in the train stage, then refine it with a clustering head (`refine`)."""


class ModelConfig(_Section):
    name: str = "mlp_ae"
    """mlp_ae (DEC's MLP autoencoder), conv_ae (DCEC's convolutional autoencoder, image sources only), vae,
    vade (a VAE with a mixture-of-Gaussians prior, one component per cluster; see `pretrain_epochs`), dec / idec
    (pretrain `base`, then refine it with the DEC clustering head, see `refine`), or gan
    (ClusterGAN: a WGAN-GP generator and critic with an encoder that inverts the generator)."""
    latent_dim: int = Field(default=10, ge=1)
    """Size of the embedding the encoder outputs and the clustering runs on."""
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: list(MLP_HIDDEN))
    """mlp_ae, vae: encoder layer widths; the decoder mirrors them (DEC's d-500-500-2000-latent)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the input only while training (a denoising autoencoder when > 0)."""
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [32, 64, 128])
    """conv_ae: output channels of the stride-2 convolutions; the decoder mirrors them (DCEC's 32-64-128)."""
    kernels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [5, 5, 3])
    """conv_ae: odd kernel size of each convolution, one per entry of model.channels (DCEC's 5-5-3)."""
    beta: float = Field(default=1.0, ge=0.0)
    """vae: weight of the KL term (1 is the plain VAE, > 1 a beta-VAE, 0 an autoencoder with noise)."""
    recon_loss: Literal["mse", "bce"] = "mse"
    """vae: reconstruction term, summed over features and averaged over the batch. bce needs inputs in
    [0, 1] (data.normalize: max or minmax on non-negative data)."""
    center_input: bool = False
    """vae, vade: the encoder reads 2x - 1 instead of x, inputs in [0, 1] centred on 0, while the decoder still
    models x (Bernoulli pixels need x in [0, 1], so `data.normalize: center` cannot do it). An image set and its
    inverse (dark on light) then train alike: read this way an inverted image is the negative of its original."""
    pretrain_epochs: int = Field(default=10, ge=0)
    """vade: the first epochs of train.epochs train a plain autoencoder (the VaDE paper's pretraining); then a
    diagonal Gaussian mixture on every row's code initialises the prior, and the rest train VaDE itself. 0: no
    pretraining, the prior starts from `prior_variance`."""
    prior_variance: float = Field(default=1.0, gt=0)
    """vade: the variance of every mixture component (means drawn from N(0, I), weights equal) until the mixture
    fitted after pretraining replaces them."""
    prior_init: Literal["gmm", "n2d"] = "gmm"
    """vade: how the prior starts after pretraining. gmm: a diagonal Gaussian mixture of the codes (the paper's).
    n2d: N2D's partition of the codes (UMAP to k dimensions over 20 neighbours, min_dist 0, a full-covariance
    Gaussian mixture; needs the `umap` extra), each component set to its cluster's share, mean and variance;
    for `anchor_epochs` epochs q(c|x) is then held at that partition, so that the encoder gathers each cluster's
    codes around its component before the mixture's own posterior takes over."""
    anchor_epochs: int = Field(default=10, ge=0)
    """vade with prior_init n2d: the epochs after pretraining in which q(c|x) is held at N2D's partition."""
    prior_layouts: int = Field(default=1, ge=1)
    """vade with prior_init n2d: UMAP layouts of the codes over one neighbour graph, each partitioned by the
    mixture; the most even partition starts the prior (as cluster.umap.n_init with select: even, which the image
    recipes' clustering uses). Run one after the other in the training worker, which holds the CPUs."""
    vade_lr: float | None = Field(default=None, gt=0)
    """vade: the learning rate of the epochs after pretraining (and, with prior_init n2d, after the anchor epochs),
    where the mixture's own posterior trains the model; unset: train.lr throughout. The paper decays its rate over
    300 epochs; a run of tens of epochs at the pretraining's rate moves rows off the partition it started from."""
    base: str = "mlp_ae"
    """dec / idec: the registered autoencoder the train stage pretrains before the refine stage."""
    n_clusters: int | None = Field(default=None, ge=1)
    """Clusters of a model with its own cluster head (gan: the size of the one-hot code); None takes
    cluster.k. The pipeline still runs k-means with cluster.k on the embeddings."""
    noise_sigma: float = Field(default=0.1, gt=0)
    """gan: standard deviation of the continuous latent z_n (ClusterGAN's 0.1: small, so that the
    one-hot code decides the mode)."""
    beta_n: float = Field(default=10.0, ge=0)
    """gan: weight of the encoder's noise reconstruction loss mse(z_n, E_n(G(z)))."""
    beta_c: float = Field(default=10.0, ge=0)
    """gan: weight of the encoder's code cross-entropy CE(z_c, E_c(G(z)))."""
    critic_steps: int = Field(default=5, ge=1)
    """gan: critic (discriminator) updates per generator update (WGAN-GP's n_critic)."""
    gp_weight: float = Field(default=10.0, ge=0)
    """gan: weight of the WGAN-GP gradient penalty (lambda)."""
    recon_weight: float = Field(default=0.0, ge=0)
    """gan: weight of the reconstruction of real rows through the encoder and back through the generator (summed
    over the features: Bernoulli with a sigmoid output, squared error with a linear one). 0 is ClusterGAN as
    published, whose encoder sees generated rows only; > 0 makes the encoder an autoencoder's as well, whose
    embeddings N2D's UMAP + mixture step can cluster."""
    embed_code: bool = True
    """gan: the embedding is [code probabilities, noise estimate] (n_clusters + latent_dim features); false: the
    noise estimate E_n(x) alone (latent_dim features), for a manifold step on the codes of an encoder trained with
    recon_weight > 0: there the near one-hot code part splits the clusters along ClusterGAN's own code."""
    output_activation: Literal["linear", "sigmoid"] = "linear"
    """gan: the generator's output layer; sigmoid for inputs scaled to [0, 1] (normalize: max or minmax),
    as the paper does for images; linear for any other range."""

    @model_validator(mode="after")
    def _check_conv_layers(self) -> ModelConfig:
        if len(self.kernels) != len(self.channels):
            raise ValueError(f"model.kernels has {len(self.kernels)} entries but model.channels has "
                             f"{len(self.channels)}; give one kernel size per convolution")
        even = [k for k in self.kernels if k % 2 == 0]
        if even:
            raise ValueError(f"model.kernels={self.kernels}: kernel sizes must be odd (got {even[0]})")
        return self

    @property
    def refines(self) -> bool:
        """True for dec / idec: train pretrains `base`, then refine adds the clustering head."""
        return self.name in REFINED_MODELS

    def pretrain_options(self) -> dict[str, Any]:
        """The build options of the model the train stage trains: `base` for dec / idec, else this model.

        `base` itself is left out, so autoencoder builders never see it.
        """
        options = self.model_dump()
        base = options.pop("base")
        if self.refines:
            options["name"] = base
        return options


class AugmentConfig(_Section):
    """Random rotations and shifts of the training images (DEC-DA, Guo et al. 2018): the model sees, and an
    autoencoder reconstructs, a freshly transformed copy of every image in every epoch. Off while both are 0;
    needs image rows (the digits and idx sources, npy of 3-D arrays). What a turn or move brings in from outside an
    image is its background (the median of its border pixels). Embedding always encodes the images as they are."""

    rotation: float = Field(default=0.0, ge=0.0, le=180.0)
    """Largest rotation, in degrees either way (DEC-DA: 10, as the MNIST recipes)."""
    shift: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Largest move in each direction, as a fraction of the image's width and height (0.075: 2 pixels of 28)."""

    @property
    def enabled(self) -> bool:
        return self.rotation > 0 or self.shift > 0


class TrainConfig(_Section):
    epochs: int = Field(default=50, ge=1)
    """Passes over the training data; not used while `steps` is set (an override of train.epochs on the command
    line clears a recipe's steps)."""
    steps: int | None = Field(default=None, ge=1)
    """Optimizer steps in all, whatever the number of rows: the train stage then runs ceil(steps / batches per
    epoch) epochs, a batch per step (ceil(rows / batch_size) batches an epoch), so a recipe trains a small data set
    as much as a large one (DEC and IDEC pretrain for a number of iterations, not epochs). With 10,000 MNIST
    digits, 40 epochs (1,600 steps) gave ACC 0.82 and 280 epochs (11,200 steps, about what 40 epochs of all 70,000
    are) 0.977 (benchmarks/RESULTS.md). Not with model.name vade, whose phases are counted in epochs."""
    batch_size: int = Field(default=256, ge=1)
    """Global batch: split evenly over the workers."""
    lr: float = Field(default=1e-3, gt=0)
    """Adam's learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Adam's L2 weight decay."""
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (DDP processes); the global batch is split over them."""
    use_gpu: bool | Literal["auto"] = "auto"
    """auto: one GPU per worker when the Ray cluster has GPUs; true requires them; false trains on CPUs."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each worker."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """Where Ray puts the workers (of the refine stage too). PACK, Ray's default, fills as few nodes as hold them,
    so that DDP's gradient exchange stays inside a node. SPREAD puts each on a node of its own where there are
    enough: CPU workers that would fit on one node then do not share its cores and memory bandwidth with each other
    and with Ray Data's ingest, while the cluster's other nodes stay idle. Both are best effort: after a node is
    lost, the workers restart on the nodes left, even several on one."""
    checkpoint_every: int = Field(default=10, ge=1)
    """Epochs between checkpoints reported to Ray Train (the last epoch always is). Progress is shown
    every epoch, and every epoch's losses are kept in the checkpoint's history. A worker that dies, or a
    run resumed with `--resume`, restarts from the latest one."""
    max_failures: int = Field(default=3, ge=-1)
    """Worker failures Ray Train recovers from (restarting every worker from the latest checkpoint) before
    the run fails; -1: no limit."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: the model's forward under torch.autocast in bfloat16 (about 1.5x faster training on CPUs with
    AVX512-BF16 or AMX, and on Ampere or newer GPUs); weights, losses and embeddings stay float32. A CPU
    without native bfloat16 (autocast there is ~8x slower than float32) trains in fp32, with a warning."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def epochs_for(self, rows: int) -> int:
        """The epochs the train stage runs over `rows` rows: `epochs`, or with `steps` set, enough epochs of
        ceil(rows / batch_size) batches for that many optimizer steps (the last epoch is not cut short)."""
        if self.steps is None:
            return self.epochs
        return max(1, math.ceil(self.steps / max(1, math.ceil(rows / self.batch_size))))

    def for_rows(self, rows: int) -> TrainConfig:
        """This config with `steps` turned into `epochs` over `rows` rows (itself when it counts epochs)."""
        if self.steps is None:
            return self
        return self.model_copy(update={"epochs": self.epochs_for(rows), "steps": None})


class RefineConfig(_Section):
    """DEC / IDEC refinement (model.name dec or idec), on train.num_workers workers. The centres start from the
    partition that the `cluster` settings make of the pretrained embeddings, each centre its cluster's mean code:
    k-means' centroids as in the papers, or N2D's partition (cluster.manifold umap, method gmm); the cluster stage
    then assigns every row to its nearest refined centre (argmax of the soft assignment) instead of clustering
    again."""

    gamma: float = Field(default=0.1, gt=0)
    """idec: weight of the clustering loss, L = reconstruction MSE + gamma * KL(P || Q) (the IDEC paper's
    gamma, 0.1 there). dec has no reconstruction term: L = KL(P || Q)."""
    alpha: float = Field(default=1.0, gt=0)
    """Degrees of freedom of the Student-t kernel of the soft assignment (1 in both papers)."""
    update_interval: int = Field(default=140, ge=1)
    """Optimizer steps between two recomputations of the target distribution P over every row."""
    tol: float = Field(default=0.001, ge=0, le=1)
    """Stop when fewer than this fraction of the labels changed between two target updates (0: never)."""
    max_iter: int = Field(default=20_000, ge=1)
    """Optimizer steps at most."""
    lr: float = Field(default=1e-3, gt=0)
    """Adam's learning rate."""
    batch_size: int = Field(default=256, ge=1)
    """Global batch: split evenly over the workers."""


class EmbedConfig(_Section):
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Rows per batch an embedding actor encodes (and per block an assignment task labels); auto: 4096 on CPUs,
    16384 on GPUs (a GPU needs larger batches to amortise its launches and copies)."""
    concurrency: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Embedding actors (each loads the checkpoint once; also the assignment tasks in flight); auto: 2 on CPUs,
    one per GPU the cluster has or its autoscaler may launch on GPUs."""
    max_restarts: int = Field(default=3, ge=0)
    """Times a dead embedding actor is replaced (and an assignment task retried); its blocks are redone and
    their shards overwritten, so no id is written twice. A node lost with its actors counts once per actor."""
    use_gpu: bool | Literal["auto"] = "auto"

    def plan(self, gpus: float) -> tuple[int, int]:
        """(batch_size, concurrency) for a stage that embeds on `gpus` GPUs (0: on CPUs), `auto` resolved."""
        batch = self.batch_size if self.batch_size != "auto" else (GPU_EMBED_BATCH if gpus else CPU_EMBED_BATCH)
        actors = self.concurrency if self.concurrency != "auto" else (max(1, int(gpus)) if gpus else CPU_EMBED_ACTORS)
        return int(batch), int(actors)


# `embed: auto`: on CPUs the settings measured for a 2-core node (4096-row batches, 2 actors); on GPUs one actor per
# GPU and batches 4x larger.
CPU_EMBED_BATCH, CPU_EMBED_ACTORS, GPU_EMBED_BATCH = 4096, 2, 16384


class UmapConfig(_Section):
    """UMAP settings for `cluster.manifold: umap` (defaults as in N2D, McConville et al. 2019)."""

    n_components: int | None = Field(default=None, ge=1)
    """Dimensions of the manifold the clusterer sees; None uses cluster.k."""
    n_neighbors: int = Field(default=20, ge=2)
    """Neighbourhood size: larger keeps more global structure (N2D uses 20 on MNIST)."""
    min_dist: float = Field(default=0.0, ge=0.0)
    """0 packs the points of a cluster tightly, which is what a clusterer wants (not a pretty plot)."""
    metric: str = "euclidean"
    """Any metric umap-learn accepts, by name."""
    n_init: int = Field(default=1, ge=1)
    """Layouts to try: UMAP's optimisation from seeds seed, seed+1, ... over one k-nearest-neighbour graph, each
    clustered by cluster.method; one partition is kept, by `select`. kmeans, gmm and agglomerative only (the
    density-based methods choose their own number of clusters). 1 runs one layout. Each layout is single-threaded
    (seeded); in a Ray job the layouts after the first run as Ray tasks meanwhile, on the cluster's free CPUs."""
    select: Literal["even", "consensus"] = "even"
    """Which of the n_init partitions is kept. even: the one with the most even cluster sizes (the highest entropy
    of its size distribution), a prior that the clusters are not far from equal in size; UMAP + a mixture
    typically fails by merging two classes while splitting another, which makes the sizes uneven. Of 4 layouts it
    kept the best on 11 of 11 sets of digits and MNIST-test codes, and on 5 of 6 with their classes drawn in
    USPS's proportions (the largest 2.2x the smallest; benchmarks/RESULTS.md). consensus: the one that agrees best
    with the others (the highest mean normalised mutual information to them, the member of the ensemble nearest
    its consensus, Strehl & Ghosh 2002), which assumes nothing of the sizes: for classes of very different sizes,
    where the most even partition is the wrong one."""


class ClusterConfig(_Section):
    method: Literal[CLUSTER_METHODS] = "kmeans"  # type: ignore[valid-type]
    """kmeans: in memory in the driver; sharded: exact Lloyd over Ray actors holding the embedding shards;
    sample_assign: k-means on a seeded sample, then every row assigned by Ray Data tasks; two_level: for
    large k (tens of thousands), ~sqrt(k) coarse clusters, then sub-clusters in each (in the driver); gmm:
    Gaussian mixture (scikit-learn) of k components; agglomerative: Ward linkage into k clusters, on the
    points or on `micro_clusters` k-means centroids; hdbscan, dbscan: density-based, they find their own
    number of clusters (k is not used) and label outliers -1 (noise). The last four hold the embeddings in
    memory. posterior: each row takes the most probable cluster under the trained model's own q(c|x), for
    models with a mixture prior (vade); nothing is fitted."""
    k: int = Field(default=10, ge=1)
    init: Literal["auto", "k-means++", "k-means||", "partitioned", "random"] = "auto"
    """k-means seeding: auto is k-means++ up to k=256, k-means|| up to 4096 and partitioned (k-means++ within
    the cells of a coarse k-means) above, each doing fewer operations in its range; sharded k-means seeds by
    k-means|| for auto and k-means++ and has no partitioned seeding (gmm always starts from scikit-learn's
    k-means)."""
    n_init: int = Field(default=10, ge=1)
    """Restarts of kmeans and gmm; the best objective is kept."""
    max_iter: int = Field(default=100, ge=1)
    """Iterations per run of kmeans (Lloyd) and gmm (EM)."""
    tol: float = Field(default=1e-4, ge=0)
    """kmeans: relative decrease of the SSE; gmm: change of the mean log-likelihood bound."""
    backend: Literal["auto", "faiss", "torch"] = "auto"
    spherical: bool = False
    """Cosine k-means: embeddings and centroids L2-normalised (every method; assignment distances are then
    those of the unit rows)."""
    num_actors: int | None = Field(default=None, ge=1)
    """sharded: shard actors (default: one per shard, up to the cluster's CPUs)."""
    sample_size: int = Field(default=1_000_000, ge=1)
    """sample_assign: rows k-means is trained on."""
    n_coarse: int | None = Field(default=None, ge=1)
    """two_level: coarse clusters (default round(sqrt(k)))."""
    refine_iter: int = Field(default=0, ge=0)
    """two_level: full Lloyd iterations over all k centroids after the two levels."""
    checkpoint_every: int = Field(default=10, ge=1)
    """kmeans, sharded: Lloyd iterations between saved centroids, from which an interrupted cluster stage
    resumes (`dce run --resume`)."""
    covariance_type: Literal["full", "tied", "diag", "spherical"] = "full"
    """gmm: shape of each component's covariance (scikit-learn's GaussianMixture)."""
    micro_clusters: int | None = Field(default=None, ge=2)
    """agglomerative: None runs Ward on the points (O(n^2) memory, refused above 20,000 rows); a number
    (e.g. 10*k) runs Ward on the centroids of a k-means into that many micro-clusters, and each row takes
    the label of its micro-cluster."""
    min_cluster_size: int = Field(default=5, ge=2)
    """hdbscan: smallest group of rows that counts as a cluster."""
    min_samples: int | None = Field(default=None, ge=1)
    """hdbscan, dbscan: neighbours (the row included) a row needs to be a core point; None uses
    min_cluster_size for hdbscan and 5 for dbscan."""
    eps: float = Field(default=0.5, gt=0)
    """dbscan: neighbourhood radius, in the units of the space clustered (the latent space, or UMAP's)."""
    manifold: Literal["none", "umap"] = "none"
    """umap: reduce the embeddings with UMAP (the `umap` extra) before clustering, as N2D does; only with
    the in-memory methods (kmeans, gmm, agglomerative, hdbscan, dbscan)."""
    umap: UmapConfig = Field(default_factory=UmapConfig)

    @property
    def described(self) -> str:
        """The method as progress lines and errors name it: `gmm`, or `umap + gmm` after a manifold step."""
        return self.method if self.manifold == "none" else f"{self.manifold} + {self.method}"

    @model_validator(mode="after")
    def _check_layouts(self) -> ClusterConfig:
        if self.manifold == "umap" and self.umap.n_init > 1 and self.method in ("hdbscan", "dbscan"):
            raise ValueError(f"cluster.umap.n_init={self.umap.n_init} needs a method with k clusters (kmeans, gmm, "
                             f"agglomerative): layouts are compared by the evenness of their cluster sizes, and "
                             f"cluster.method={self.method} chooses its own number of clusters; set "
                             f"cluster.umap.n_init=1")
        return self


class PrivacyConfig(_Section):
    """What a federated client does to its statistics before they leave it; everything is off by default."""

    min_count: int = Field(default=0, ge=0)
    """Clusters with fewer rows than this (the noisy count under DP) are not shared: sums and count sent as 0."""
    epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # .inf is not "no privacy": null is
    """Differential privacy budget of the whole run (None: no DP). Rows are clipped to clip_norm, the sums get
    Gaussian noise and the counts Laplace (or Gaussian) noise, as FedDP-KMeans (Scott et al., ICML 2025)."""
    delta: float = Field(default=1e-6, gt=0, lt=1)
    unit: Literal["row", "client"] = "row"
    """What DP protects. row (data-point-level): one row, clipped to clip_norm. client (client-level, as
    FedDP-KMeans): a client's whole contribution to a release; its per-cluster sums (centred on the broadcast
    centroids) and counts are scaled down together, by one factor, until they fit clip_norm and count_clip."""
    clip_norm: float | None = Field(default=None, gt=0)
    """Needed with epsilon, a data-independent choice (the noise is calibrated to it). unit row: L2 bound of a
    row. unit client: L2 bound of one client's per-cluster sums of (row - its broadcast centroid), all clusters
    together, in one release."""
    count_clip: float | None = Field(default=None, gt=0)
    """unit client, needed with epsilon: bound on one client's count vector in one release (L2 with gaussian
    count noise, L1 with laplace); about rows per client / sqrt(k) leaves a balanced client unscaled."""
    count_noise: Literal["laplace", "gaussian"] = "laplace"
    count_share: float = Field(default=0.2, gt=0, lt=1)
    """Share of each release's budget spent on the counts; the rest goes to the sums."""

    @model_validator(mode="after")
    def _check_clip_norm(self) -> PrivacyConfig:
        if self.epsilon is not None and self.clip_norm is None:
            bound = "a row's L2 norm" if self.unit == "row" else "a client's per-cluster sums (L2)"
            raise ValueError(f"clip_norm is required with epsilon: the noise is calibrated to a data-independent "
                             f"bound on {bound}")
        if self.epsilon is not None and self.unit == "client" and self.count_clip is None:
            raise ValueError("count_clip is required with epsilon and unit client: the count noise is calibrated to "
                             "a data-independent bound on a client's count vector")
        if self.count_clip is not None and self.unit != "client":
            raise ValueError("count_clip applies to unit client (with unit row a row moves a count by 1)")
        return self


class PartitionsConfig(_Section):
    """Where the federated partitions come from."""

    by: Literal["simulate", "column", "folders", "nodes"] = "simulate"
    """simulate: split any data source in the driver (experiments); column: one partition per value of
    `column` in data.path (parquet); folders: one partition per subfolder of data.path (parquet); nodes: each
    Flower SuperNode's own partition, named by its node config (needs backend=flower and flower.address)."""
    column: str = "partition"
    split: Literal["iid", "dirichlet", "clusters"] = "iid"
    """simulate: iid, Dirichlet(alpha) label mix per label, or `clusters_per_partition` labels each (k-FED)."""
    n_partitions: int = Field(default=4, ge=1)
    alpha: float = Field(default=1.0, gt=0)
    clusters_per_partition: int = Field(default=2, ge=1)
    server_rows: int = Field(default=0, ge=0)
    """simulate: rows held out of every partition as server-side data (FedDP-KMeans); when > 0 they are the
    candidate points of the init."""


class FlowerConfig(_Section):
    """federated.backend=flower: where the Flower SuperLink is (docs/federated.md, "The Flower app")."""

    address: str | None = None
    """host:port of the SuperLink (`flower-superlink --host --port`: flwr 1.42 serves its Fleet and Control APIs
    on that one port): `dce federate` submits the Flower app there, and the SuperLink's ServerApp writes the run
    directory (partitions.by=nodes). None: Flower's simulation engine in this process, over the config's partitions."""
    insecure: bool = False
    """Talk to the SuperLink without TLS (a SuperLink started with --insecure, e.g. on loopback)."""
    root_certificates: str | None = None
    """PEM file of the CA that signed the SuperLink's certificate (TLS; None: the system's CAs)."""
    nodes: int | None = Field(default=None, ge=1)
    """SuperNodes the ServerApp waits for before the first exchange (None: those connected when the run starts)."""
    wait: float = Field(default=60.0, gt=0)
    """Seconds the ServerApp waits for those SuperNodes, and for their clients to start."""
    connect_timeout: float = Field(default=5.0, gt=0)
    """Seconds `dce federate` waits for the SuperLink to answer before it stops with an error."""


class FederatedConfig(_Section):
    """`dce federate`: k-means over partitions that never pool their rows. cluster.k, tol, backend and max_iter
    (of the local k-means) come from the cluster section."""

    mode: Literal["one_shot", "rounds"] = "rounds"
    """one_shot: k-FED (local k-means, weighted k-means of the union on the server); rounds: federated Lloyd."""
    local_k: int | None = Field(default=None, ge=1)
    """Clusters of each client's local k-means (one_shot, and the k-means++ init of rounds); default cluster.k."""
    max_rounds: int = Field(default=20, ge=1)
    local_steps: int = Field(default=1, ge=1)
    """rounds: local Lloyd steps per round on each client (FedAvg style); 1 is exact federated Lloyd."""
    init_points: str | None = None
    """rounds: a .npy of server-side points: k rows are the initial centroids, more are init candidates."""
    partitions: PartitionsConfig = Field(default_factory=PartitionsConfig)
    placement: Literal["any", "resource"] | dict[str, str] = "any"
    """any: Ray places the clients; resource: the client of partition p needs the custom resource
    `partition:p`; a mapping names the resource for each partition."""
    quorum: float = Field(default=0.5, gt=0, le=1)
    """Share of the clients that must answer a round; failed or late clients are dropped for that round."""
    round_timeout: float | None = Field(default=None, gt=0)
    """Seconds a round waits for its clients (None: no limit)."""
    secure_aggregation: bool = False
    secure_neighbours: int | None = Field(default=None, ge=2)
    """Secure aggregation: masking neighbours of each client in the SecAgg+ graph (None: every pair up to 8
    clients, else ~2 log2 of the clients, as SecAgg+)."""
    dropout_recovery: bool = False
    """Secure aggregation: a client that drops mid-round is recovered in the same round from its neighbours'
    shares of its self-mask seed (Bonawitz et al. 2017), instead of redoing the round with fresh masks."""
    clients_per_actor: int = Field(default=1, ge=1)
    """Partitions (virtual clients) hosted by one Ray actor, each with its own rows, keys, noise and release:
    1,000 clients on one machine."""
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    compare_centralised: Literal["auto"] | bool = "auto"
    """Fit centralised k-means on the pooled data for the inertia ratio and ARI (auto: when simulated).
    The driver then reads every partition: experiments only."""
    backend: Literal["ray", "flower"] = "ray"
    """ray: one Ray actor per client host; flower: a Flower ServerApp and ClientApps (the `federated-kmeans`
    extra), on Flower's simulation engine or, with flower.address, on a SuperLink and its SuperNodes."""
    flower: FlowerConfig = Field(default_factory=FlowerConfig)

    @model_validator(mode="after")
    def _check_flower(self) -> FederatedConfig:
        deployed = self.backend == "flower" and self.flower.address is not None
        if self.partitions.by == "nodes" and not deployed:
            raise ValueError("federated.partitions.by=nodes needs federated.backend=flower and "
                             "federated.flower.address (the SuperLink whose SuperNodes hold the partitions)")
        if deployed and self.partitions.by != "nodes":
            raise ValueError(f"federated.flower.address={self.flower.address}: the partitions are the SuperNodes' "
                             f"own, so federated.partitions.by should be nodes (got {self.partitions.by})")
        if deployed and self.compare_centralised is True:
            raise ValueError("federated.compare_centralised needs the pooled partitions, which SuperNodes keep")
        if self.backend == "flower":
            check_installed("flwr", extra="federated-kmeans", key="federated.backend")
        return self


class EvaluateConfig(_Section):
    silhouette_sample: int = Field(default=10_000, ge=2)


class ReportConfig(_Section):
    """The report stage: report/index.html (self-contained) and its PNGs; `dce report RUN_DIR` rebuilds it."""

    enabled: bool = True
    """`dce run` ends with the report stage (`dce run --no-report` skips it too)."""
    map: Literal["pca", "umap", "tsne"] = "pca"
    """2-D map of the latent space: PCA (cheap), UMAP (the `umap` extra) or t-SNE (scikit-learn)."""
    sample: int = Field(default=5000, ge=10)
    """Rows of the map: a seeded sample when the run has more."""
    images_per_cluster: int = Field(default=8, ge=1)
    """Image data: sample rows shown per cluster."""


class TrackingConfig(_Section):
    """Experiment tracking of `dce run` (off by default): the config as parameters, every epoch's training losses,
    the final metrics and stage times, and (MLflow) config.yaml, metrics.json and report/index.html as artefacts."""

    backend: Literal["none", "mlflow", "tensorboard"] | list[Literal["mlflow", "tensorboard"]] = "none"
    """none, mlflow, tensorboard, or a list of both (the `tracking` extra installs them)."""
    uri: str | None = None
    """mlflow: tracking URI (http://host:5000, databricks, sqlite:///mlflow.db with the full mlflow package, or a
    file:// folder, which MLflow 3 accepts only with MLFLOW_ALLOW_FILE_STORE=true); None: MLflow's default
    (MLFLOW_TRACKING_URI when set)."""
    experiment: str = "deep-cluster-engine"
    """mlflow: experiment name, created when missing; the MLflow run is named after `name`."""
    dir: str | None = None
    """tensorboard: folder of the event files; None: tensorboard/ in the run directory (required for an
    object-store run directory)."""

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends to log to, in order, without repeats; () when tracking is off."""
        chosen = [self.backend] if isinstance(self.backend, str) else self.backend
        return tuple(dict.fromkeys(b for b in chosen if b != "none"))

    @model_validator(mode="after")
    def _check_installed(self) -> TrackingConfig:
        for backend in self.backends:  # each backend's Python module bears its name
            check_installed(backend, extra="tracking", key="tracking.backend")
        return self


class RayConfig(_Section):
    address: str | None = None
    """Cluster to join; RAY_ADDRESS wins when set. None starts an embedded local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)
    shared_storage: bool = False
    """The run directory, a local path, is on storage that every node mounts at the same path (NFS and the
    like). Without it a local run directory is refused on a multi-node cluster: workers write the run's outputs
    on the node they run on. An object-store run directory needs no such storage."""
    staging_dir: str | None = None
    """Local folder of the driver's where it writes its files of an object-store run directory (s3://, gs://, ...)
    before each is uploaded (default: the system temp dir); no worker uses it (see engine/rundir.py)."""


class PipelineConfig(_Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9_.-]+$")
    """The run's name: its directory is runs/<name> unless --out says otherwise."""
    seed: int = 0
    """Seeds the data split, model initialisation, shuffling and clustering: a run is repeatable."""
    data: DataConfig = Field(default_factory=DigitsSource)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_refined(self) -> PipelineConfig:
        if not self.model.refines:
            return self
        if self.model.base in REFINED_MODELS:
            raise ValueError(f"model.base={self.model.base!r} should be an autoencoder to pretrain, "
                             f"not a clustering model")
        # DEC's labels are the nearest refined centre in Euclidean distance; the cluster section only sets up
        # the partition whose mean codes are the initial centres (k-means: its centroids): a method with k clusters,
        # after a manifold step or not.
        c, name = self.cluster, self.model.name
        if c.method not in REFINE_INIT_METHODS:
            raise ValueError(f"cluster.method={c.method} does not apply to model.name={name}: its centres start "
                             f"from a partition into cluster.k clusters ({', '.join(REFINE_INIT_METHODS)}) and "
                             f"the refined centres label the rows")
        if c.spherical:
            raise ValueError(f"cluster.spherical does not apply to model.name={name}: its soft assignment uses "
                             f"Euclidean distances in the latent space")
        return self

    @model_validator(mode="after")
    def _check_blobs_k(self) -> PipelineConfig:
        if isinstance(self.data, BlobsSource) and self.cluster.k > self.data.n_samples:
            raise ValueError(
                f"cluster.k={self.cluster.k} should be <= data.n_samples={self.data.n_samples}"
            )
        return self

    def _check_posterior(self) -> None:
        c, m = self.cluster, self.model
        if m.name not in POSTERIOR_MODELS:
            raise ValueError(f"cluster.method=posterior labels rows by the model's own posterior q(c|x), which "
                             f"model.name={m.name} does not have; it is for model.name {', '.join(POSTERIOR_MODELS)}")
        if c.manifold != "none" or c.spherical:
            key = "cluster.manifold" if c.manifold != "none" else "cluster.spherical"
            raise ValueError(f"{key} does not apply to cluster.method=posterior: the model's posterior is computed "
                             f"at the embeddings themselves")
        if m.n_clusters is not None and m.n_clusters != c.k:
            raise ValueError(f"model.n_clusters={m.n_clusters} should equal cluster.k={c.k} with "
                             f"cluster.method=posterior: the model's mixture components are the clusters")

    @model_validator(mode="after")
    def _check_cluster(self) -> PipelineConfig:
        c = self.cluster
        if c.manifold != "none" and c.method in NO_MANIFOLD_METHODS:
            raise ValueError(
                f"cluster.manifold={c.manifold} needs an in-memory method (kmeans, gmm, agglomerative, hdbscan, "
                f"dbscan); cluster.method={c.method} does not take one"
            )
        if c.method == "posterior":
            self._check_posterior()
        if c.method == "agglomerative" and c.micro_clusters is not None and c.micro_clusters < c.k:
            raise ValueError(f"cluster.micro_clusters={c.micro_clusters} should be >= cluster.k={c.k}")
        if c.manifold == "umap":
            check_installed("umap", extra="umap", key="cluster.manifold")
        if self.model.name == "vade" and self.model.prior_init == "n2d":
            check_installed("umap", extra="umap", key="model.prior_init")
        if self.report.map == "umap":
            check_installed("umap", extra="umap", key="report.map")
        return self

    @model_validator(mode="after")
    def _check_vade(self) -> PipelineConfig:
        m = self.model
        if m.name == "vade" and self.train.steps is not None:
            raise ValueError(f"train.steps={self.train.steps}: vade counts its pretraining and anchor phases in "
                             f"epochs; set train.epochs instead")
        if m.name == "vade" and m.pretrain_epochs >= self.train.epochs:
            raise ValueError(f"model.pretrain_epochs={m.pretrain_epochs} should be < train.epochs={self.train.epochs}: "
                             f"vade trains its mixture prior in the epochs after the autoencoder's pretraining")
        if m.vade_lr is not None and m.name != "vade":
            raise ValueError(f"model.vade_lr is a setting of vade, not of {m.name} (its learning rate is train.lr)")
        return self

    @model_validator(mode="after")
    def _check_bce_inputs(self) -> PipelineConfig:
        if self.model.name in ("vae", "vade") and self.model.recon_loss == "bce" and self.data.normalize in (
                "standard", "center"):
            raise ValueError(f"model.recon_loss='bce' needs inputs in [0, 1], but data.normalize="
                             f"'{self.data.normalize}' centres "
                             "them on 0; use data.normalize=minmax (or max on non-negative data), or "
                             "model.recon_loss=mse")
        trained = self.model.base if self.model.refines else self.model.name
        if self.model.center_input and trained not in ("vae", "vade"):
            raise ValueError(f"model.center_input is a setting of vae and vade, not of {trained} (centre its input "
                             f"with data.normalize=center)")
        if self.model.center_input and self.data.normalize in ("standard", "center"):
            raise ValueError(f"model.center_input maps inputs in [0, 1] to [-1, 1], but data.normalize="
                             f"'{self.data.normalize}' already centres them on 0; use data.normalize=max or minmax, "
                             "or leave model.center_input false")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable hash of the resolved config, recorded in every manifest.

        Only the settings that differ from their defaults are hashed, so a setting added to the schema later
        (with a default that keeps the old behaviour) leaves the hash of older runs unchanged and they stay
        resumable; a default that changes behaviour must therefore come with a new setting name."""
        settings = _non_default(self)
        # Where a run is tracked does not change its results: turning tracking on keeps a run resumable.
        settings.pop("tracking", None)
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _non_default(section: BaseModel) -> dict[str, Any]:
    """The section's settings that differ from their defaults (JSON values), nested sections recursively
    (an all-default one is dropped). A single-valued Literal field, such as data.source, is a union's tag and
    always kept: without it two all-default sources of different kinds would hash alike."""
    from pydantic_core import PydanticUndefined, to_jsonable_python

    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            nested = _non_default(value)
            if nested:
                out[name] = nested
            continue
        if get_origin(field.annotation) is Literal and len(get_args(field.annotation)) == 1:
            out[name] = to_jsonable_python(value)
            continue
        default = field.get_default(call_default_factory=True)
        if default is PydanticUndefined or to_jsonable_python(value) != to_jsonable_python(default):
            out[name] = to_jsonable_python(value)
    return out


def check_installed(module: str, *, extra: str, key: str) -> None:
    """ConfigError naming `key` and the pip extra to install when `module` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key} needs the Python module '{module}', which is not installed; "
            f"install it with: pip install 'deep-cluster-engine[{extra}]'"
        )


# ---- loading ---------------------------------------------------------------------------------------


def resolve_config_path(path: str | Path | None) -> Path:
    """The config file for `path`: the default demo when None, else the file, else configs/<name>.yaml."""
    if path is None:
        return CONFIG_DIR / DEFAULT_CONFIG
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config, apply `a.b=c` overrides, and validate."""
    file = resolve_config_path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}{yaml_position(e)}: not valid YAML: {yaml_problem(e)}") from None
    if raw is None:
        raise ConfigError(f"{file}: the config is empty; give it at least one section (data:, model:, ...), or run "
                          f"without a CONFIG for the default demo")
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(file))


def yaml_position(e: yaml.YAMLError) -> str:
    """`:LINE:COLUMN` (1-based) of a YAML error, where PyYAML knows it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, on one line (its own message spans several, with a quote of the file)."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return "; ".join(p for p in parts if p) or str(e).splitlines()[0]


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, *, source: str = "config"
) -> PipelineConfig:
    data = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(data, item)
    keys = [item.partition("=")[0].strip() for item in overrides or []]
    if "train.epochs" in keys and "train.steps" not in keys and isinstance(data.get("train"), dict):
        data["train"]["steps"] = None  # epochs given on the command line replace a recipe's schedule in steps
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`12`, `true`, `[1, 2]`, `null`)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' should look like section.key=value")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str):
        # YAML 1.1 reads `1e-3` as a string; a user typing it means the number.
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    node[parts[-1]] = parsed


_TYPE_TAGS = {"bool", "int", "float", "str", "none", "list", "dict"}


def format_validation_error(e: ValidationError) -> str:
    """One readable line per bad key; the alternatives of a union (`true`, `false` or `'auto'`) are merged."""
    by_key: dict[str, list[str]] = {}
    for err in e.errors():
        # Unions put the member's type in the path (train.use_gpu.bool), discriminated unions the tag
        # (data.blobs.n_samples): neither is a key the user wrote.
        loc = [str(p) for p in err["loc"] if not (str(p) in _TYPE_TAGS or "[" in str(p))]
        if len(loc) >= 2 and loc[0] == "data" and loc[1] in {"digits", "blobs", "parquet", "npy", "idx"}:
            loc = [loc[0], *loc[2:]]
        key = ".".join(loc) or "config"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{key}'"
        elif err["type"] == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag")
            msg = f"'{key}.source' must be one of digits, blobs, parquet, npy, idx; got {tag!r}"
        elif err["type"] == "missing":
            msg = f"missing key '{key}'"
        elif err["type"] == "value_error":
            # A whole-config or whole-section check names its keys itself; a nested section's is prefixed.
            msg = str(err["ctx"]["error"]) if len(loc) <= 1 else f"'{key}': {err['ctx']['error']}"
        else:
            msg = f"'{key}': {err['msg']} (got {err.get('input')!r})"
        by_key.setdefault(key, []).append(msg)
    lines = []
    for key, msgs in by_key.items():
        if len(msgs) > 1 and all(m.startswith(f"'{key}': ") for m in msgs):
            got = msgs[0][msgs[0].rfind(" (got "):]
            alternatives = " or ".join(m[len(key) + 4: m.rfind(" (got ")] for m in msgs)
            lines.append(f"'{key}': {alternatives}{got}")
        else:
            lines.extend(msgs)
    return "; ".join(lines)
