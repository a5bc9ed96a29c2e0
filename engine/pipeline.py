"""Stage orchestration over a run directory: prepare, train, embed, cluster, evaluate."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import PipelineConfig, config_from_dict
from engine.data import open_source, read_dataset, read_manifest, read_table
from engine.data.describe import DatasetInfo, describe
from engine.data.schema import CLUSTER, ID, X
from engine.errors import ConfigError, DataError, IncompleteResultError
from engine.progress import Progress

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
# Inputs up to this size are cached in Ray's object store for the epochs of training instead of being
# re-read from the source every epoch.
CACHE_BYTES = 2 << 30


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


# ---- run directory ---------------------------------------------------------------------------------


def run_dir_for(cfg: PipelineConfig, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / cfg.name


def save_config(cfg: PipelineConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / CONFIG_FILE, cfg.to_yaml())


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The resolved config saved in a run directory, with optional overrides."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise IncompleteResultError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, overrides, source=str(path))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _record(run_dir: Path, **fields: Any) -> None:
    """Merge facts about the run (stage times, resources, versions) into run.json."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key].update(value)
        else:
            record[key] = value
    _atomic_write(path, json.dumps(record, indent=2, default=str))


# ---- stages ----------------------------------------------------------------------------------------


def open_input(cfg: PipelineConfig):
    """Open the configured source (file and column checks) and check k against its row count."""
    source = open_source(cfg.data)
    if cfg.cluster.k > source.n_rows:
        raise ConfigError(f"cluster.k={cfg.cluster.k} should be <= the number of rows ({source.n_rows})")
    return source


def validate_input(cfg: PipelineConfig, progress: Progress):
    """Open the source and read it once: every data error surfaces here, before training."""
    source = open_input(cfg)
    with progress.stage("validate", f"{cfg.data.source}: {source.n_rows} rows"):
        ds = read_dataset(source)
        if source.dim is not None and source.n_rows * source.dim * 4 <= CACHE_BYTES:
            # Small inputs are read once into the object store and reused by every later stage.
            ds = ds.materialize()
        info = describe(ds, normalize=cfg.data.normalize, image_shape=source.image_shape, source=cfg.data.source)
        progress.info(f"{info.n_rows} rows x {info.dim} features"
                      + (f", {info.n_classes} classes" if info.n_classes else ", no labels"))
    return ds, info


def train_stage(cfg: PipelineConfig, run_dir: Path, progress: Progress, validated=None) -> DatasetInfo:
    from engine.runtime import use_gpu
    from engine.train import train_encoder

    ds, info = validated or validate_input(cfg, progress)
    save_config(cfg, run_dir)
    gpu = use_gpu(cfg.train.use_gpu)
    if hasattr(progress, "set_epochs"):
        progress.set_epochs(cfg.train.epochs)
    with progress.stage("train", f"{cfg.model.name}, {cfg.train.num_workers} worker(s)"
                        + (" on GPU" if gpu else "")):
        train_encoder(ds.select_columns([X]), in_dim=info.dim, shift=info.shift, scale=info.scale,
                      model=model_args(cfg), train=cfg.train, seed=cfg.seed, run_dir=run_dir,
                      config_hash=cfg.hash(), image_shape=info.image_shape, use_gpu=gpu,
                      on_epoch=progress.epoch)
    _record(run_dir, data=info.to_json())
    return info


def model_args(cfg: PipelineConfig) -> dict[str, Any]:
    """The model's build options: `model.*`, with n_clusters taken from cluster.k when it is not set."""
    args = cfg.model.model_dump()
    if args["n_clusters"] is None:
        args["n_clusters"] = cfg.cluster.k
    return args


def embed_stage(cfg: PipelineConfig, run_dir: Path, progress: Progress, validated=None) -> dict[str, Any]:
    from engine.embed import embed_dataset
    from engine.runtime import use_gpu

    model_dir = run_dir / "model"
    read_manifest(model_dir, stage="train")
    source = open_source(cfg.data)
    if validated is not None:
        ds, dim = validated[0], validated[1].dim
    else:
        ds = read_dataset(source)
        # Parquet list columns: the dimension is known after one read.
        dim = source.dim if source.dim is not None else describe(ds).dim
    with progress.stage("embed", f"{source.n_rows} rows, {cfg.embed.concurrency} actor(s)"):
        manifest = embed_dataset(ds, model_dir, run_dir / "embeddings", dim=dim,
                                 expected_rows=source.n_rows, config_hash=cfg.hash(),
                                 batch_size=cfg.embed.batch_size, concurrency=cfg.embed.concurrency,
                                 use_gpu=use_gpu(cfg.embed.use_gpu))
        progress.info(f"{manifest['rows']} embeddings of dimension {manifest['latent_dim']} "
                      f"in {len(manifest['files'])} shard(s)")
    return manifest


def cluster_stage(cfg: PipelineConfig, run_dir: Path, progress: Progress) -> dict[str, Any]:
    from engine.cluster.shards import assign_shards

    c = cfg.cluster
    embeddings = run_dir / "embeddings"
    rows = read_manifest(embeddings, stage="embed")["rows"]
    if c.k > rows:
        raise ConfigError(f"cluster.k={c.k} should be <= the number of embeddings ({rows})")
    with progress.stage("cluster", f"{c.method} k={c.k} on {rows} rows"):
        km = _fit_clusters(cfg, embeddings, run_dir, progress)
        progress.info(f"inertia {km.inertia_:.6g} after {km.n_iter_} iteration(s)")
        centroids = km.cluster_centers_
        tmp = run_dir / f".centroids.tmp-{os.getpid()}.npy"
        np.save(tmp, centroids)
        os.replace(tmp, run_dir / "centroids.npy")
        summary = {"method": c.method, "k": c.k, "inertia": float(km.inertia_), "n_iter": int(km.n_iter_),
                   "history": km.history_}
        _atomic_write(run_dir / "cluster.json", json.dumps(summary, indent=2, default=float))
    if c.method != "sample_assign":  # sample_assign has written its assignments already
        with progress.stage("assign", f"{rows} rows"):
            assign_shards(embeddings, centroids, run_dir / "assignments", config_hash=cfg.hash(),
                          concurrency=cfg.embed.concurrency, backend=c.backend)
    return summary


def _fit_clusters(cfg: PipelineConfig, embeddings: Path, run_dir: Path, progress: Progress):
    """The fitted estimator for `cluster.method`; its inertia is over every row."""
    from engine.cluster import KMeans
    from engine.cluster._sharded import ShardedKMeans, fit_sample_then_assign
    from engine.cluster.shards import load_vectors

    c = cfg.cluster
    if c.method == "kmeans":
        _, z, _ = load_vectors(embeddings)
        return KMeans(n_clusters=c.k, init=c.init, n_init=c.n_init, max_iter=c.max_iter, tol=c.tol, seed=cfg.seed,
                      backend=c.backend, callback=progress.iteration).fit(z)
    if c.method == "sharded":
        return ShardedKMeans(n_clusters=c.k, init=c.init, max_iter=c.max_iter, tol=c.tol, seed=cfg.seed,
                             backend=c.backend, num_actors=c.num_actors).fit(embeddings)
    km, manifest = fit_sample_then_assign(embeddings, run_dir / "assignments", c.k, c.sample_size, init=c.init,
                                          max_iter=c.max_iter, tol=c.tol, seed=cfg.seed, backend=c.backend,
                                          num_actors=c.num_actors, config_hash=cfg.hash(),
                                          concurrency=cfg.embed.concurrency)
    # The sample's inertia is not the data's: the assignments' distances give the inertia over every row.
    table = read_table(run_dir / "assignments", stage="assign", columns=["distance"])
    km.inertia_ = float(np.sum(np.square(table.column("distance").to_numpy().astype(np.float64))))
    return km


def evaluate_stage(cfg: PipelineConfig, run_dir: Path, progress: Progress) -> dict[str, Any]:
    from engine.cluster.shards import load_vectors
    from engine.metrics import evaluate

    with progress.stage("evaluate"):
        ids, z, labels = load_vectors(run_dir / "embeddings")
        table = read_table(run_dir / "assignments", stage="assign", columns=[ID, CLUSTER])
        pred = match_by_id(ids, table.column(ID).to_numpy(), table.column(CLUSTER).to_numpy(),
                           where=str(run_dir / "assignments"))
        cluster_file = run_dir / "cluster.json"
        inertia = json.loads(cluster_file.read_text())["inertia"] if cluster_file.is_file() else None
        metrics = evaluate(pred, labels_true=labels, X=z, inertia=inertia,
                           silhouette_sample=cfg.evaluate.silhouette_sample, seed=cfg.seed)
        _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def match_by_id(ids: np.ndarray, other_ids: np.ndarray, values: np.ndarray, *, where: str) -> np.ndarray:
    """`values` (keyed by `other_ids`) reordered to `ids`; both id sets must be equal, each id exactly once."""
    if len(other_ids) != len(ids):
        raise DataError(f"{where}: holds {len(other_ids)} rows but the embeddings hold {len(ids)}")
    order = np.argsort(other_ids, kind="stable")
    sorted_ids = other_ids[order]
    if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise DataError(f"{where}: some ids appear more than once")
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.minimum(pos, len(sorted_ids) - 1)
    if (sorted_ids[pos] != ids).any():
        missing = ids[sorted_ids[pos] != ids][0]
        raise DataError(f"{where}: id {missing} of the embeddings has no row")
    return values[order][pos]


# ---- the whole pipeline ----------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig, out: str | Path | None = None, *, progress: Progress | None = None,
                 verbose: bool = False) -> RunResult:
    """Run every stage into the run directory and return the metrics."""
    from engine.runtime import init_ray

    progress = progress or Progress()
    run_dir = run_dir_for(cfg, out)
    started = time.time()
    open_input(cfg)  # file, column and k checks before Ray starts
    with progress.stage("ray"):
        res = init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, verbose=verbose)
        progress.info(res.describe())
    # The run directory is created only once the input has been read and found valid.
    validated = validate_input(cfg, progress)
    save_config(cfg, run_dir)
    _record(run_dir, name=cfg.name, started=started, config_hash=cfg.hash(), versions=versions(),
            machine=machine(), ray=res.describe())
    seconds: dict[str, float] = {}

    def timed(name: str, stage, *args):
        t0 = time.perf_counter()
        result = stage(cfg, run_dir, progress, *args)
        seconds[name] = round(time.perf_counter() - t0, 3)
        _record(run_dir, seconds={name: seconds[name]})
        return result

    # Train and embed reuse the validated (and, when small, materialised) input instead of re-reading it.
    timed("train", train_stage, validated)
    timed("embed", embed_stage, validated)
    timed("cluster", cluster_stage)
    metrics = timed("evaluate", evaluate_stage)
    _record(run_dir, finished=time.time())
    return RunResult(run_dir=run_dir, metrics=metrics, seconds=seconds)


def versions() -> dict[str, str]:
    import faiss
    import ray
    import sklearn
    import torch

    from engine import __version__

    return {"engine": __version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "faiss": faiss.__version__, "scikit-learn": sklearn.__version__,
            "numpy": np.__version__}


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
