"""Bad input and unsafe outputs: one `error:` line, exit code 2, and nothing of the user's lost (issue 28).

Every case runs the `dce` command line (in this process through typer's runner, and a few as real subprocesses) or
the Python API, and compares the files on disk before and after. Most are refused before Ray starts; those found
inside Ray tasks run on the shared local Ray, and the subprocesses that need a Ray join it (RAY_ADDRESS).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from namespaces import unshare_works
from tiny import TINY_RUN, as_args
from typer.testing import CliRunner
from waiting import wait_for

from engine import errors
from engine.cli import app
from engine.errors import ConfigError, EngineError

DCE = Path(sys.executable).parent / "dce"
REPO = Path(__file__).resolve().parents[1]
# A run that starts fast and trains long enough to be interrupted mid-way.
LONG_RUN = ["data.source=blobs", "data.n_samples=200", "data.n_features=4", "data.centers=3", "model.hidden=[8]",
            "model.latent_dim=2", "train.epochs=400", "train.num_workers=1", "train.checkpoint_every=1",
            "cluster.k=3", "cluster.method=kmeans", "cluster.manifold=none", "report.enabled=false"]
BLOBS = ["--set", "data.source=blobs", "--set", "data.n_samples=50", "--set", "data.n_features=3",
         "--set", "cluster.manifold=none"]  # valid but for what each test breaks: digits' UMAP needs > 60 rows


# ---- helpers ----------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> content): what must be the same before and after a refusal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def invoke(*args) -> subprocess.CompletedProcess:
    """`dce ...` in a new process, as a user runs it: every refusal here comes before Ray starts (~1 s a call)."""
    return dce(*args)


def in_process(*args) -> object:
    """`dce ...` in this process, on the shared local Ray: for the calls that get as far as Ray (a new process
    would start a Ray of its own, ~10 s)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error(result, pattern: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...` matching `pattern`; no traceback."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    err = result.stderr.strip()
    assert code == 2, (code, result.stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def dce(*args, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`dce ...` as a user runs it: a new process."""
    return subprocess.run([str(DCE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_vectors(path: Path, x, ids=None, column: str = "z") -> Path:
    ids = np.arange(len(x)) if ids is None else ids
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), column: x}), path)
    return path


def fixed(m: np.ndarray) -> pa.Array:
    m = np.asarray(m, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def foreign_folder(root: Path) -> Path:
    """A folder of the user's that happens to have names a run writes: model/readme.txt, metrics.json."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "readme.txt").write_text("my notes")
    (root / "metrics.json").write_text('{"mine": 1}')
    return root


@pytest.fixture(scope="module")
def finished_run(tracked_tiny_run, tmp_path_factory) -> Path:
    """A copy of the session's tiny run (tests/tiny.py's TINY_RUN), finished: model, embeddings, assignments."""
    out = tmp_path_factory.mktemp("finished") / "tiny"
    shutil.copytree(tracked_tiny_run[0], out)
    return out


@pytest.fixture(scope="module")
def new_rows(tmp_path_factory) -> Path:
    """Rows to assign to the tiny run (6 features)."""
    path = tmp_path_factory.mktemp("rows") / "new.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20, 6)).astype(np.float32))
    return path


# ---- the output-path policy, before Ray starts -----------------------------------------------------


def test_move_into_place_never_deletes_a_folder_that_is_not_a_result(tmp_path):
    """The staged write of a result onto a folder of the user's: refused, the folder kept (it was removed)."""
    from engine.data.folders import staged_folder, write_manifest

    out = foreign_folder(tmp_path / "out") / "model"
    before = snapshot(tmp_path)
    with pytest.raises(EngineError, match=r"model: exists and is not a result of the engine"):
        with staged_folder(out) as tmp:
            (tmp / "checkpoint.pt").write_bytes(b"x")
            write_manifest(tmp, stage="train", config_hash="h")
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*")]  # nothing staged left behind


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_run_into_a_folder_of_other_files_is_refused(tmp_path, overwrite):
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    pattern = r"mine/model is not one \(no _manifest.json, or files beside it\)" if overwrite else (
        r"mine is not empty and is not a run directory \(metrics.json, model\)")
    assert_one_error(invoke("run", *BLOBS, "--out", out, *(["--overwrite"] if overwrite else [])), pattern)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [
    ["train", *BLOBS], ["federate", "federated", "--set", "data.source=blobs"], ["cluster", "{data}"],
    ["sweep-k", "{data}", "--k", "2..3"], ["prepare", *BLOBS],
], ids=lambda c: c[0])
def test_every_command_refuses_a_folder_of_other_files(tmp_path, command):
    """The same policy for every command that writes: a non-empty folder that is not the engine's is refused."""
    data = write_vectors(tmp_path / "emb.parquet", fixed(np.random.default_rng(0).random((30, 3))))
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    assert_one_error(invoke(*[{"{data}": data}.get(a, a) for a in command], "--out", out), r"mine is not empty")
    assert snapshot(out) == before


def test_assign_refuses_a_folder_of_other_files(tmp_path, finished_run, new_rows):
    """`dce assign`, which needs a finished run, under the same policy."""
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    assert_one_error(invoke("assign", finished_run, "--input", new_rows, "--out", out), r"mine is not empty")
    assert snapshot(out) == before


def test_run_onto_a_finished_run_needs_resume_or_overwrite(finished_run):
    before = snapshot(finished_run)
    same = invoke("run", *as_args(TINY_RUN), "--out", finished_run, "--quiet")
    assert_one_error(same, rf"{finished_run} holds a run of this config already; continue it with "
                           rf"`dce run --resume {finished_run}`, or replace its results with --overwrite")
    other = invoke("run", *as_args(TINY_RUN), "--set", "cluster.k=3", "--out", finished_run, "--quiet")
    assert_one_error(other, r"holds a run of another config \(config hash \w+, this one \w+\)")
    assert snapshot(finished_run) == before


@pytest.mark.parametrize(("where", "flags"), [("run", []), ("run/assignments", ["--overwrite"]),
                                              ("run/model/new", [])])
def test_assign_into_its_own_run_is_refused(finished_run, new_rows, where, flags):
    """`dce assign RUN --out RUN` removed the whole run (model, embeddings, config) with exit code 0; inside the run
    it is refused even with --overwrite."""
    out = str(finished_run) + where[3:]
    before = snapshot(finished_run)
    result = invoke("assign", finished_run, "--input", new_rows, "--out", out, *flags)
    assert_one_error(result, rf"--out {re.escape(out)} is (the|inside the) input {finished_run}")
    assert snapshot(finished_run) == before


def test_assign_replaces_only_its_own_result(finished_run, new_rows, tmp_path):
    out = tmp_path / "assigned"
    assert in_process("assign", finished_run, "--input", new_rows, "--out", out, "--quiet").exit_code == 0
    before = snapshot(out)
    assert_one_error(invoke("assign", finished_run, "--input", new_rows, "--out", out),
                     r"assigned is not empty: a result of the engine; replace it with --overwrite")
    assert snapshot(out) == before
    (out / "notes.txt").write_text("mine")  # now it holds a file of the user's too: never replaced
    assert_one_error(invoke("assign", finished_run, "--input", new_rows, "--out", out, "--overwrite"),
                     r"assigned is not empty")
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_engines_results_and_keeps_other_files(finished_run, tmp_path):
    """--overwrite onto a run of another config: its results go, a file of the user's beside them stays."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "notes.txt").write_text("mine")
    from engine.config import config_from_dict
    from engine.rundir import check_run_output

    other = config_from_dict({"cluster": {"k": 3}})
    with pytest.raises(errors.OutputError, match="holds a run of another config"):
        check_run_output(run, config_hash=other.hash())
    check_run_output(run, config_hash=other.hash(), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_an_output_inside_the_input_is_refused(tmp_path):
    data = tmp_path / "vectors"
    data.mkdir()
    write_vectors(data / "a.parquet", fixed(np.ones((5, 2))))
    before = snapshot(tmp_path)
    assert_one_error(invoke("cluster", data, "--set", "cluster.k=2", "--out", data / "run"),
                     r"--out .*vectors/run is inside the input")
    assert_one_error(invoke("prepare", "--set", "data.source=parquet", "--set", f"data.path={data}/*.parquet",
                            "--set", "data.column=z", "--out", data / "shards"), r"is inside the input")
    assert snapshot(tmp_path) == before


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    assert_one_error(invoke("run", "--resume", tmp_path / "x"), r"x: not a run directory \(no config.yaml\)")
    from engine.config import config_from_dict
    from engine.pipeline import run_pipeline

    for missing in (tmp_path / "x", tmp_path / "y"):  # from Python too: an empty folder, no folder
        with pytest.raises(errors.OutputError, match=r"not a run directory \(no engine config.yaml\), nothing to"):
            run_pipeline(config_from_dict({"data": {"source": "blobs", "n_samples": 50}}), missing, resume=True)
    assert sorted(os.listdir(tmp_path)) == ["x"]


# ---- file-system failures: one line naming the path and the cause, before Ray starts --------------


@pytest.mark.parametrize(("make", "out", "pattern"), [
    ("file", "f", r"f: is a file, not a folder"),
    ("file", "f/run", r"f/run: cannot be a folder, .*/f is a file"),
    (None, "/proc/dce-test/run", r"/proc/dce-test/run: cannot write there: No such file or directory"),
], ids=["out-is-a-file", "parent-is-a-file", "no-such-parent"])
def test_file_system_refusals(tmp_path, monkeypatch, make, out, pattern):
    monkeypatch.chdir(tmp_path)
    if make == "file":
        Path("f").write_text("mine")
    assert_one_error(invoke("run", *BLOBS, "--out", out), pattern)
    assert sorted(os.listdir(tmp_path)) == (["f"] if make else [])
    if make:
        assert Path("f").read_text() == "mine"


def test_read_only_and_full_file_systems(tmp_path):
    """A read-only bind mount and a full 64 KiB tmpfs, in a mount namespace of the test's own: `dce` refuses both
    before Ray starts, naming the path and the cause, and leaves nothing there."""
    if not unshare_works():
        pytest.skip("needs mount namespaces (unshare -Urm), which this machine refuses")
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    script = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
              'mount -t tmpfs -o size=64k tmpfs "$2" && (dd if=/dev/zero of="$2/fill" bs=4k 2>/dev/null; true) && '
              '"$3" prepare --set data.source=blobs --out "$1/data" 2>&1; echo "rc=$?"; '
              '"$3" prepare --set data.source=blobs --out "$2/data" 2>&1; echo "rc=$?"; '
              'echo "ro:$(ls -A "$1")"; echo "full:$(ls -A "$2")"')
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(ro), str(full), str(DCE)],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines[:4] == [f"error: {ro}/data: cannot write there: Read-only file system (in {ro})", "rc=2",
                         f"error: {full}/data: cannot write there: No space left on device (in {full})", "rc=2"], \
        proc.stdout + proc.stderr
    assert lines[4:] == ["ro:", "full:fill"]  # nothing written in either


# ---- config and input errors that fail before Ray --------------------------------------------------


@pytest.mark.parametrize(("text", "pattern"), [
    ("data:\n  source: blobs\n  n_samples: [1, 2\n", r"c.yaml:4:1: not valid YAML: while parsing a flow sequence"),
    ("data:\n\tsource: blobs\n", r"c.yaml:2:1: not valid YAML: .*found character '\\t'"),
    ("", r"c.yaml: the config is empty"),
    ("# only a comment\n", r"c.yaml: the config is empty"),
    ("- a\n- b\n", r"c.yaml: the top level must be a mapping"),
    ("federated:\n  privacy:\n    epsilon: .inf\n    clip_norm: 1\n",
     r"'federated.privacy.epsilon': Input should be a finite number"),
    ("federated:\n  privacy:\n    epsilon: .nan\n    clip_norm: 1\n",
     r"'federated.privacy.epsilon': Input should be a finite number"),
    ("clustr:\n  k: 3\n", r"unknown key 'clustr'"),
], ids=["yaml-syntax", "yaml-tab", "empty", "comment-only", "not-a-mapping", "epsilon-inf", "epsilon-nan",
        "unknown-key"])
def test_bad_config_files(tmp_path, text, pattern):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert_one_error(invoke("run", config, "--out", tmp_path / "run"), pattern)
    assert not (tmp_path / "run").exists()
    from engine.config import load_config

    with pytest.raises(ConfigError, match=pattern):
        load_config(config)


@pytest.mark.parametrize(("args", "pattern"), [
    (["--set", "data.source=npy", "--set", "data.path={tmp}/nope.npy"], r"nope.npy"),
    (["--set", "data.source=parquet", "--set", "data.path={tmp}/v.parquet", "--set", "data.column=nope"],
     r"v.parquet.*'nope'"),
    (["--set", "data.source=parquet", "--set", "data.path={tmp}/v.parquet", "--set", "data.column=z",
      "--set", "cluster.k=50"], r"cluster.k=50 should be <= the number of rows \(20\)"),
    (["--set", "data.source=parquet", "--set", "data.path={tmp}/v.parquet", "--set", "data.column=z",
      "--set", "cluster.k=2", "--set", "cluster.manifold=umap"],
     r"cluster.umap.n_neighbors=\d+ should be < the number of rows \(20\)"),
    (["--set", "data.source=parquet", "--set", "data.path={tmp}/v.parquet", "--set", "data.column=z",
      "--set", "cluster.manifold=none", "--set", "cluster.method=hdbscan", "--set", "cluster.min_cluster_size=50"],
     r"cluster.min_cluster_size=50 should be <= the number of rows \(20\)"),
    (["--set", "data.source=parquet", "--set", "data.path={tmp}/v.parquet", "--set", "data.column=z",
      "--set", "cluster.k=2", "--set", "cluster.manifold=none", "--set", "cluster.method=agglomerative",
      "--set", "cluster.micro_clusters=30"],
     r"cluster.micro_clusters=30 should be <= the number of rows \(20\)"),
    (["--set", "train.epochs=many"], r"'train.epochs'"),
    (["--resume", "{tmp}", "--no-report"], r"--no-report cannot be used with --resume"),
], ids=["missing-file", "missing-column", "k-above-rows", "umap-neighbours-above-rows", "min-cluster-size-above-rows",
        "micro-clusters-above-rows", "bad-type", "resume-and-no-report"])
def test_bad_inputs_found_before_ray(tmp_path, args, pattern):
    write_vectors(tmp_path / "v.parquet", fixed(np.ones((20, 3))))
    before = snapshot(tmp_path)
    assert_one_error(invoke("run", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", tmp_path / "r"),
                     pattern)
    assert snapshot(tmp_path) == before


def test_cluster_of_parquet_without_config_is_plain_kmeans(tmp_path):
    """No --config: the engine's plain defaults (k-means, no manifold), not the digits demo's UMAP + GMM."""
    from engine.cli import _run_or_embeddings  # noqa: F401 - the command's own path is what is checked below
    from engine.config import config_from_dict

    plain = config_from_dict({"name": "embeddings"})
    assert (plain.cluster.method, plain.cluster.manifold, plain.cluster.k) == ("kmeans", "none", 10)
    data = write_vectors(tmp_path / "v.parquet", fixed(np.ones((5, 2))))
    # k=10 > 5 rows: refused naming the plain default's k, before Ray; the digits recipe would name its own.
    assert_one_error(invoke("cluster", data, "--out", tmp_path / "r"), r"cluster.k=10 should be <= .* \(5\)")


# ---- errors inside Ray tasks: one line, the file named ---------------------------------------------


def _nan(tmp):
    x = np.ones((8, 3), np.float32)
    x[5, 1] = np.nan
    return write_vectors(tmp / "bad.parquet", fixed(x)), r"bad.parquet: column 'z' row 5 \(id=5\) has NaN values"


def _inf(tmp):
    x = np.ones((8, 3), np.float32)
    x[2, 0] = np.inf
    return write_vectors(tmp / "bad.parquet", fixed(x)), r"bad.parquet: column 'z' row 2 \(id=2\) has inf values"


def _mixed(tmp):
    return (write_vectors(tmp / "bad.parquet", pa.array([[1.0, 2.0]] * 4 + [[1.0, 2.0, 3.0]] * 4)),
            r"bad.parquet: column 'z' has vectors of mixed lengths")


def _null(tmp):
    return (write_vectors(tmp / "bad.parquet", pa.array([[1.0, 2.0]] * 4 + [None] * 4, pa.list_(pa.float32()))),
            r"bad.parquet: column 'z' row 4 is null")


def _duplicate(tmp):
    folder = tmp / "parts"
    folder.mkdir()
    write_vectors(folder / "a.parquet", fixed(np.ones((4, 2))), ids=np.array([1, 2, 3, 4]))
    write_vectors(folder / "b.parquet", fixed(np.ones((4, 2))), ids=np.array([4, 5, 6, 7]))
    return folder, r"parts: column 'id' is not unique \(id 4 appears 2 times\)"


@pytest.mark.parametrize("make", [_nan, _inf, _mixed, _null, _duplicate], ids=lambda f: f.__name__[1:])
def test_data_errors_inside_ray_tasks(ray_local, tmp_path, make):
    data, pattern = make(tmp_path)
    before = snapshot(tmp_path)
    assert_one_error(in_process("cluster", data, "--set", "cluster.k=2", "--out", tmp_path / "r", "--quiet"), pattern)
    assert snapshot(tmp_path) == before  # no run directory left


def _idx(path: Path, images: np.ndarray, cut: int = 0) -> Path:
    raw = bytes([0, 0, 8, images.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in images.shape)
    data = gzip.compress(raw + images.astype(np.uint8).tobytes())
    path.write_bytes(data[:len(data) - cut])
    return path


def test_truncated_gzip_idx(ray_local, tmp_path):
    images = _idx(tmp_path / "images.gz", np.random.default_rng(0).integers(0, 255, (40, 4, 4)), cut=30)
    before = snapshot(tmp_path)
    result = in_process("prepare", "--set", "data.source=idx", "--set", f"data.images=[{images}]", "--out",
                        tmp_path / "d")
    assert_one_error(result, r"images.gz")
    assert snapshot(tmp_path) == before


def test_a_ray_task_error_is_one_line_in_a_real_process(ray_local, tmp_path):
    """As a user sees it: no Ray Data traceback, no "please open an issue", with --quiet as without."""
    data, pattern = _nan(tmp_path)
    proc = dce("cluster", data, "--set", "cluster.k=2", "--out", tmp_path / "r", "--quiet",
               env={"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert_one_error(proc, pattern)
    assert not (tmp_path / "r").exists()


# ---- interruption ----------------------------------------------------------------------------------


FINALIZER_SIGNAL = """
import gc, signal, sys, time, weakref
from engine import interrupt
from engine.errors import Interrupted

interrupt.install()

class Thing:
    pass

def finalizer(_):  # the handler runs in here, where Python swallows what it raises
    signal.raise_signal(signal.SIGTERM)
    sum(range(1000))

thing = Thing()
ref = weakref.ref(thing, finalizer)
try:
    del thing
    gc.collect()
    for _ in range(500):  # the command goes on (5 s)
        time.sleep(0.01)
except Interrupted as e:
    print("interrupted", e.exit_code)
else:
    print("not interrupted")
"""


def test_a_signal_taken_inside_a_finalizer_still_interrupts():
    """A SIGTERM whose handler ran inside a weakref callback (as one did during `import ray.train`) was swallowed by
    Python and the run went on to its end: the command is interrupted all the same, without a traceback."""
    proc = subprocess.run([sys.executable, "-c", FINALIZER_SIGNAL], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "interrupted 143", proc.stdout + proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# The named points: training has finished its second epoch (a checkpoint is written every epoch); training starts.
EPOCH_2 = r'"event": "epoch".*"epoch": 2\b'
TRAIN_STARTS = r'"event": "stage_start", "stage": "train"'


@pytest.mark.parametrize(("sig", "code", "point"), [(signal.SIGINT, 130, EPOCH_2), (signal.SIGTERM, 143, TRAIN_STARTS)],
                         ids=["sigint-in-epoch-2", "sigterm-as-training-starts"])
def test_interrupted_run_keeps_its_checkpoints_and_says_how_to_resume(ray_train, tmp_path, sig, code, point):
    out, log = tmp_path / "run", tmp_path / "progress.jsonl"
    env = {**os.environ, "RAY_ADDRESS": ray_train.get_runtime_context().gcs_address}
    with log.open("w") as stderr:
        proc = subprocess.Popen([str(DCE), "run", *as_args(LONG_RUN), "--out", str(out), "--log-format", "json"],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path)
        try:
            wait_for(lambda: re.search(point, log.read_text()), 240, point)
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = log.read_text()
    assert proc.returncode == code, err[-3000:]
    assert err.strip().splitlines()[-1] == f"interrupted: resume with `dce run --resume {out}`"
    assert "Traceback" not in err and "error:" not in err and "stage_failed" not in err
    assert '"event": "stage_interrupted", "stage": "train"' in err
    if point == EPOCH_2:
        assert list((out / "train").glob("checkpoint_*/checkpoint.pt")), "the checkpoints were not kept"
    assert (out / "config.yaml").is_file() and not (out / "model").exists()
    # The interrupted driver's workers are gone: the shared Ray has all its CPUs again.
    wait_for(lambda: ray_train.available_resources().get("CPU") == ray_train.cluster_resources()["CPU"], 60,
             "the interrupted run's workers to end")


# ---- the Python API ------------------------------------------------------------------------------


def test_python_api_applies_the_same_policy(finished_run, new_rows, tmp_path):
    from engine.config import config_from_dict
    from engine.data.prepare import prepare_source
    from engine.pipeline import run_pipeline
    from engine.predict import assign_source, input_source, load_run, open_new_rows

    mine = foreign_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    cfg = config_from_dict({"data": {"source": "blobs", "n_samples": 50}})
    with pytest.raises(errors.OutputError, match="mine is not empty and is not a run directory"):
        run_pipeline(cfg, mine)
    with pytest.raises(errors.OutputError, match="mine/model is not one"):
        run_pipeline(cfg, mine, overwrite=True)
    run = load_run(finished_run)
    source = open_new_rows(run, input_source(new_rows))
    with pytest.raises(errors.OutputError, match="is the input"):
        assign_source(run, source, finished_run)
    with pytest.raises(errors.OutputError, match="mine is not empty"):
        prepare_source(cfg.data, mine)
    assert snapshot(tmp_path) == before
    assert json.loads((finished_run / "run.json").read_text())["config_hash"]  # the run is untouched


def test_assign_reads_what_the_clustering_was(finished_run, new_rows, tmp_path):
    """A run re-clustered with `dce cluster RUN --set cluster.method=gmm` keeps kmeans in config.yaml; its
    cluster.json says gmm, and that is what `dce assign` reads."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    summary = json.loads((run / "cluster.json").read_text())
    (run / "cluster.json").write_text(json.dumps({**summary, "method": "gmm", "manifold": "none"}))
    assert_one_error(invoke("assign", run, "--input", new_rows, "--out", tmp_path / "a"),
                     r"cluster.method=gmm labels rows without centroids")
    assert not (tmp_path / "a").exists()


def test_a_late_failure_leaves_no_partial_run(ray_local, tmp_path):
    """`dce cluster PARQUET --out DIR` whose clusterer refuses the data after the import: DIR is removed again
    (it kept config.yaml and embeddings/)."""
    data = write_vectors(tmp_path / "v.parquet", fixed(np.random.default_rng(0).random((20, 3))))
    out = tmp_path / "r"
    result = in_process("cluster", data, "--set", "cluster.k=2", "--set", "cluster.manifold=umap", "--out", out,
                        "--quiet")
    assert_one_error(result, r"cluster.umap.n_neighbors=\d+ should be < the number of rows \(20\)")
    assert not out.exists()


def test_an_output_inside_an_object_store_input_is_refused_before_the_store_is_touched():
    """`dce assign s3://.../run --out s3://.../run` deleted the run in the store (the write clears its folder first);
    the URIs are compared as written, so no store is needed to refuse it."""
    from engine.rundir import check_folder_output

    run = "s3://bucket/runs/x?endpoint_override=127.0.0.1:1&scheme=http"
    for out in (run, "s3://bucket/runs/x/assignments?endpoint_override=127.0.0.1:1&scheme=http"):
        with pytest.raises(errors.OutputError, match=r"is (the|inside the) input s3://bucket/runs/x"):
            check_folder_output(out, inputs=[run])


def test_a_write_the_file_system_refuses_later_is_one_line():
    """A full disk or a read-only file system found during a stage (an OSError, possibly wrapped by Ray) is the
    engine's one-line error naming the file; other OSErrors stay bugs with their traceback."""
    import errno

    from engine.errors import find_engine_error

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/embeddings/part-0.parquet")
    try:
        try:
            raise full
        except OSError as e:
            raise RuntimeError("a Ray task failed") from e
    except RuntimeError as wrapped:
        found = find_engine_error(wrapped)
    assert isinstance(found, errors.OutputError)
    assert str(found) == "/data/run/embeddings/part-0.parquet: cannot write there: No space left on device"
    assert find_engine_error(OSError(errno.EBADF, "Bad file descriptor")) is None


@pytest.mark.parametrize("job", ["pipeline", "train_encoder"])  # federated: as `dce federate`, above
def test_the_jobs_refuse_a_folder_of_other_files(tmp_path, capsys, job):
    import importlib

    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    main = importlib.import_module(f"jobs.{job}").main
    assert main(["--set", "data.source=blobs", "--set", "data.n_samples=100", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: .*mine is not empty and is not a run directory \(metrics.json, model\).*", err), err
    assert snapshot(out) == before


def test_a_failure_after_resumable_state_keeps_it_and_names_it(tmp_path):
    """A fresh run that fails once it has a checkpoint: the checkpoint stays, anything else it wrote goes, and the
    one error line names what was kept and the command that continues from it."""
    from engine.errors import DataError
    from engine.rundir import Output, guard_output

    run = tmp_path / "run"
    with pytest.raises(DataError) as failed, guard_output(Output(run, fresh=True, created=True)):
        (run / "train").mkdir(parents=True)
        (run / "train" / "checkpoint_000001").mkdir()
        raise DataError("cluster stage: something only the data could tell")
    message = str(failed.value)
    assert message.startswith("cluster stage: something only the data could tell (kept for a resume: train/; ")
    assert f"`dce run --resume {run}`" in message
    assert (run / "train" / "checkpoint_000001").is_dir()
    # Without resumable state nothing is kept and the message is unchanged.
    other = tmp_path / "other"
    with pytest.raises(DataError, match=r"^nothing to keep$"), guard_output(Output(other, fresh=True, created=True)):
        (other / "config.yaml").parent.mkdir(parents=True)
        (other / "config.yaml").write_text("x: 1\n")
        raise DataError("nothing to keep")
    assert not other.exists()
