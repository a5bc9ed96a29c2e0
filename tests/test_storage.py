"""engine.storage on a local folder and on a real S3 API (moto's server); the run-directory checks of engine.rundir."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from s3_server import s3_server

from engine import storage
from engine.errors import ConfigError
from engine.rundir import as_run_dir, check_shared, open_run_dir


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def test_join_keeps_uri_options_at_the_end():
    assert storage.join("s3://b/runs/x?scheme=http", "model", "_manifest.json") == \
        "s3://b/runs/x/model/_manifest.json?scheme=http"
    assert storage.join("/tmp/runs/x/", "model") == "/tmp/runs/x/model"
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http")
    with pytest.raises(ConfigError, match=r"nosuch://b/x: not a path or a URI that pyarrow.fs can open"):
        storage.resolve("nosuch://b/x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip_and_folder_copy_writes_the_manifest_last(where, s3, tmp_path, monkeypatch):
    root = str(tmp_path / "root") if where == "local" else s3.uri("root")
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")
    assert storage.read_text(storage.join(root, "a", "b.txt")) == "hello"
    assert storage.is_file(storage.join(root, "a", "b.txt")) and storage.exists(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "missing"))

    src = tmp_path / "stage"
    (src / "sub").mkdir(parents=True)
    for name in ("part-0.parquet", "sub/part-1.parquet", storage.MANIFEST):
        (src / name).write_text(name)
    dst = storage.join(root, "stage")
    storage.write_text(storage.join(dst, "stale.parquet"), "from an older run")
    written = []
    real_copy = storage._copy_file

    def spy(sfs, sp, target):
        written.append(sp.rsplit("/", 1)[-1])
        real_copy(sfs, sp, target)

    monkeypatch.setattr(storage, "_copy_file", spy)
    storage.copy(src, dst)
    assert written[-1] == storage.MANIFEST
    assert storage.files(dst) == [storage.MANIFEST, "part-0.parquet", "sub/part-1.parquet"]
    assert storage.read_text(storage.join(dst, "sub", "part-1.parquet")) == "sub/part-1.parquet"
    storage.delete(dst)
    assert storage.files(dst) == []


def test_a_driver_node_without_cpus_counts_the_worker_nodes_to_come():
    from engine.runtime import Resources

    common = dict(cpus=8, gpus=0, address="a", local=False)
    assert Resources(nodes=3, driver_cpus=2, **common).worker_nodes == 3
    # cluster.yaml's head: CPU 0, workers autoscaled from zero, so one alive node now but others will write.
    assert Resources(nodes=1, driver_cpus=0, **common).worker_nodes == 2


def _ray_cfg(**kw):
    return SimpleNamespace(**{"shared_storage": False, "staging_dir": None, **kw})


def test_local_run_dir_is_refused_on_a_multi_node_cluster_unless_declared_shared(tmp_path, s3):
    check_shared(tmp_path / "run", _ray_cfg(), nodes=1)
    for local in (tmp_path / "run", f"file://{tmp_path}/run"):
        with pytest.raises(ConfigError, match=r"run directory .*run \(--out, RUN_DIR\): a local path, but the Ray "
                                              r"cluster has 3 nodes.*ray.shared_storage=true.*object store URI \(s3://"):
            check_shared(local, _ray_cfg(), nodes=3)
    check_shared(tmp_path / "run", _ray_cfg(shared_storage=True), nodes=3)
    # An object-store run needs no shared file system: what the workers write goes to the store, and only the driver
    # uses its staging folder, wherever ray.staging_dir puts it.
    check_shared(s3.uri("runs/x"), _ray_cfg(), nodes=3)
    check_shared(s3.uri("runs/x"), _ray_cfg(staging_dir=str(tmp_path)), nodes=2)


def test_object_store_run_dir_publishes_complete_folders_and_fetches_them_back(tmp_path, s3):
    uri = s3.uri("runs/published")
    with open_run_dir(uri, _ray_cfg(staging_dir=str(tmp_path)), nodes=1) as run:
        assert run.local.parent == tmp_path
        (run.local / "config.yaml").write_text("name: x\n")
        (run.local / "model").mkdir()
        (run.local / "model" / "checkpoint.pt").write_bytes(b"weights")
        (run.local / "unfinished").mkdir()  # no manifest: never published
        (run.local / "unfinished" / "part.parquet").write_text("half")
        run.publish()
        assert storage.files(uri) == ["config.yaml"]  # model/ has no manifest yet
        (run.local / "model" / storage.MANIFEST).write_text(json.dumps({"stage": "train"}))
        run.publish()
        assert storage.files(storage.join(uri, "model")) == [storage.MANIFEST, "checkpoint.pt"]
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone
    # The folders Ray's workers write are in the store itself: a stage reads them there, so none is fetched.
    embeddings = storage.join(uri, "embeddings")
    storage.write_text(storage.join(embeddings, storage.MANIFEST), json.dumps({"stage": "embed"}))
    with open_run_dir(uri, _ray_cfg(staging_dir=str(tmp_path)), nodes=1, fetch=True) as run:
        assert (run.local / "model" / "checkpoint.pt").read_bytes() == b"weights"
        assert not (run.local / "unfinished").exists() and not (run.local / "embeddings").exists()
        assert run.folder("embeddings") == embeddings and run.folder("model") == run.local / "model"
        (run.local / "metrics.json").write_text("{}")
    assert storage.read_text(storage.join(uri, "metrics.json")) == "{}"
    local = as_run_dir(tmp_path / "run")
    assert local.folder("embeddings") == tmp_path / "run" / "embeddings" and local.train_storage is None
    with pytest.raises(ConfigError, match=r"s3://.*: an object-store run directory is staged; open it with "
                                          r"engine.rundir.open_run_dir"):
        as_run_dir(uri)
