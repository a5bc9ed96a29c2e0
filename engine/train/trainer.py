"""Ray Train around the plain-torch loop: DDP over `train.num_workers`, data from Ray Data, checkpoints to the run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine import storage
from engine.data.folders import staged_folder, write_manifest
from engine.errors import CheckpointError
from engine.train.augment import augment_options
from engine.train.checkpoint import FILENAME, load_checkpoint

log = logging.getLogger(__name__)

TRAIN_DIR = "train"


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from engine.data.schema import X, vectors_to_numpy
    from engine.models import build_model
    from engine.runtime import compute_device
    from engine.train.augment import random_affine
    from engine.train.checkpoint import save_checkpoint
    from engine.train.loop import configure_optimizers, load_optimizer_states, native_precision, to_device, train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])  # identical initial weights on every worker
    device = compute_device(ray.train.torch.get_device().type)

    model = build_model(**config["model"])
    optimizer_states, start_epoch, history, starts = None, 0, [], []
    # Set after a worker died (FailureConfig) or when a resumed run finds Ray Train's snapshot in run_dir/train.
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = load_checkpoint(Path(d) / FILENAME)
        model.load_state_dict(state["state_dict"])
        optimizer_states, start_epoch, history = state.get("optimizers") or {}, state["epoch"], state["history"]
        starts = state.get("starts") or [0]
    starts = [*starts, start_epoch]
    # A model with its own train_step (a GAN) runs steps that use only some of its parameters; DDP must
    # look for the unused ones or it waits forever for their gradients.
    model = ray.train.torch.prepare_model(
        model, move_to_device=device,
        parallel_strategy_kwargs={"find_unused_parameters": True} if hasattr(model, "train_step") else None)
    optimizers = configure_optimizers(model, config["lr"], config["weight_decay"])
    if optimizer_states is not None:
        load_optimizer_states(optimizers, optimizer_states, where="the checkpoint to resume from")

    shift = torch.as_tensor(np.asarray(config["shift"], dtype=np.float32), device=device)
    scale = torch.as_tensor(np.asarray(config["scale"], dtype=np.float32), device=device)
    shard = ray.train.get_dataset_shard("train")
    # train.batch_size is the global batch: each of the `world` workers takes its share, so a run's
    # optimisation does not change with the number of workers.
    batch_size = max(1, config["batch_size"] // world)
    augment = config["augment"]
    augmented = [0]  # rows this worker transformed in the current epoch

    core = model.module if hasattr(model, "module") else model

    def rows():  # this worker's rows as they are (no augmentation, no shuffle), for a model's begin_epoch
        for batch in shard.iter_batches(batch_size=4096, batch_format="pyarrow"):
            yield (torch.from_numpy(vectors_to_numpy(batch[X]).copy()).to(device) - shift) * scale

    def gather(a: np.ndarray) -> np.ndarray:  # the workers' arrays concatenated in rank order, on every worker
        if world == 1:
            return a
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, a)
        return np.concatenate(parts)

    def epoch_batches(epoch: int):
        # A model that sets itself up from every row before an epoch (VaDE: its mixture prior, from a GMM on the
        # pretrained codes) does so here; rank 0's result then goes to every worker, so they stay identical.
        if hasattr(core, "begin_epoch") and core.begin_epoch(epoch, rows=rows, gather=gather) and world > 1:
            for t in core.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        seed = config["seed"] * 100_003 + epoch * 17 + rank
        # Seeded per epoch and worker: a resumed run draws the transforms an uninterrupted one would.
        transforms = torch.Generator().manual_seed(seed) if augment else None
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                        local_shuffle_buffer_size=max(4 * batch_size, 1024),
                                        local_shuffle_seed=seed):
            x = to_device(vectors_to_numpy(batch[X]), device)
            if augment:  # on the raw pixels, so that what moves in from outside is background (0)
                x = random_affine(x, config["image_shape"], generator=transforms, **augment)
                augmented[0] += x.shape[0]
            yield (x - shift) * scale

    def reduce(sums: dict[str, float]) -> dict[str, float]:
        if world == 1:
            return sums
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    queue = config.get("progress")
    epochs, every = config["epochs"], config["checkpoint_every"]

    def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
        if augment:  # over every worker: the history shows that each row of the epoch was transformed
            metrics["augmented_rows"] = reduce({"augmented_rows": float(augmented[0])})["augmented_rows"]
            augmented[0] = 0
        history.append(metrics)
        if rank == 0 and queue is not None:
            queue.put_nowait(dict(metrics))
        if epoch % every and epoch != epochs:
            # ray.train.report is a barrier across workers (~1 s here): the driver already has this
            # epoch through the progress queue, and the checkpoint keeps every epoch's losses.
            return
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                save_checkpoint(Path(d) / FILENAME, model=model, shift=config["shift"], scale=config["scale"],
                                epoch=epoch, history=history,
                                optimizers={name: opt.state_dict() for name, opt in optimizers.items()},
                                image_shape=config["image_shape"], config_hash=config["config_hash"],
                                starts=starts)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, **placement(device)} if epoch == epochs else metrics, checkpoint=checkpoint)

    precision = native_precision(config["precision"], device.type)  # warns where it falls back to fp32
    train(model, optimizers, epoch_batches, epochs=epochs, start_epoch=start_epoch, precision=precision,
          reduce=reduce, on_epoch_end=on_epoch_end)


def train_encoder(ds, *, in_dim: int, shift: np.ndarray, scale: np.ndarray, model: dict[str, Any],
                  train: Any, seed: int, run_dir: str | Path, config_hash: str,
                  image_shape: tuple[int, ...] | None = None, use_gpu: bool = False, resume: bool = False,
                  on_epoch: Callable[[dict[str, Any]], None] | None = None, train_storage: str | None = None) -> Path:
    """Train an encoder on `ds` (input schema) with Ray Train and write `run_dir/model/` atomically.

    Ray Train's own state (a checkpoint every `train.checkpoint_every` epochs: weights, optimizer, epoch,
    history) lives in `run_dir/train/`; a dead worker restarts every worker from the latest one, up to
    `train.max_failures` times. `resume` continues from the latest checkpoint there (a killed run, or more
    epochs), which must be of the same model; without it training starts afresh. The finished checkpoint is
    copied to `run_dir/model/checkpoint.pt` with a manifest; its `starts` are the epochs each attempt started
    from. `train_storage` (an object-store URI, the run's own) puts `train/` there instead: the workers upload
    their checkpoints to the store directly, and a resume reads them from it, from whatever machine it runs on.
    """
    import ray.train

    from engine.models import build_model

    shape = list(image_shape) if image_shape else None
    augment = augment_options(train.augment, shape)
    if getattr(train, "steps", None) is not None:  # a caller other than train_stage, with steps left to resolve
        train = train.for_rows(ds.count())
    # Bad model settings fail here, before any worker starts.
    build_args = build_model(in_dim=in_dim, image_shape=shape, **model).build_args
    run_dir = Path(run_dir).resolve()
    state_root = train_storage or str(run_dir)
    if resume:
        check_resumable(storage.join(state_root, TRAIN_DIR), build_args)
    else:
        # Ray Train restores from any snapshot it finds under storage_path/name: a fresh run must not.
        storage.delete(storage.join(state_root, TRAIN_DIR))
    with progress_queue(on_epoch) as queue:
        loop_config = {
            "model": {"in_dim": in_dim, "image_shape": shape, **model},
            "seed": seed,
            "lr": train.lr,
            "weight_decay": train.weight_decay,
            "batch_size": train.batch_size,
            "epochs": train.epochs,
            "checkpoint_every": train.checkpoint_every,
            "shift": np.asarray(shift, dtype=np.float32).tolist(),
            "scale": np.asarray(scale, dtype=np.float32).tolist(),
            "image_shape": shape,
            "config_hash": config_hash,
            "progress": queue,
            "precision": train.precision,
            "augment": augment,
        }
        trainer = build_trainer(_train_loop_per_worker, loop_config, name=TRAIN_DIR, state_root=state_root,
                                num_workers=train.num_workers, cpus_per_worker=train.cpus_per_worker, use_gpu=use_gpu,
                                placement_strategy=train.placement_strategy, num_to_keep=2,
                                max_failures=train.max_failures, datasets={"train": ds},
                                dataset_config=ray.train.DataConfig(execution_options=_ordered_ingest()))
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = run_dir / "model"
    with result.checkpoint.as_directory() as d, staged_folder(model_dir) as tmp:
        shutil.copy2(Path(d) / FILENAME, tmp / FILENAME)
        state = load_checkpoint(tmp / FILENAME)
        write_manifest(tmp, stage="train", config_hash=config_hash, rows=None, files=[FILENAME],
                       epochs=state["epoch"], final_loss=state["history"][-1]["loss"] if state["history"] else None,
                       num_workers=train.num_workers, use_gpu=use_gpu, starts=state.get("starts", [0]),
                       **ran_on(result.metrics, use_gpu))
    return model_dir


def build_trainer(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, name: str, state_root: str,
                  num_workers: int, cpus_per_worker: float, use_gpu: bool, placement_strategy: str, num_to_keep: int,
                  datasets: dict[str, Any], dataset_config: Any, max_failures: int = 0):
    """The Ray Train TorchTrainer of the train and refine stages: `num_workers` workers of `cpus_per_worker` CPUs
    and one GPU each with `use_gpu`, the torch.distributed backend made explicit (`engine.runtime.train_backend`:
    NCCL on GPUs, gloo on CPUs), Ray Train's own state under `state_root/name` (a path or an object-store URI),
    SIGINT left to the engine."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from engine.interrupt import keep_sigint
    from engine.runtime import train_backend

    state_path, fs = ray_storage(state_root)
    return keep_sigint(TorchTrainer)(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=train_backend(use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=state_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def placement(device: Any) -> dict[str, Any]:
    """What a Ray Train worker reports with its last result: where it ran (`engine.runtime.where_am_i`) and on
    which torch device."""
    from engine.runtime import where_am_i

    return {"placement": {**where_am_i(), "device": str(device)}}


def ran_on(metrics: dict[str, Any] | None, use_gpu: bool) -> dict[str, Any]:
    """The manifest's record of a Ray Train run's resources: what each worker asked for, the torch.distributed
    backend, and where rank 0 ran (node, GPU ids, device)."""
    from engine.runtime import train_backend

    return {"backend": train_backend(use_gpu), "asked": {"GPU": 1} if use_gpu else {"GPU": 0},
            "ran_on": (metrics or {}).get("placement")}


def ray_storage(root: str) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for `root`, a local path or a URI. A URI goes to Ray Train as
    its pyarrow filesystem and the path in it: Ray's own URI parsing drops options such as endpoint_override."""
    if not storage.is_uri(root):
        return root, None
    fs, path = storage.resolve(root)
    return path, fs


def check_resumable(train_dir: str | os.PathLike[str], build_args: dict[str, Any]) -> None:
    """The latest Ray Train checkpoint under `train_dir` (a path or a URI), if any, must be of the model
    `build_args` builds (training settings such as epochs or lr may differ); the error names the settings
    that differ."""
    found = [n for n in storage.files(train_dir)
             if n.startswith("checkpoint_") and n.count("/") == 1 and n.endswith("/" + FILENAME)]
    if not found:
        return
    latest = storage.join(train_dir, max(found))
    saved = load_checkpoint(latest)["model"]
    check_same_model(saved, build_args, where=latest,
                     advice="set them back, or start a fresh run instead of resuming")


def check_same_model(saved: dict[str, Any], build_args: dict[str, Any], *, where: object, advice: str) -> None:
    """CheckpointError naming every setting where the checkpoint's model (`saved`) and `build_args` differ."""
    saved, now = (json.loads(json.dumps(args, default=list)) for args in (saved, build_args))
    differ = [f"{k}={saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
              if saved.get(k) != now.get(k)]
    if differ:
        raise CheckpointError(f"{where}: a checkpoint of another model ({'; '.join(differ)}); {advice}")


def adopt_pretrained(pretrained: str | os.PathLike[str], *, in_dim: int, model: dict[str, Any],
                     image_shape: tuple[int, ...] | None, run_dir: str | Path, config_hash: str) -> Path:
    """Make the trained model in `pretrained` (a run directory, its model/ folder or a checkpoint file) this
    run's `run_dir/model/`, instead of training: it must be the model the config builds for this input (the
    error names each setting that differs). Its manifest records where it came from and its epochs."""
    from engine.data.folders import read_manifest
    from engine.models import build_model

    source = Path(pretrained)
    if (source / "model").is_dir():
        source = source / "model"
    if source.is_dir():
        read_manifest(source, stage="train")  # a half-written model/ is not a result
        source = source / FILENAME
    state = load_checkpoint(source)
    shape = list(image_shape) if image_shape else None
    build_args = build_model(in_dim=in_dim, image_shape=shape, **model).build_args
    check_same_model(state["model"], build_args, where=source,
                     advice="set the model section to the pretrained model's settings, or train anew")
    model_dir = Path(run_dir).resolve() / "model"
    with staged_folder(model_dir) as tmp:
        shutil.copy2(source, tmp / FILENAME)
        write_manifest(tmp, stage="train", config_hash=config_hash, rows=None, files=[FILENAME],
                       epochs=state["epoch"], final_loss=state["history"][-1]["loss"] if state["history"] else None,
                       pretrained=str(source.resolve()), starts=state.get("starts", [0]))
    return model_dir


def _ordered_ingest():
    """Ray Train's ingest options with the block order kept: with one worker and a seed, training is then
    reproducible, and a run resumed from a checkpoint ends with the weights of an uninterrupted one.

    Built from the current DataContext's settings as `DataConfig.default_ingest_options()` builds them, less
    `exclude_resources`, which Ray 2.60 deprecates (and warns about whenever it is passed, even unset)."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress, label_selector=current.label_selector)


@contextlib.contextmanager
def progress_queue(callback: Callable[[dict[str, Any]], None] | None) -> Iterator[Any]:
    """A Ray queue the rank-0 worker puts records in, drained into `callback` by a driver thread (None without one).

    The queue's actor is pinned to the driver's node, whose loss ends the run anyway. Placed by Ray on another node,
    it would die with that node, and every worker group restarted after the loss would fail at its first record."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if callback is None:
        yield None
        return
    # No CPU: the driver's node may have none (a head without CPUs), and the actor only passes a record an epoch.
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node})
    poller = threading.Thread(target=_drain, args=(queue, callback), daemon=True)
    poller.start()
    try:
        yield queue
    finally:
        # The end mark wakes the poller at once (a stop flag waited for its pending get to time out, up to 0.5 s a
        # run); it ends after the records put before it, in their order.
        with contextlib.suppress(Exception):  # the queue actor may be gone with its node
            queue.put(_END)
        poller.join(timeout=5)
        _drain_now(queue, callback)
        queue.shutdown()


_END = None  # the progress queue's end mark; records are dicts


def _drain(queue, on_epoch) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            item = queue.get(timeout=5)
        except Empty:
            continue
        except Exception:  # the queue actor is gone: training ended
            return
        if item is _END:
            return
        on_epoch(item)


def _drain_now(queue, on_epoch) -> None:
    try:
        while not queue.empty():
            item = queue.get_nowait()
            if item is not _END:
                on_epoch(item)
    except Exception:  # noqa: BLE001 - the queue actor may already be gone; progress is best effort
        log.debug("progress queue closed", exc_info=True)
