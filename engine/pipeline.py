"""Stage orchestration over a run directory: prepare, train, (refine,) embed, cluster, evaluate, report."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from engine import storage
from engine.config import PipelineConfig
from engine.data import open_source, read_dataset, read_manifest, read_table
from engine.data.describe import DatasetInfo, describe
from engine.data.folders import partial_folder
from engine.data.schema import CLUSTER, ID, X, match_by_id
from engine.errors import ConfigError, IncompleteResultError
from engine.methods import CENTROID_METHODS
from engine.progress import Progress
from engine.rundir import (
    CONFIG_FILE,
    RunDir,
    as_run_dir,
    load_run_config,
    model_dir_for,
    open_run_dir,
    read_run,
    record_run,
    remove_staged_leftovers,
    run_dir_for,
    save_config,
)
from engine.runtime import gpus_possible

if TYPE_CHECKING:
    from engine.runtime import Resources
    from engine.tracking import Tracker

# Inputs up to this size are cached in Ray's object store for the epochs of training instead of being
# re-read from the source every epoch.
CACHE_BYTES = 2 << 30


@dataclass
class RunResult:
    run_dir: Path | str  # a local path or an object-store URI
    metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


# ---- run directory ---------------------------------------------------------------------------------


def config_for_resume(run_dir: str | Path, *, overrides: list[str] | None = None, config: str | None = None,
                      out: str | Path | None = None) -> PipelineConfig:
    """The config a resumed run continues with: the one saved in `run_dir`, unchanged."""
    given = [flag for flag, value in (("--set", overrides), ("a CONFIG", config), ("--out", out)) if value]
    if given:
        raise ConfigError(f"{' and '.join(given)} cannot be used with --resume: a resumed run continues with the "
                          f"config saved in {storage.join(run_dir, CONFIG_FILE)} and writes into {run_dir}; to change "
                          f"settings, start a fresh run (dce run CONFIG --set ... --out NEW_DIR)")
    return load_run_config(run_dir)


def finished_stages(cfg: PipelineConfig, run_dir: RunDir | Path) -> set[str]:
    """The stages of a run that a resumed run skips: in pipeline order, each with a complete folder newer
    than the run's start and than its input, made with the run's config. The first stage that is missing,
    half-written (no manifest) or stale is redone, and so is every later one."""
    run = as_run_dir(run_dir)
    run_dir = run.local
    newer_than = float(read_run(run_dir).get("started", 0))
    model_dir, model_stage = model_dir_for(cfg, run_dir)
    chain = [("train", run_dir / "model", "train", ())]
    if cfg.model.refines:
        chain.append(("refine", model_dir, model_stage, ()))
    chain += [("embed", run.folder("embeddings"), "embed", ()),
              ("cluster", run.folder("assignments"), "assign", ("centroids.npy", "cluster.json"))]
    done: set[str] = set()
    for name, folder, stage, files in chain:
        try:
            manifest = read_manifest(folder, stage=stage)
        except IncompleteResultError:
            break
        if manifest["time"] < newer_than or any(
                not (run_dir / f).is_file() or (run_dir / f).stat().st_mtime < newer_than for f in files):
            break
        if manifest["config_hash"] != cfg.hash():
            raise ConfigError(f"{folder} was made with other settings (config hash {manifest['config_hash']}) than "
                              f"{storage.join(run.location, CONFIG_FILE)} (hash {cfg.hash()}), e.g. by a stage "
                              f"command with --set; it cannot be resumed: start a fresh run (dce run CONFIG --out "
                              f"NEW_DIR)")
        done.add(name)
        newer_than = manifest["time"]
    return done


# ---- stages ----------------------------------------------------------------------------------------


def check_cluster_sizes(cfg: PipelineConfig, n: int, what: str) -> None:
    """The cluster settings against the number of rows, before anything is written: k for a refining model (DEC
    and IDEC seed with k-means), every size-dependent setting of the clustering method otherwise."""
    from engine.cluster import check_sizes

    check_faiss(cfg)
    components = cfg.model.n_clusters or cfg.cluster.k
    if cfg.model.name == "vade" and components > n:  # its prior is a mixture fitted to the rows' codes
        key = "model.n_clusters" if cfg.model.n_clusters else "cluster.k"
        raise ConfigError(f"{key}={components} should be <= the number of {what} ({n}): model.name=vade fits one "
                          f"mixture component per cluster to them")
    if cfg.model.refines:
        if cfg.cluster.k > n:
            raise ConfigError(f"cluster.k={cfg.cluster.k} should be <= the number of {what} ({n})")
        return
    check_sizes(cfg.cluster, n, what)


def open_input(cfg: PipelineConfig, *, check_model: bool = True):
    """Open the configured source (file and column checks), check k against its row count and (unless the
    source holds embeddings to cluster) the model against its shape (conv_ae needs images)."""
    source = open_source(cfg.data)
    check_cluster_sizes(cfg, source.n_rows, "rows")
    if not check_model:
        return source
    # Imported after the checks that need no model, and only for a model: torch takes ~1 s to import, which a
    # refusal, or the clustering of embeddings, need not wait for.
    from engine.models import build_model
    from engine.train.augment import augment_options

    if source.dim is not None:  # Parquet list columns: train_encoder checks after reading
        build_model(in_dim=source.dim, image_shape=source.image_shape, **model_args(cfg))
    augment_options(cfg.train.augment, source.image_shape)
    return source


def validate_input(cfg: PipelineConfig, progress: Progress, *, check_model: bool = True):
    """Open the source and read it once: every data error surfaces here, before training."""
    source = open_input(cfg, check_model=check_model)
    with progress.stage("validate", f"{cfg.data.source}: {source.n_rows} rows"):
        ds = read_dataset(source)
        if source.dim is not None and source.n_rows * source.dim * 4 <= CACHE_BYTES:
            # Small inputs are read once into the object store and reused by every later stage; in source
            # order, so a seeded run trains on the same batches every time, resumed or not.
            ds.context.execution_options.preserve_order = True
            ds = ds.materialize()
        info = describe(ds, normalize=cfg.data.normalize, image_shape=source.image_shape, source=cfg.data.source,
                        where=getattr(cfg.data, "path", None), column=getattr(cfg.data, "column", X),
                        id_column=getattr(cfg.data, "id_column", None) or ID)
        progress.info(f"{info.n_rows} rows x {info.dim} features"
                      + (f", {info.n_classes} classes" if info.n_classes else ", no labels"))
    return ds, info


def train_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress, validated=None,
                resume: bool = False, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                pretrained: str | Path | None = None) -> DatasetInfo:
    """Train the encoder into model/; `on_epoch` gets every epoch's losses too (after the progress display).
    Ray Train's own state goes to train/, in the store itself for an object-store run directory.
    `pretrained` (a run directory, its model/ or a checkpoint of the model the config builds) is taken as the
    trained model instead: the later stages (refine, embed, cluster) start from it."""
    from engine.runtime import use_gpu
    from engine.train import adopt_pretrained, train_encoder

    run = as_run_dir(run_dir)
    run_dir = run.local
    ds, info = validated or validate_input(cfg, progress)
    save_config(cfg, run_dir)
    if pretrained is not None:
        with progress.stage("train", f"pretrained: {pretrained}"):
            model_dir = adopt_pretrained(pretrained, in_dim=info.dim, model=model_args(cfg),
                                         image_shape=info.image_shape, run_dir=run_dir, config_hash=cfg.hash())
            progress.info(f"{read_manifest(model_dir, stage='train')['epochs']} epochs, trained before")
        record_run(run_dir, data=info.to_json(), pretrained=str(pretrained))
        return info
    gpu = use_gpu(cfg.train.use_gpu)
    model = model_args(cfg)
    if cfg.model.refines:
        from engine.models.dec import check_base

        check_base(cfg.model.base)
    train = cfg.train.for_rows(info.n_rows)  # a schedule in optimizer steps: as many epochs as that takes
    if cfg.train.steps is not None:
        progress.info(f"train.steps={cfg.train.steps}: {train.epochs} epochs of {info.n_rows} rows in batches of "
                      f"{train.batch_size}")
    if hasattr(progress, "set_epochs"):
        progress.set_epochs(train.epochs)

    def epoch_done(record: dict[str, Any]) -> None:
        progress.epoch(record)
        if on_epoch is not None:
            on_epoch(record)

    with progress.stage("train", f"{model['name']}, {cfg.train.num_workers} worker(s)"
                        + (" on GPU" if gpu else "")):
        train_encoder(ds.select_columns([X]), in_dim=info.dim, shift=info.shift, scale=info.scale,
                      model=model, train=train, seed=cfg.seed, run_dir=run_dir,
                      config_hash=cfg.hash(), image_shape=info.image_shape, use_gpu=gpu, resume=resume,
                      on_epoch=epoch_done, train_storage=run.train_storage)
    manifest = read_manifest(run_dir / "model", stage="train")
    record_run(run_dir, data=info.to_json(), placement={"train": _placed(manifest)})
    return info


def model_args(cfg: PipelineConfig) -> dict[str, Any]:
    """The train stage's build options (`model.*`, `base` for dec / idec), n_clusters from cluster.k when unset."""
    args = cfg.model.pretrain_options()
    if args["n_clusters"] is None:
        args["n_clusters"] = cfg.cluster.k
    return args


def refine_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress, validated=None,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """dec / idec: the initial centres from the `cluster` partition of the pretrained model's embeddings (k-means, or
    e.g. N2D's UMAP + GMM), then DEC / IDEC refinement into refined/;
    `on_update` gets every target update's record too (after the progress display)."""
    from engine.runtime import offload, use_gpu
    from engine.train.refine import initial_centers, refine_model

    run = as_run_dir(run_dir)
    run_dir = run.local
    if not cfg.model.refines:
        raise ConfigError(f"model.name={cfg.model.name!r} has no refine stage; it is for dec and idec")
    model_dir = run_dir / "model"
    read_manifest(model_dir, stage="train")
    ds, dim, n_rows = _input(cfg, validated)
    embed_gpu = use_gpu(cfg.embed.use_gpu)
    batch, actors = cfg.embed.plan(gpus_possible() if embed_gpu else 0)
    c = cfg.cluster
    what = "k-means" if c.described == "kmeans" else c.described
    with progress.stage("refine init", f"{what} k={c.k} on the pretrained embeddings"):
        centers, initial = initial_centers(ds, model_dir, dim=dim, n_rows=n_rows, cluster=cfg.cluster,
                                           seed=cfg.seed, batch_size=batch, concurrency=actors, use_gpu=embed_gpu,
                                           remote=offload(gpu=embed_gpu), callback=progress.iteration)
        progress.info(", ".join(f"{k} {v:.4g}" for k, v in initial.items()))
    r, gpu = cfg.refine, use_gpu(cfg.train.use_gpu)
    if hasattr(progress, "set_epochs"):
        progress.set_epochs(math.ceil(r.max_iter / r.update_interval) + 1)
    with progress.stage("refine", f"{cfg.model.name}, {cfg.train.num_workers} worker(s)" + (" on GPU" if gpu else "")):
        summary = refine_model(ds, pretrained=model_dir, centers=centers, name=cfg.model.name, refine=r,
                               num_workers=cfg.train.num_workers, cpus_per_worker=cfg.train.cpus_per_worker,
                               placement_strategy=cfg.train.placement_strategy,
                               seed=cfg.seed, run_dir=run_dir, train_storage=run.train_storage,
                               config_hash=cfg.hash(), use_gpu=gpu, initial=initial,
                               on_update=lambda record: _update_done(record, progress, on_update))
        progress.info(f"{summary['iterations']} steps, {summary['updates']} target updates, stopped by "
                      f"{summary['stopped']}")
    record_run(run_dir, refine=summary, placement={"refine": _placed(summary)})
    return summary


def _update_done(record: dict[str, Any], progress: Progress, on_update) -> None:
    progress.epoch({"epoch": int(record["update"]), **record})
    if on_update is not None:
        on_update(record)


def _input(cfg: PipelineConfig, validated=None):
    """(dataset, dimension, rows) of the configured input: the validated one when given, else read again."""
    source = open_source(cfg.data)
    if validated is not None:
        return validated[0], validated[1].dim, source.n_rows
    ds = read_dataset(source)
    # Parquet list columns: the dimension is known after one read.
    return ds, (source.dim if source.dim is not None else describe(ds).dim), source.n_rows


def embed_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress, validated=None) -> dict[str, Any]:
    from engine.embed import embed_dataset
    from engine.runtime import use_gpu

    run = as_run_dir(run_dir)
    model_dir, stage = model_dir_for(cfg, run.local)
    read_manifest(model_dir, stage=stage)
    ds, dim, n_rows = _input(cfg, validated)
    gpu = use_gpu(cfg.embed.use_gpu)
    batch, actors = cfg.embed.plan(gpus_possible() if gpu else 0)
    with progress.stage("embed", f"{n_rows} rows, {actors} actor(s)" + (" on GPU" if gpu else "")):
        manifest = embed_dataset(ds, model_dir, run.folder("embeddings"), dim=dim,
                                 expected_rows=n_rows, config_hash=cfg.hash(), batch_size=batch, concurrency=actors,
                                 use_gpu=gpu, max_restarts=cfg.embed.max_restarts)
        record_run(run.local, placement={"embed": {"asked": {"CPU": 1, "GPU": 1 if gpu else 0},
                                                   "actors": actors, "batch_size": batch}})
        progress.info(f"{manifest['rows']} embeddings of dimension {manifest['latent_dim']} "
                      f"in {len(manifest['files'])} shard(s)"
                      + (f", {manifest['resumed_rows']} of them kept from before" if manifest["resumed_rows"] else ""))
    return manifest


def import_embeddings(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress) -> dict[str, Any]:
    """Make `cfg.data` (a parquet source of vectors made elsewhere) the run's embeddings, for `dce cluster`.

    The validating pass (dimension, NaN/inf with file and row, duplicate ids) reads every row before
    anything is written; then `run_dir/embeddings/` (`id`, `z`, `label`) is written with its manifest, so
    every cluster method and `dce evaluate` read it as they read a pipeline run's embeddings. The source
    files are not changed.
    """
    from engine.data.folders import write_dataset
    from engine.data.schema import LABEL, Z

    run = as_run_dir(run_dir)
    ds, info = validate_input(cfg, progress, check_model=False)

    def to_embeddings(batch):
        cols = [ID, X] + ([LABEL] if LABEL in batch.column_names else [])
        return batch.select(cols).rename_columns([ID, Z] + cols[2:])

    with progress.stage("import", str(cfg.data.path)):
        save_config(cfg, run.local)
        manifest = write_dataset(ds.map_batches(to_embeddings, batch_format="pyarrow"), run.folder("embeddings"),
                                 stage="embed", config_hash=cfg.hash(), expected_rows=info.n_rows,
                                 latent_dim=info.dim, imported_from=str(cfg.data.path))
        progress.info(f"{manifest['rows']} vectors of dimension {info.dim} in {len(manifest['files'])} shard(s)")
    return manifest


def cluster_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress) -> dict[str, Any]:
    import shutil

    c, run = cfg.cluster, as_run_dir(run_dir)
    embeddings = run.folder("embeddings")
    manifest = read_manifest(embeddings, stage="embed")
    rows = manifest["rows"]
    check_cluster_sizes(cfg, rows, "embeddings")
    method = cfg.model.name if cfg.model.refines else c.method
    if method == "posterior":
        return _cluster_posterior(cfg, run, progress, rows)
    if not cfg.model.refines and (c.method not in CENTROID_METHODS or c.manifold != "none"):
        return _cluster_in_memory(cfg, run, progress, rows)
    # The k-means state of an interrupted cluster stage, for these embeddings and settings only.
    partial = partial_folder(run.local / "cluster", {"config_hash": cfg.hash(), "embeddings": manifest["time"]})
    summary = _cluster_and_assign(cfg, run, progress, rows, method, partial / "kmeans.npz")
    shutil.rmtree(partial, ignore_errors=True)
    return summary


def _cluster_and_assign(cfg: PipelineConfig, run: RunDir, progress: Progress, rows: int, method: str,
                        checkpoint: Path) -> dict[str, Any]:
    from engine.cluster.assignments import assign_shards

    c, embeddings, run_dir = cfg.cluster, run.folder("embeddings"), run.local
    gpu = _cluster_gpu(cfg)
    with progress.stage("cluster", f"{method} k={c.k} on {rows} rows"):
        km, placed = _fit_clusters(cfg, embeddings, run, progress, checkpoint)
        progress.info(f"inertia {km.inertia_:.6g} after {km.n_iter_} iteration(s)")
        centroids = km.cluster_centers_
        storage.write_npy(run_dir / "centroids.npy", centroids)
        summary = {"method": method, "manifold": "none", "k": c.k, "inertia": float(km.inertia_),
                   "n_iter": int(km.n_iter_), "history": km.history_}
        storage.write_text(run_dir / "cluster.json", json.dumps(summary, indent=2, default=float))
        record_run(run_dir, placement={"cluster": placed})
    if method != "sample_assign":  # sample_assign has written its assignments already
        with progress.stage("assign", f"{rows} rows"):
            assign_shards(embeddings, centroids, run.folder("assignments"), config_hash=cfg.hash(),
                          concurrency=cfg.embed.plan(gpus_possible() if gpu else 0)[1], backend=c.backend,
                          spherical=c.spherical,
                          max_retries=cfg.embed.max_restarts, use_gpu=gpu)
            record_run(run_dir, placement={"assign": {"asked": {"CPU": 1, "GPU": 1 if gpu else 0}}})
    return summary


def _cluster_posterior(cfg: PipelineConfig, run: RunDir, progress: Progress, rows: int) -> dict[str, Any]:
    """`cluster.method: posterior`: every row labelled by the trained model's q(c|x) at its embedding (VaDE's own
    labels); centroids.npy holds the model's component means and `distance` is a row's distance to its own."""
    from engine.cluster.assignments import load_vectors, write_assignments
    from engine.posterior import posterior_labels
    from engine.train import load_checkpoint

    run_dir = run.local
    model_dir, stage = model_dir_for(cfg, run_dir)
    if not (model_dir / storage.MANIFEST).is_file():
        raise ConfigError(f"cluster.method=posterior labels rows by the trained model's posterior q(c|x), and "
                          f"{model_dir} holds no finished model; run the train stage, or choose another "
                          f"cluster.method")
    read_manifest(model_dir, stage=stage)
    with progress.stage("cluster", f"posterior q(c|x) of {cfg.model.name} on {rows} rows"):
        ids, z, _ = load_vectors(run.folder("embeddings"))
        labels, distance, means = posterior_labels(load_checkpoint(model_dir), z)
        inertia = float(np.sum(np.square(distance.astype(np.float64))))
        n_clusters = int(len(np.unique(labels)))
        write_assignments(ids, labels, distance, run.folder("assignments"), config_hash=cfg.hash(),
                          rows_per_file=cfg.data.rows_per_shard, k=int(len(means)), n_noise=0)
        progress.info(f"{n_clusters} of {len(means)} components label rows, inertia {inertia:.6g}")
        storage.write_npy(run_dir / "centroids.npy", means)
        summary = {"method": "posterior", "manifold": "none", "k": int(len(means)), "inertia": inertia,
                   "n_clusters": n_clusters, "n_noise": 0, "noise_fraction": 0.0}
        storage.write_text(run_dir / "cluster.json", json.dumps(summary, indent=2, default=float))
        record_run(run_dir, placement={"cluster": _in_driver(False)})
    return summary


def _cluster_gpu(cfg: PipelineConfig) -> bool:
    """Whether the cluster stage's GPU-capable work asks for GPUs: it follows `embed.use_gpu`, as assignment does."""
    from engine.runtime import use_gpu

    return use_gpu(cfg.embed.use_gpu)


def _in_driver(gpu: bool) -> dict[str, Any]:
    """run.json's record of work done in the driver process."""
    from engine.runtime import where_am_i

    return {"asked": {"GPU": 1 if gpu else 0}, "in_driver": True, "ran_on": where_am_i()}


def _on_gpu(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, Any]]:
    """`fn(*args)` in a Ray task with one GPU (and one CPU) instead of this driver, and where it ran: on a cluster the
    driver runs on the head, which has no GPU and should carry no compute. The task's result must be small; the
    data stay where the task reads and writes them (the run's worker folders)."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=1, max_retries=0)(_placed_call)
    return ray.get(task.remote(fn, *args))


def _placed_call(fn: Callable[..., Any], *args: Any) -> tuple[Any, dict[str, Any]]:
    from engine.runtime import compute_device, where_am_i

    device = compute_device("cuda")
    return fn(*args), {"asked": {"CPU": 1, "GPU": 1}, "in_driver": False, "ran_on": {**where_am_i(),
                                                                                     "device": str(device)}}


def _placed(record: dict[str, Any]) -> dict[str, Any]:
    """The resources and place of a Ray Train stage from its manifest or summary (see engine.train.trainer.ran_on)."""
    return {k: record.get(k) for k in ("asked", "backend", "ran_on", "num_workers")}


def check_faiss(cfg: PipelineConfig) -> None:
    """The cluster settings that need faiss (backend faiss, UMAP's exact Euclidean k-NN graph) with faiss installed,
    else an error naming the extra to install."""
    from engine.runtime import require_faiss

    c = cfg.cluster
    if c.backend == "faiss":
        require_faiss("cluster.backend=faiss")
    if c.manifold == "umap" and getattr(c.umap, "metric", "euclidean") in ("euclidean", "l2"):
        require_faiss("cluster.manifold=umap (its exact Euclidean k-NN graph)")


def _cluster_in_memory(cfg: PipelineConfig, run: RunDir, progress: Progress, rows: int) -> dict[str, Any]:
    """Methods without centroids to assign shards with (gmm, agglomerative, hdbscan, dbscan) and any method
    after a manifold step: labels computed in one process (this one; a Ray task with a GPU on a cluster that has or
    may launch GPUs, see `engine.runtime.offload`), then written as the assignments.

    Whatever the method, centroids.npy holds each cluster's mean embedding, `distance` is a row's Euclidean
    distance to it in the latent space (NaN for noise, label -1) and inertia sums the squared distances of
    the rows in clusters; cluster.json adds the number of clusters found and the count and share of noise.
    """
    from engine.runtime import offload

    c, run_dir = cfg.cluster, run.local
    what = c.described
    gpu = _cluster_gpu(cfg)
    with progress.stage("cluster", f"{what} on {rows} rows" + (" in a GPU task" if offload(gpu=gpu) else "")):
        args = (cfg, run.folder("embeddings"), run.folder("assignments"))
        if offload(gpu=gpu):
            (centroids, inertia, info), placed = _on_gpu(labels_in_memory, *args)
        else:
            (centroids, inertia, info), placed = labels_in_memory(*args), _in_driver(gpu)
        if "layouts" in info.get("umap", {}):
            u = info["umap"]
            kept = u["layouts"][u["kept"]]
            why = (f"the one agreeing best with the others (mean NMI {kept['agreement']:.4f})"
                   if u["select"] == "consensus" else
                   f"the most even in cluster sizes (size entropy {kept['size_entropy']:.4f})")
            progress.info(f"kept UMAP layout {u['kept'] + 1} of {len(u['layouts'])}, {why}")
        progress.info(f"{info['n_clusters']} clusters, {info['n_noise']} noise row(s), inertia {inertia:.6g}")
        storage.write_npy(run_dir / "centroids.npy", centroids)
        summary = {"method": c.method, "manifold": c.manifold, "k": c.k, "inertia": inertia, **info}
        storage.write_text(run_dir / "cluster.json", json.dumps(summary, indent=2, default=float))
        record_run(run_dir, placement={"cluster": placed})
    return summary


def labels_in_memory(cfg: PipelineConfig, embeddings: Path | str,
                     assignments: Path | str) -> tuple[np.ndarray, float, dict[str, Any]]:
    """The in-memory clustering of the embeddings (see `_cluster_in_memory`), its assignments written to
    `assignments`; returns (centroids, inertia, info), all small."""
    from engine.cluster import cluster_means, fit_labels
    from engine.cluster.assignments import load_vectors, write_assignments

    c = cfg.cluster
    ids, z, _ = load_vectors(embeddings)
    labels, info = fit_labels(z, c, cfg.seed)
    centroids, distance = cluster_means(z, labels)
    inertia = float(np.nansum(np.square(distance.astype(np.float64))))
    write_assignments(ids, labels, distance, assignments, config_hash=cfg.hash(),
                      rows_per_file=cfg.data.rows_per_shard, k=int(len(centroids)), n_noise=info["n_noise"])
    return centroids, inertia, info


def _fit_clusters(cfg: PipelineConfig, embeddings: Path | str, run: RunDir, progress: Progress, checkpoint: Path):
    """The fitted estimator for `cluster.method` and where it was fitted; its inertia is over every row. kmeans and
    sharded save their state to `checkpoint` and continue from it (kmeans in a GPU task: when the run directory is
    one the task's node reaches)."""
    from engine.cluster import ShardedKMeans, fit_sample_then_assign
    from engine.runtime import offload

    c = cfg.cluster
    gpu = _cluster_gpu(cfg)
    if cfg.model.refines:
        return _refined_centers(cfg, embeddings, run.local), _in_driver(gpu)
    if c.method in ("kmeans", "two_level"):
        if offload(gpu=gpu):
            return _on_gpu(fit_kmeans, cfg, embeddings, None if run.remote else checkpoint)
        return fit_kmeans(cfg, embeddings, checkpoint, progress.iteration), _in_driver(gpu)
    coordinated = {"asked": {"GPU": 1 if gpu else 0}, "in_driver": False, "ran_on": "shard actors"}
    if c.method == "sharded":
        return ShardedKMeans(n_clusters=c.k, init=c.init, max_iter=c.max_iter, tol=c.tol, seed=cfg.seed,
                             backend=c.backend, num_actors=c.num_actors, spherical=c.spherical,
                             checkpoint=checkpoint, checkpoint_every=c.checkpoint_every).fit(embeddings), coordinated
    km, manifest = fit_sample_then_assign(embeddings, run.folder("assignments"), c.k, c.sample_size, init=c.init,
                                          max_iter=c.max_iter, tol=c.tol, seed=cfg.seed, backend=c.backend,
                                          num_actors=c.num_actors, config_hash=cfg.hash(),
                                          concurrency=cfg.embed.plan(gpus_possible() if gpu else 0)[1],
                                          spherical=c.spherical)
    # The sample's inertia is not the data's: the assignments' distances give the inertia over every row.
    table = read_table(run.folder("assignments"), stage="assign", columns=["distance"])
    km.inertia_ = float(np.sum(np.square(table.column("distance").to_numpy().astype(np.float64))))
    return km, coordinated


def fit_kmeans(cfg: PipelineConfig, embeddings: Path | str, checkpoint: Path | None,
               callback: Callable[..., Any] | None = None) -> SimpleNamespace:
    """`cluster.method` kmeans or two_level on the embeddings, read in this process; returns the fitted centres,
    inertia, iterations and history only (not every row's label), so that it is small to send back from a task."""
    from engine.cluster import KMeans, TwoLevelKMeans
    from engine.cluster.assignments import load_vectors

    c = cfg.cluster
    _, z, _ = load_vectors(embeddings)
    common = dict(n_clusters=c.k, init=c.init, n_init=c.n_init, max_iter=c.max_iter, tol=c.tol, seed=cfg.seed,
                  backend=c.backend, spherical=c.spherical, callback=callback)
    if c.method == "two_level":
        km = TwoLevelKMeans(n_coarse=c.n_coarse, refine_iter=c.refine_iter, **common).fit(z)
    else:
        km = KMeans(**common, checkpoint=checkpoint, checkpoint_every=c.checkpoint_every).fit(z)
    return SimpleNamespace(cluster_centers_=km.cluster_centers_, inertia_=float(km.inertia_), n_iter_=int(km.n_iter_),
                           history_=km.history_)


def _refined_centers(cfg: PipelineConfig, embeddings: Path | str, run_dir: Path):
    """dec / idec: the refined centres, no new k-means; argmax_j q_ij is the nearest centre, so the assign
    stage's nearest-centre labels are DEC's labels. `n_iter_` counts refinement steps."""
    from engine.cluster import assign
    from engine.cluster.assignments import load_vectors
    from engine.train import load_checkpoint

    model_dir, stage = model_dir_for(cfg, run_dir)
    read_manifest(model_dir, stage=stage)
    state = load_checkpoint(model_dir)
    centers = state["state_dict"]["centers"].numpy()
    if len(centers) != cfg.cluster.k:
        raise ConfigError(f"cluster.k={cfg.cluster.k} but {model_dir} was refined with {len(centers)} centres; "
                          f"run the refine stage again for another k")
    _, z, _ = load_vectors(embeddings)
    _, sq = assign(z, centers, backend=cfg.cluster.backend)
    return SimpleNamespace(cluster_centers_=centers, inertia_=float(np.sum(sq, dtype=np.float64)),
                           n_iter_=int(state["epoch"]), history_=[])


def evaluate_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress) -> dict[str, Any]:
    from engine.cluster.assignments import load_vectors
    from engine.metrics import evaluate

    run = as_run_dir(run_dir)
    run_dir, assignments = run.local, run.folder("assignments")
    with progress.stage("evaluate"):
        ids, z, labels = load_vectors(run.folder("embeddings"))
        table = read_table(assignments, stage="assign", columns=[ID, CLUSTER])
        pred = match_by_id(ids, table.column(ID).to_numpy(), table.column(CLUSTER).to_numpy(), where=str(assignments))
        cluster_file = run_dir / "cluster.json"
        inertia = json.loads(cluster_file.read_text())["inertia"] if cluster_file.is_file() else None
        metrics = evaluate(pred, labels_true=labels, X=z, inertia=inertia,
                           silhouette_sample=cfg.evaluate.silhouette_sample, seed=cfg.seed)
        storage.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def report_stage(cfg: PipelineConfig, run_dir: RunDir | Path, progress: Progress) -> Path:
    """report/index.html (self-contained) and its PNGs, from the run's results (see engine.report)."""
    from engine.report import build_report

    with progress.stage("report", f"{cfg.report.map} map"):
        index = build_report(run_dir, cfg)
        progress.info(str(index))
    return index


# ---- the whole pipeline ----------------------------------------------------------------------------

def run_pipeline(cfg: PipelineConfig, out: str | Path | None = None, *, progress: Progress | None = None,
                 verbose: bool = False, resume: bool = False, pretrained: str | Path | None = None,
                 overwrite: bool = False) -> RunResult:
    """Run every stage into the run directory and return the metrics.

    pretrained: a trained model of the configured model (a run directory, its model/ folder, or a checkpoint
    file) that the train stage takes instead of training, e.g. to refine or cluster one autoencoder in several
    ways; a run directory on this machine.

    resume: continue a killed run in `out` (with the config saved there, see `config_for_resume`): finished
    stages are skipped, training continues from its last checkpoint, embedding keeps its completed shards
    and k-means its last saved centroids. An object-store run directory resumes from its published (finished)
    stages only.

    overwrite: replace the engine's own results in an existing `out` (see engine.rundir's output-path policy);
    without it an existing non-empty `out` is refused, and a run of the same config continues only with `resume`.
    A fresh run directory that fails is removed again unless it holds resumable state (checkpoints, stages).
    """
    from engine.rundir import check_output, guard_output
    from engine.runtime import init_ray
    from engine.tracking import track_run

    if resume and pretrained is not None:
        raise ConfigError("--pretrained cannot be used with --resume: a resumed run continues its own training")
    progress = progress or Progress()
    location = run_dir_for(cfg, out)
    started = time.time()
    # The output first: its refusal then waits for no input read and no torch import (measured 2.0 s -> 0.45 s).
    output = check_output(cfg, location, resume=resume, overwrite=overwrite, pretrained=pretrained)
    open_input(cfg)  # file, column and k checks before Ray starts
    with guard_output(output):
        with progress.stage("ray"):
            res = init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, verbose=verbose)
            progress.info(res.describe())
        with open_run_dir(location, cfg.ray, nodes=res.worker_nodes, fetch=resume) as run:
            tracked = read_run(run.local).get("tracking", {}) if resume else {}
            with track_run(cfg, run, mlflow_run_id=tracked.get("mlflow_run_id")) as tracker:
                return _run_stages(cfg, run, progress, res, started, resume, tracker, pretrained)


def _run_stages(cfg: PipelineConfig, run: RunDir, progress: Progress, res: Resources, started: float,
                resume: bool, tracker: Tracker, pretrained: str | Path | None = None) -> RunResult:
    run_dir = run.local
    done = finished_stages(cfg, run) if resume else set()
    # The run directory is created only once the input has been read and found valid; a resumed run whose
    # model and embeddings are finished does not read it again.
    validated = validate_input(cfg, progress) if _model_stages(cfg) - done else None
    save_config(cfg, run_dir)
    if resume:
        remove_staged_leftovers(run_dir)
        record_run(run_dir, resumed=[*read_run(run_dir).get("resumed", []), {"time": started, "skipped": sorted(done)}])
    else:
        record_run(run_dir, name=cfg.name, started=started, config_hash=cfg.hash(), versions=versions(),
                machine=machine(), ray=res.describe(), **({"tracking": tracker.ids} if tracker.ids else {}))
    seconds: dict[str, float] = {}

    def timed(name: str, stage, *args, **kwargs):
        if name in done:
            progress.info(f"{name}: finished before, skipped")
            return None
        t0 = time.perf_counter()
        result = stage(cfg, run, progress, *args, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 3)
        record_run(run_dir, seconds={name: seconds[name]})
        run.publish()  # an object-store run directory gets each stage as soon as it is complete
        return result

    # Train, refine and embed reuse the validated (and, when small, materialised) input instead of re-reading it.
    timed("train", train_stage, validated, resume=resume, on_epoch=tracker.train_epoch, pretrained=pretrained)
    if cfg.model.refines:
        timed("refine", refine_stage, validated, on_update=tracker.refine_update)
    timed("embed", embed_stage, validated)
    timed("cluster", cluster_stage)
    metrics = timed("evaluate", evaluate_stage)
    if cfg.report.enabled:
        timed("report", report_stage)
    record_run(run_dir, finished=time.time())
    tracker.result(run_dir, metrics, seconds)
    return RunResult(run_dir=run.location, metrics=metrics, seconds=seconds)


def _model_stages(cfg: PipelineConfig) -> set[str]:
    """The stages that read the input data."""
    return {"train", "refine", "embed"} if cfg.model.refines else {"train", "embed"}


def versions() -> dict[str, str]:

    import ray
    import sklearn
    import torch

    from engine.version import __version__

    return {"engine": __version__, "python": platform.python_version(), "ray": ray.__version__,
            "torch": torch.__version__, "faiss": _faiss_version(), "scikit-learn": sklearn.__version__,
            "numpy": np.__version__}


def _faiss_version() -> str:
    """The installed faiss distribution and version ('none' without faiss, which is optional)."""
    import importlib.metadata

    for dist in ("faiss-gpu-cu12", "faiss-cpu", "faiss"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
