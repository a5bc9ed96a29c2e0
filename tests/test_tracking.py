"""Experiment tracking: one tiny pipeline run logged to MLflow (a local file store) and TensorBoard at once, read
back with MLflow's client and TensorBoard's event reader; the report artefact, resuming and bad settings without Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import PipelineConfig, config_from_dict
from engine.errors import ConfigError
from engine.rundir import RunDir
from engine.tracking import flat_config, track_run


def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    # MLflow 3 refuses a file store unless told that it is wanted; a server or a database needs more than a test.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


@pytest.fixture(scope="module")
def tracked_run(ray_local, tracked_tiny_run):
    """The session's tiny run on two Ray Train workers (conftest, tests/tiny.py), logged to MLflow and TensorBoard at
    once; test_pipeline.py runs its stages again on a copy, never on this one."""
    run_dir, uri = tracked_tiny_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = _mlflow_client(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("dce-test").experiment_id])
        yield run_dir, client, run


def _history(run_dir: Path) -> list[dict[str, float]]:
    from engine.train import load_checkpoint

    return load_checkpoint(run_dir / "model")["history"]


def test_mlflow_has_every_epoch_once(tracked_run):
    run_dir, client, run = tracked_run
    history = _history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    terms = set(history[0]) - {"epoch", "rows"}
    assert {"loss", "seconds"} <= terms
    for term in terms:
        logged = client.get_metric_history(run.info.run_id, f"train/{term}")
        # Two workers, yet one value per epoch: only rank 0's (all-reduced) losses are logged.
        assert [m.step for m in logged] == [1, 2, 3], term
        assert [m.value for m in logged] == pytest.approx([h[term] for h in history], rel=1e-9)
    assert history[1]["loss"] < history[0]["loss"]


def test_mlflow_has_final_metrics_times_and_params(tracked_run):
    run_dir, client, run = tracked_run
    assert run.info.status == "FINISHED" and run.info.run_name == "digits"  # the config's name
    assert json.loads((run_dir / "run.json").read_text())["tracking"] == {"mlflow_run_id": run.info.run_id}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ari"] > 0.9
    for key in ("acc", "nmi", "ari", "inertia"):
        assert run.data.metrics[key] == pytest.approx(metrics[key], rel=1e-9), key
    seconds = json.loads((run_dir / "run.json").read_text())["seconds"]
    assert set(seconds) == {"train", "embed", "cluster", "evaluate", "report"}
    for stage, value in seconds.items():
        assert run.data.metrics[f"time/{stage}"] == pytest.approx(value), stage
    saved = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert run.data.params == flat_config(saved)  # over 100 keys: more than one MLflow batch
    assert run.data.params["model.latent_dim"] == "3" and run.data.params["data.source"] == "blobs"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "metrics.json", "report"}
    # The report is self-contained: its index.html (images inlined) is the artefact, not the PNGs beside it.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/index.html"]


def test_tensorboard_has_the_same_curves(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    history = _history(run_dir)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert events.Scalars("nmi")[0].value == pytest.approx(metrics["nmi"], rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_report_artefact_and_resumed_run(tmp_path, file_store):
    """No Ray: a run directory with a report, logged the way the pipeline's last step logs it."""
    cfg = config_from_dict({}, ["tracking.backend=mlflow", f"tracking.uri={file_store}"])
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("<html></html>")
    (tmp_path / "metrics.json").write_text(json.dumps({"acc": 0.5}))
    run = RunDir(tmp_path, tmp_path)
    with pytest.raises(RuntimeError, match="stage failed"), track_run(cfg, run) as tracker:
        run_id = tracker.ids["mlflow_run_id"]
        raise RuntimeError("stage failed")
    client = _mlflow_client(file_store)
    assert client.get_run(run_id).info.status == "FAILED"
    with track_run(cfg, run, mlflow_run_id=run_id) as tracker:  # `dce run --resume` goes on in the same run
        assert tracker.ids == {"mlflow_run_id": run_id}
        tracker.result(tmp_path, {"acc": 0.75, "silhouette": None}, {"cluster": 1.5, "report": 2.0})
    done = client.get_run(run_id)
    assert done.info.status == "FINISHED"
    assert done.data.metrics == {"acc": 0.75, "time/cluster": 1.5, "time/report": 2.0}
    assert [a.path for a in client.list_artifacts(run_id, "report")] == ["report/index.html"]


def test_tracking_is_off_by_default_and_not_in_the_hash():
    cfg = PipelineConfig()
    assert cfg.tracking.backends == ()
    tracked = config_from_dict({}, ["tracking.backend=[tensorboard, mlflow, tensorboard]"])
    assert tracked.tracking.backends == ("tensorboard", "mlflow")
    assert tracked.hash() == cfg.hash()


def test_unknown_backend():
    with pytest.raises(ConfigError, match=r"'tracking.backend': Input should be 'none', 'mlflow' or 'tensorboard'"):
        config_from_dict({}, ["tracking.backend=wandb"])


def test_backend_without_its_package(monkeypatch):
    # None in sys.modules is Python's own marker for a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"tracking.backend needs the Python module 'mlflow'.*"
                                          r"pip install 'deep-cluster-engine\[tracking\]'"):
        config_from_dict({}, ["tracking.backend=[tensorboard, mlflow]"])


def test_uri_mlflow_refuses(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    cfg = config_from_dict({}, ["tracking.backend=mlflow", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match=rf"tracking.uri='{uri}': MLflow cannot track there: .*"
                                          r"MLFLOW_ALLOW_FILE_STORE"):
        with track_run(cfg, RunDir(tmp_path, tmp_path)):
            pass


def test_tensorboard_needs_a_dir_for_an_object_store_run(tmp_path):
    cfg = config_from_dict({}, ["tracking.backend=tensorboard"])
    # region and endpoint given: pyarrow opens the URI without asking the network.
    uri = "s3://bucket/run?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(ConfigError, match=r"tracking.dir is required .* object-store URI \(s3://bucket/run\?"):
        with track_run(cfg, RunDir(uri, tmp_path)):
            pass
