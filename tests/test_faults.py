"""Faults on a real local Ray: a killed embedding actor or driver; resume; half-written folders. (A training worker
lost mid-run: tests/test_nodeloss.py removes its node, which kills it with every other process there.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from typer.testing import CliRunner
from waiting import wait_for

from engine.cli import app
from engine.cluster import KMeans, ShardedKMeans
from engine.config import config_from_dict
from engine.data import open_source, read_dataset, read_manifest, read_table
from engine.data.describe import describe
from engine.data.folders import commit_partial, completed_ids, partial_folder, write_shard
from engine.embed import embed_dataset
from engine.errors import ConfigError, DataError, IncompleteResultError
from engine.models import build_model
from engine.pipeline import config_for_resume, finished_stages, run_pipeline, save_config
from engine.train import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "faults", "seed": 3,
    "data": {"source": "blobs", "n_samples": 400, "n_features": 6, "centers": 4, "rows_per_shard": 20,
             "normalize": "standard"},
    "model": {"hidden": [16], "latent_dim": 3},
    "train": {"epochs": 2, "batch_size": 64, "num_workers": 1, "checkpoint_every": 1},
    "embed": {"batch_size": 20, "concurrency": 1},
    "cluster": {"method": "kmeans", "manifold": "none", "k": 4, "n_init": 2},
    "report": {"enabled": False},
}


class Interrupted(Exception):
    """Stands for a crash in the middle of a k-means fit."""


def _ids(folder: Path, stage: str) -> np.ndarray:
    return np.sort(read_table(folder, stage=stage, columns=["id"]).column("id").to_numpy())


def _alive_actor_pids(class_part: str) -> list[int]:
    """Pids of the live actors whose class name contains `class_part`, from the GCS's actor table (the
    state API, ray.util.state, needs the dashboard, which the embedded local Ray does not start)."""
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values()
            if a["State"] == "ALIVE" and class_part in a["ActorClassName"] and a["Pid"]]


# ---- without Ray -----------------------------------------------------------------------------------


def test_kmeans_continues_from_its_checkpoint(tmp_path):
    X = np.random.default_rng(0).normal(size=(2000, 5)).astype(np.float32)
    settings = dict(n_init=3, max_iter=20, tol=0, seed=1)
    reference = KMeans(12, **settings).fit(X)

    def crash(record):
        if record["run"] == 2 and record["iter"] == 13:
            raise Interrupted

    state = tmp_path / "kmeans.npz"
    with pytest.raises(Interrupted):
        KMeans(12, **settings, checkpoint=state, checkpoint_every=5, callback=crash).fit(X)
    seen = []
    resumed = KMeans(12, **settings, checkpoint=state, checkpoint_every=5, callback=seen.append).fit(X)
    # Run 1 is not redone; run 2 continues after its last saved iteration (10), run 3 runs whole.
    assert (seen[0]["run"], seen[0]["iter"]) == (2, 11) and len(seen) == 10 + 20
    np.testing.assert_array_equal(resumed.cluster_centers_, reference.cluster_centers_)
    np.testing.assert_array_equal(resumed.labels_, reference.labels_)
    assert resumed.inertia_ == reference.inertia_ and resumed.n_iter_ == reference.n_iter_
    # A state of other data is not continued: the fit starts afresh and still matches its own reference.
    Y = X[::-1].copy()
    other = KMeans(12, **settings, checkpoint=state, checkpoint_every=5).fit(Y)
    np.testing.assert_array_equal(other.cluster_centers_, KMeans(12, **settings).fit(Y).cluster_centers_)


def test_partial_folder_keeps_recorded_shards_only(tmp_path):
    out = tmp_path / "embeddings"
    part = partial_folder(out, {"model": "a"})
    shard = pa.table({"id": pa.array([4, 2, 7], pa.int64()), "z": [[0.0], [1.0], [2.0]]})
    record = write_shard(shard, part, prefix="embed")
    assert write_shard(shard, part, prefix="embed") == record  # a redone block overwrites its own shard
    # A crash mid-write leaves files without a completion record: they are deleted, never counted.
    pq.write_table(shard, part / "embed-halfwritten.parquet")
    (part / ".embed-x.parquet.tmp-1").write_bytes(b"PAR1")
    np.testing.assert_array_equal(np.sort(completed_ids(part)), [2, 4, 7])
    assert sorted(p.name for p in part.glob("*.parquet")) == [record["file"]]
    assert partial_folder(out, {"model": "a"}) == part and len(completed_ids(part)) == 3  # same key: kept
    with pytest.raises(DataError, match=r"embeddings: wrote 3 rows but the input has 4"):
        commit_partial(part, out, stage="embed", config_hash="h", expected_rows=4)
    assert not part.exists() and not out.exists()
    part = partial_folder(out, {"model": "a"})
    write_shard(shard, part, prefix="embed")
    assert len(completed_ids(partial_folder(out, {"model": "b"}))) == 0  # another model: emptied
    write_shard(shard, part, prefix="embed")
    manifest = commit_partial(part, out, stage="embed", config_hash="h", expected_rows=3)
    assert manifest["files"] == [record["file"]] and sorted(p.name for p in out.iterdir()) == [
        "_manifest.json", record["file"]]


def test_resume_refuses_overrides_and_needs_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"--set cannot be used with --resume: a resumed run continues with the "
                                          r"config saved in .*config.yaml"):
        config_for_resume(tmp_path, overrides=["cluster.k=5"])
    with pytest.raises(ConfigError, match=r"a CONFIG and --out cannot be used with --resume"):
        config_for_resume(tmp_path, config="digits", out=tmp_path / "x")
    with pytest.raises(IncompleteResultError, match=r"not a run directory \(no config.yaml\)"):
        config_for_resume(tmp_path / "nothing")
    # `dce run --resume` and the job entry point give the same one-line error and exit code 2.
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path), "--set", "seed=1"])
    assert result.exit_code == 2 and "error: --set cannot be used with --resume" in result.output
    run = subprocess.run([sys.executable, "-m", "jobs.pipeline", "--resume", str(tmp_path), "--set", "seed=1"],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 2 and "error: --set cannot be used with --resume" in run.stderr


# ---- on Ray ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_actor_killed_every_id_written_once(ray_local, tmp_path):
    cfg = config_from_dict({**TINY, "data": {**TINY["data"], "n_samples": 3000, "rows_per_shard": 100}})
    ds = read_dataset(open_source(cfg.data)).materialize()
    info = describe(ds, normalize=cfg.data.normalize)
    torch.manual_seed(0)
    model = build_model(in_dim=info.dim, **cfg.model.pretrain_options())  # untrained weights embed as well
    save_checkpoint(tmp_path / "checkpoint.pt", model=model, shift=info.shift, scale=info.scale, epoch=0, history=[])
    out = tmp_path / "embeddings"
    done = tmp_path / ".embeddings.partial" / "_done"
    killed: list[int] = []

    def kill_an_embedder():
        wait_for(lambda: done.is_dir() and len(list(done.glob("*.json"))) >= 5, 120, "the first shards")
        pid = wait_for(lambda: _alive_actor_pids("Embedder"), 30, "an embedding actor")[0]
        killed.append(len(list(done.glob("*.json"))))
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_an_embedder, daemon=True)
    killer.start()
    manifest = embed_dataset(ds, tmp_path / "checkpoint.pt", out, dim=info.dim, expected_rows=3000,
                             config_hash="h", batch_size=10, concurrency=1, max_restarts=2)
    killer.join(timeout=5)
    # Killed mid-stream: fewer of the 300 shards were written then than in the end.
    assert killed and killed[0] < 300 and len(manifest["files"]) == 300
    np.testing.assert_array_equal(_ids(out, "embed"), np.arange(3000))
    assert manifest["rows"] == 3000 and not (tmp_path / ".embeddings.partial").exists()


@pytest.mark.slow
def test_a_model_that_kills_every_actor_fails_after_max_restarts(ray_local):
    """The embedding and assignment pools' retries (`actor_retries`): unbounded task retries (a node lost abruptly,
    test_nodeloss.py) must not retry a model that kills every actor forever: each actor is replaced max_restarts
    times, then the stage fails."""
    import ray
    from ray.data import ActorPoolStrategy

    from engine.embed import actor_retries

    class KillsItsActor:  # nested: Ray pickles it by value, as the workers cannot import this module
        def __call__(self, batch):
            os._exit(1)

    failed: list[BaseException] = []

    def run():
        try:
            ray.data.range(8, override_num_blocks=2).map_batches(
                KillsItsActor, compute=ActorPoolStrategy(size=1), **actor_retries(1)).materialize()
        except BaseException as e:  # noqa: BLE001 (what the stage raised is the result)
            failed.append(e)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive(), "a model that kills every actor was retried for 120 s"
    assert failed and isinstance(failed[0], ray.exceptions.ActorDiedError), failed


@pytest.mark.slow
def test_sharded_kmeans_continues_from_its_checkpoint(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    shards = [rng.normal(size=(400, 4)).astype(np.float32) + 4 * i for i in range(3)]
    settings = dict(n_clusters=6, max_iter=12, tol=0, seed=2, num_actors=2)
    reference = ShardedKMeans(**settings).fit(shards)
    state = tmp_path / "sharded.npz"
    # A crash after iteration 8 leaves the state of iteration 5 (the fit checkpoints every 5): the fit from it
    # runs iterations 6-12 only, without initialising again, and ends where an uninterrupted fit ends.
    partial = ShardedKMeans(**{**settings, "max_iter": 8}, checkpoint=state, checkpoint_every=5).fit(shards)
    assert len(partial.history_) == 8
    resumed = ShardedKMeans(**settings, checkpoint=state, checkpoint_every=5).fit(shards)
    assert [h["iter"] for h in resumed.history_] == list(range(1, 13))
    np.testing.assert_allclose(resumed.cluster_centers_, reference.cluster_centers_, rtol=1e-6)
    assert resumed.inertia_ == pytest.approx(reference.inertia_, rel=1e-9)


def _pipeline(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.pipeline", *args]


def test_driver_killed_then_resumed_equals_an_uninterrupted_run(ray_train, tmp_path):
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "killed"
    # The driver joins this module's Ray, so a killed driver takes only its own job's actors and tasks with it.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_train.get_runtime_context().gcs_address}
    driver = subprocess.Popen(_pipeline("--config", str(config), "--out", str(run_dir)), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = run_dir / ".embeddings.partial" / "_done"
    try:
        wait_for(lambda: done.is_dir() and any(done.glob("*.json")) or driver.poll() is not None, 240,
                  "the first embedding shard")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    # Killed while embedding: the model is finished, the embeddings are not (only some shards are recorded).
    model_time = read_manifest(run_dir / "model", stage="train")["time"]
    assert not (run_dir / "embeddings").exists() and (run_dir / ".embeddings.partial").is_dir()
    # A crash mid-write of a later stage: a folder without its manifest is never read as a result.
    (run_dir / "assignments").mkdir()
    pq.write_table(pa.table({"id": [0], "cluster": pa.array([0], pa.int32())}), run_dir / "assignments" / "x.parquet")
    cfg = config_for_resume(run_dir)
    assert finished_stages(cfg, run_dir) == {"train"}

    resumed = subprocess.run(_pipeline("--resume", str(run_dir)), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert set(result["seconds"]) == {"embed", "cluster", "evaluate"}  # training was not redone
    assert read_manifest(run_dir / "model", stage="train")["time"] == model_time
    embeddings = read_manifest(run_dir / "embeddings", stage="embed")
    assert 0 < embeddings["resumed_rows"] < 400  # the shards written before the kill were kept
    np.testing.assert_array_equal(_ids(run_dir / "embeddings", "embed"), np.arange(400))
    np.testing.assert_array_equal(_ids(run_dir / "assignments", "assign"), np.arange(400))
    assert not list(run_dir.glob(".*.partial")) and not list(run_dir.glob(".*.tmp-*"))
    assert json.loads((run_dir / "run.json").read_text())["resumed"][-1]["skipped"] == ["train"]
    assert finished_stages(cfg, run_dir) == {"train", "embed", "cluster"}

    # The same config and model, never interrupted: the stages after training, run whole from the trained model
    # (training itself finished before the kill; its reproducibility is not what a resume has to show).
    reference = run_pipeline(config_from_dict(TINY), tmp_path / "uninterrupted", pretrained=run_dir / "model")
    assert result["metrics"].keys() == reference.metrics.keys()
    for key, value in reference.metrics.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    for folder, stage in (("embeddings", "embed"), ("assignments", "assign")):
        ours = read_table(run_dir / folder, stage=stage).sort_by("id")
        theirs = read_table(tmp_path / "uninterrupted" / folder, stage=stage).sort_by("id")
        assert ours.column("id").equals(theirs.column("id")), folder
        if stage == "assign":
            assert ours.column("cluster").equals(theirs.column("cluster"))
        else:
            np.testing.assert_allclose(np.stack(ours.column("z").to_numpy(zero_copy_only=False)),
                                       np.stack(theirs.column("z").to_numpy(zero_copy_only=False)), rtol=1e-6)


def test_resume_refuses_a_stage_made_with_other_settings(tmp_path):
    """A finished stage whose config hash is not the run's (a stage command run with --set) is an error."""
    cfg = config_from_dict(TINY)
    save_config(cfg, tmp_path)
    (tmp_path / "model").mkdir()
    from engine.data.folders import write_manifest

    write_manifest(tmp_path / "model", stage="train", config_hash="0123456789abcdef")
    with pytest.raises(ConfigError, match=r"model was made with other settings \(config hash 0123456789abcdef\) "
                                          r"than .*config.yaml .* start a fresh run"):
        finished_stages(config_for_resume(tmp_path), tmp_path)
