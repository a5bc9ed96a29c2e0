"""The stage job entry points (jobs.embed, jobs.cluster; jobs.train_encoder's errors) in-process on a tiny run, and
shard folders on an object store (a real S3 API from moto's server). The pipeline, a resumed run and a stage job on
an s3:// run directory run in test_nodeloss.py, on worker nodes that do not see the driver's staging folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from s3_server import s3_server
from typer.testing import CliRunner

from engine import storage
from engine.cli import app
from engine.data import read_manifest
from jobs import cluster as cluster_job
from jobs import embed as embed_job
from jobs import train_encoder as train_job

pytestmark = pytest.mark.slow

ROWS = 300
TINY = [
    "--set", "data.source=blobs", "--set", f"data.n_samples={ROWS}", "--set", "data.n_features=6",
    "--set", "data.centers=3", "--set", "data.rows_per_shard=100", "--set", "data.normalize=standard",
    "--set", "model.hidden=[16]", "--set", "model.latent_dim=3", "--set", "train.epochs=2",
    "--set", "train.batch_size=64", "--set", "cluster.k=3", "--set", "cluster.n_init=2",
    "--set", "cluster.method=kmeans", "--set", "cluster.manifold=none",
]


def result_line(capsys) -> dict:
    """The job's result: the last line of its stdout (progress lines come before it)."""
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_train_alone_then_the_stage_jobs_and_commands(ray_train, tmp_path, capsys):
    """`dce train` alone, then the stage jobs (jobs.embed, jobs.cluster) and `dce evaluate` on its run directory;
    jobs.train_encoder itself runs as a Ray job in test_jobs.py."""
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "digits", *TINY, "--set", "train.epochs=1", "--out", str(run),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(run / "model")
    assert read_manifest(run / "model", stage="train")["epochs"] == 1
    assert (run / "config.yaml").is_file() and not (run / "embeddings").exists()

    assert embed_job.main([str(run)]) == 0
    assert result_line(capsys) == {"run_dir": str(run), "rows": ROWS, "latent_dim": 3}

    # The run's own config, with an override: k=2 on three blobs.
    assert cluster_job.main([str(run), "--set", "cluster.k=2"]) == 0
    result = result_line(capsys)
    assert result["cluster"]["k"] == 2 and result["metrics"]["acc"] > 0.5
    assert np.load(run / "centroids.npy").shape == (2, 3)
    assert json.loads((run / "metrics.json").read_text()) == result["metrics"]
    evaluated = CliRunner().invoke(app, ["evaluate", str(run), "--quiet"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout.strip().splitlines()[-1]) == result["metrics"]


def test_stage_job_errors_are_one_line(ray_local, tmp_path, capsys):
    assert embed_job.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nothing'}: not a run directory (no config.yaml)"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: run\n")
    assert cluster_job.main([str(tmp_path / "run")]) == 2
    assert "embeddings: no _manifest.json" in capsys.readouterr().err
    assert train_job.main(["--set", "cluster.k=0", "--out", str(tmp_path / "x")]) == 2
    assert "cluster.k" in capsys.readouterr().err


def test_shard_folders_on_s3_are_written_by_ray_data_and_committed_by_their_manifest(ray_local):
    import ray.data

    from engine.data import read_manifest, read_shards, read_table, staged_folder, write_dataset
    from engine.data.folders import write_manifest
    from engine.errors import DataError, IncompleteResultError

    with s3_server() as s3:
        folder = s3.uri("shards")
        ds = ray.data.range(250, override_num_blocks=3)
        manifest = write_dataset(ds, folder, stage="input", config_hash="h", expected_rows=250)
        assert manifest["rows"] == 250 and storage.files(folder) == sorted([storage.MANIFEST, *manifest["files"]])
        assert read_manifest(folder, stage="input") == manifest
        assert sorted(read_table(folder).column("id").to_pylist()) == list(range(250))
        # Ray Data tasks read the shards by their URIs, in worker processes.
        assert sorted(read_shards(folder).to_pandas()["id"]) == list(range(250))

        # A rewrite that fails its row check leaves no result behind, not the old one under a new manifest.
        with pytest.raises(DataError, match="wrote 250 rows but the input has 999"):
            write_dataset(ds, folder, stage="input", config_hash="h", expected_rows=999)
        with pytest.raises(IncompleteResultError, match="no _manifest.json"):
            read_manifest(folder)
        assert storage.files(folder) == []

        single = s3.uri("single")
        with staged_folder(single) as tmp:
            (tmp / "a.txt").write_text("a")
            write_manifest(tmp, stage="x", config_hash="h", files=["a.txt"])
        assert storage.files(single) == [storage.MANIFEST, "a.txt"]
        assert read_manifest(single, stage="x")["files"] == ["a.txt"]
