"""Typed pipeline configuration: YAML loading, `--set a.b=c` overrides and validation errors that name the key."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "digits.yaml"


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---- data sources ----------------------------------------------------------------------------------


class _SourceBase(_Section):
    normalize: Literal["none", "minmax", "standard", "max"] = "none"
    """How `x` is scaled before training: per-feature min-max, per-feature standardisation, or division
    by the global maximum (images). Statistics are computed in one pass over the data."""
    rows_per_shard: int = Field(default=50_000, ge=1)


class DigitsSource(_SourceBase):
    source: Literal["digits"] = "digits"
    normalize: Literal["none", "minmax", "standard", "max"] = "max"


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
    normalize: Literal["none", "minmax", "standard", "max"] = "max"


DataConfig = Annotated[
    DigitsSource | BlobsSource | ParquetSource | NpySource | IdxSource, Field(discriminator="source")
]


# ---- stages ----------------------------------------------------------------------------------------


class ModelConfig(_Section):
    name: str = "mlp_ae"
    latent_dim: int = Field(default=10, ge=1)
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [500, 500, 2000])
    """Encoder layer widths; the decoder mirrors them (DEC's d-500-500-2000-latent)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
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
    output_activation: Literal["linear", "sigmoid"] = "linear"
    """gan: the generator's output layer; sigmoid for inputs scaled to [0, 1] (normalize: max or minmax),
    as the paper does for images; linear for any other range."""


class TrainConfig(_Section):
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=256, ge=1)
    """Global batch: split evenly over the workers."""
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=10, ge=1)
    """Epochs between checkpoints reported to Ray Train (the last epoch always is). Progress is shown
    every epoch, and every epoch's losses are kept in the checkpoint's history."""


class EmbedConfig(_Section):
    batch_size: int = Field(default=4096, ge=1)
    concurrency: int = Field(default=2, ge=1)
    """Embedding actors; each loads the checkpoint once."""
    use_gpu: bool | Literal["auto"] = "auto"


class ClusterConfig(_Section):
    method: Literal["kmeans", "sharded", "sample_assign"] = "kmeans"
    """kmeans: in memory in the driver; sharded: exact Lloyd over Ray actors holding the embedding shards;
    sample_assign: k-means on a seeded sample, then every row assigned by Ray Data tasks."""
    k: int = Field(default=10, ge=1)
    init: Literal["k-means++", "random"] = "k-means++"
    n_init: int = Field(default=10, ge=1)
    max_iter: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-4, ge=0)
    backend: Literal["auto", "faiss", "torch"] = "auto"
    num_actors: int | None = Field(default=None, ge=1)
    """sharded: shard actors (default: one per shard, up to the cluster's CPUs)."""
    sample_size: int = Field(default=1_000_000, ge=1)
    """sample_assign: rows k-means is trained on."""


class EvaluateConfig(_Section):
    silhouette_sample: int = Field(default=10_000, ge=2)


class RayConfig(_Section):
    address: str | None = None
    """Cluster to join; RAY_ADDRESS wins when set. None starts an embedded local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    num_gpus: int | None = Field(default=None, ge=0)


class PipelineConfig(_Section):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    data: DataConfig = Field(default_factory=DigitsSource)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_blobs_k(self) -> PipelineConfig:
        if isinstance(self.data, BlobsSource) and self.cluster.k > self.data.n_samples:
            raise ValueError(
                f"cluster.k={self.cluster.k} should be <= data.n_samples={self.data.n_samples}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable hash of the resolved config, recorded in every manifest."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, source=str(file))


def config_from_dict(
    raw: dict[str, Any], overrides: list[str] | None = None, *, source: str = "config"
) -> PipelineConfig:
    data = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(data, item)
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
        elif err["type"] == "value_error" and not loc:
            msg = str(err["ctx"]["error"])
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
