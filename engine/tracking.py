"""Experiment tracking of a pipeline run in MLflow and/or TensorBoard (the `tracking` config section).

The driver logs everything. Rank 0 of Ray Train already sends every epoch's losses to the driver (the progress
queue), so one MLflow run holds the training curves and the final metrics, and a file store or TensorBoard folder
is written on the driver's machine, beside the run directory, not on whichever node rank 0 landed on. Ray's
`setup_mlflow` does not fit: it starts a new run in the worker, and again after each worker-group restart.

A tracking server that fails mid-run costs a warning, not the run: training and results never wait on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError
from engine.progress import BOOKKEEPING

if TYPE_CHECKING:
    from engine.config import PipelineConfig
    from engine.rundir import RunDir

log = logging.getLogger(__name__)

# MLflow's cap on the parameters of one log_batch call.
_PARAMS_PER_BATCH = 100


def flat_config(cfg: PipelineConfig) -> dict[str, str]:
    """The config as `section.key -> value` strings (lists and None as JSON): MLflow parameters."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk("", cfg.to_dict())
    return flat


def _scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of `values` (None and bookkeeping left out), keyed `prefix + name`."""
    return {prefix + k: float(v) for k, v in values.items()
            if k not in BOOKKEEPING and isinstance(v, int | float) and not isinstance(v, bool)}


class _MLflow:
    def __init__(self, cfg: PipelineConfig, run_id: str | None):
        import mlflow
        from mlflow.exceptions import MlflowException

        t = cfg.tracking
        where = f"tracking.uri={t.uri!r}" if t.uri else f"tracking.uri (MLflow's default {mlflow.get_tracking_uri()})"
        try:
            self.client = mlflow.MlflowClient(tracking_uri=t.uri)
            if run_id is not None:  # a resumed run goes on in the MLflow run it started
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return
            experiment = self.client.get_experiment_by_name(t.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(t.experiment)
            run = self.client.create_run(experiment_id, run_name=cfg.name, tags={"dce.config_hash": cfg.hash()})
        except MlflowException as e:
            raise ConfigError(f"{where}: MLflow cannot track there: {e.message}") from None
        self.run_id = run.info.run_id

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifact(self, path: Path, folder: str | None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class _TensorBoard:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def artifact(self, path: Path, folder: str | None) -> None:
        """TensorBoard keeps no files: the run directory has them."""

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class Tracker:
    """The configured backends behind one interface; with none, every call does nothing."""

    def __init__(self, backends: list[_MLflow | _TensorBoard]):
        self.backends = backends

    @property
    def ids(self) -> dict[str, str]:
        """What run.json records so that a resumed run logs into the same MLflow run."""
        mlflow = [b for b in self.backends if isinstance(b, _MLflow)]
        return {"mlflow_run_id": mlflow[0].run_id} if mlflow else {}

    def _each(self, method: str, *args: Any) -> None:
        for backend in self.backends:
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - tracking is best effort once the run has started
                log.warning("experiment tracking (%s) failed to %s: %s", type(backend).__name__.strip("_"), method, e)

    def train_epoch(self, record: dict[str, Any]) -> None:
        """One epoch of training as reported by rank 0: each loss term as `train/<term>`, step = the epoch."""
        self._each("scalars", _scalars(record, "train/"), int(record["epoch"]))

    def refine_update(self, record: dict[str, Any]) -> None:
        """One DEC / IDEC target update (KL, label change, reconstruction...) as `refine/<term>`, step = the
        update's number."""
        self._each("scalars", _scalars(record, "refine/"), int(record["update"]))

    def result(self, run_dir: Path, metrics: dict[str, Any], seconds: dict[str, float]) -> None:
        """The final metrics (ACC, NMI, ARI, inertia, ...), each stage's seconds as `time/<stage>`, and the run's
        config.yaml, metrics.json and report/index.html (when the report stage ran) as artefacts."""
        self._each("scalars", {**_scalars(metrics), **_scalars(seconds, "time/")}, 0)
        for name, folder in (("config.yaml", None), ("metrics.json", None), ("report/index.html", "report")):
            if (run_dir / name).is_file() and (name != "report/index.html" or "report" in seconds):
                self._each("artifact", run_dir / name, folder)


@contextlib.contextmanager
def track_run(cfg: PipelineConfig, run: RunDir, *, mlflow_run_id: str | None = None) -> Iterator[Tracker]:
    """The run's tracker, opened with the config logged as parameters and closed as FINISHED, or FAILED when the
    block raises. `mlflow_run_id` (a resumed run's, from run.json) continues that MLflow run."""
    backends: list[_MLflow | _TensorBoard] = []
    try:
        for name in cfg.tracking.backends:
            if name == "mlflow":
                backends.append(_MLflow(cfg, mlflow_run_id))
            else:
                backends.append(_TensorBoard(_tensorboard_dir(cfg, run)))
    except BaseException:
        Tracker(backends)._each("close", "FAILED")
        raise
    tracker = Tracker(backends)
    tracker._each("params", flat_config(cfg))
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker._each("close", status)


def _tensorboard_dir(cfg: PipelineConfig, run: RunDir) -> Path:
    if cfg.tracking.dir is not None:
        return Path(cfg.tracking.dir)
    if run.remote:
        raise ConfigError(f"tracking.dir is required with tracking.backend tensorboard when the run directory is "
                          f"an object-store URI ({run.location}): TensorBoard writes a local folder")
    return run.local / "tensorboard"
