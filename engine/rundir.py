"""Where a run's stages write: the run directory itself, or a local staging folder published to its object-store URI.

Stage workers (Ray Train's workers, Ray Data tasks and actors, shard actors) read and write on the node they run
on, so a local run directory on a multi-node cluster must be on storage every node mounts (`ray.shared_storage:
true` says so); a plain local path is refused there. An object-store run directory (s3://, gs://, hdfs://, any
pyarrow URI) needs no shared file system, because what a stage's parts share goes through the store or through
Ray's object store, never through a path of the driver:
- what Ray's workers write or read themselves lives in the store: `embeddings/` and `assignments/` (WORKER_FOLDERS,
  written by Ray Data's tasks and actors, read by assignment tasks and shard actors by their URIs) and Ray Train's
  own state, `train/` and `refine/` (`RunDir.train_storage`);
- the model reaches the workers as objects: the embedding and assignment actors get the checkpoint the driver
  loaded through `ray.put`, and refinement's workers its weights;
- everything else is written and read by the driver alone (config.yaml, run.json, centroids.npy, cluster.json,
  metrics.json, model/, refined/, report/, sweep_k/): it is written in a staging folder of the driver's
  (`ray.staging_dir`, default the temp dir) and each completed folder uploaded as soon as its stage ends, its
  manifest last: on a store that cannot rename, a folder without its manifest is incomplete and never read as a
  result. A stage command on a URI downloads these completed entries first; the worker folders are read where
  they are.
`RunDir.folder` says where each stage folder is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from engine import storage
from engine.errors import ConfigError, EngineError, IncompleteResultError, OutputError

if TYPE_CHECKING:
    from engine.config import PipelineConfig

MANIFEST = storage.MANIFEST
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
# Stage folders that Ray's workers write or read by path themselves; an object-store run keeps them in the store.
WORKER_FOLDERS = ("embeddings", "assignments")


def run_dir_for(cfg: Any, out: str | os.PathLike[str] | None) -> Path | str:
    """`out` (a local path or an object-store URI such as s3://bucket/runs/name), else runs/<name>."""
    if out is None:
        return Path("runs") / cfg.name
    return str(out) if storage.is_uri(out) else Path(out)


def save_config(cfg: Any, run_dir: Path) -> None:
    """The run's resolved config, config.yaml (the folder is made)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(run_dir / CONFIG_FILE, cfg.to_yaml())


# ---- reading and recording a run ------------------------------------------------------------------


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The resolved config saved in a run directory, with optional overrides."""
    import yaml

    from engine.config import config_from_dict

    path = storage.join(run_dir, CONFIG_FILE)
    if not storage.is_file(path):
        raise IncompleteResultError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return config_from_dict(yaml.safe_load(storage.read_text(path)) or {}, overrides, source=str(path))


def model_folder(cfg: PipelineConfig) -> tuple[str, str]:
    """The name of the folder of the model the embed stage uses and its stage: refined/ for dec / idec, else model/."""
    return ("refined", "refine") if cfg.model.refines else ("model", "train")


def model_dir_for(cfg: PipelineConfig, run_dir: Path) -> tuple[Path, str]:
    """The folder of the model the embed stage uses (see `model_folder`) and its stage."""
    name, stage = model_folder(cfg)
    return run_dir / name, stage


def record_run(run_dir: Path, **fields: Any) -> None:
    """Merge facts about the run (stage times, resources, versions) into run.json."""
    path = run_dir / RUN_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(record.get(key), dict):
            record[key].update(value)
        else:
            record[key] = value
    storage.write_text(path, json.dumps(record, indent=2, default=str))


def remove_staged_leftovers(run_dir: Path) -> None:
    """Temporary folders of stages a killed run was writing (`staged_folder`): never results, never reused."""
    for path in run_dir.glob(".*.tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def read_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a run directory: what `record_run` merged into it ({} when there is none)."""
    path = run_dir / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_shared(run_dir: str | os.PathLike[str], ray_cfg: Any, nodes: int) -> None:
    """Refuse, on a multi-node cluster, a local run directory that is not declared shared (an object-store one
    needs no shared file system: see the module docstring)."""
    if nodes > 1 and storage.is_local(run_dir) and not ray_cfg.shared_storage:
        raise ConfigError(
            f"run directory {run_dir} (--out, RUN_DIR): a local path, but the Ray cluster has {nodes} nodes and "
            "their workers write the run's outputs where they run; use a shared path (NFS mounted on every node, "
            "with ray.shared_storage=true) or an object store URI (s3://bucket/runs/name, gs://..., hdfs://...)")


class RunDir:
    """A run directory as the stages see it: `local` is where the driver writes, `folder(name)` where a stage
    folder is; `publish()` uploads what the driver completed."""

    def __init__(self, location: str | Path, local: Path):
        self.location = location
        self.local = local
        self.remote = not storage.is_local(location)
        # Ray Train's state (train/, refine/) goes to the store itself, not through `local`: see train_encoder.
        self.train_storage = str(location) if self.remote else None
        self._published: dict[str, Any] = {}

    def folder(self, name: str) -> Path | str:
        """Where the stage folder `name` is: in the store for WORKER_FOLDERS of an object-store run, else in `local`."""
        return storage.join(self.location, name) if self.remote and name in WORKER_FOLDERS else self.local / name

    def fetch(self) -> None:
        """Copy a remote run's top-level files and complete folders (those with a manifest) into `local`, except
        the WORKER_FOLDERS, which are read in the store."""
        names = storage.files(self.location)
        folders = {n.split("/")[0] for n in names if n.endswith("/" + MANIFEST) and n.count("/") == 1}
        folders -= set(WORKER_FOLDERS)
        for name in [n for n in names if "/" not in n] + sorted(folders):
            storage.copy(storage.join(self.location, name), self.local / name)
        self._published = self._state()

    def publish(self) -> None:
        """Upload the top-level files and complete folders changed since the last publish (nothing for local runs)."""
        if not self.remote:
            return
        state = self._state()
        # Folders first: a run.json or metrics.json that mentions a stage is never ahead of the stage's data.
        for name in sorted(state, key=lambda n: not (self.local / n).is_dir()):
            if state[name] != self._published.get(name):
                storage.copy(self.local / name, storage.join(self.location, name))
                self._published[name] = state[name]

    def _state(self) -> dict[str, Any]:
        """What identifies each publishable entry's content: a folder's manifest text, a file's size and mtime."""
        state: dict[str, Any] = {}
        for entry in self.local.iterdir():
            if entry.name.startswith("."):  # temp siblings of files and folders being written
                continue
            if entry.is_file():
                st = entry.stat()
                state[entry.name] = (st.st_size, st.st_mtime_ns)
            elif (entry / MANIFEST).is_file():
                # Folders without a manifest (Ray Train's own state, unfinished stages) stay local.
                state[entry.name] = (entry / MANIFEST).read_text()
        return state


def as_run_dir(run_dir: RunDir | str | os.PathLike[str]) -> RunDir:
    """A RunDir as it is; a local path as the run directory its stages write in place."""
    if isinstance(run_dir, RunDir):
        return run_dir
    if not storage.is_local(run_dir):
        raise ConfigError(f"{run_dir}: an object-store run directory is staged; open it with "
                          "engine.rundir.open_run_dir and give its RunDir to the stage")
    return RunDir(run_dir, Path(storage.resolve(run_dir)[1]) if storage.is_uri(run_dir) else Path(run_dir))


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, ray_cfg: Any, *, nodes: int, fetch: bool = False) -> Iterator[RunDir]:
    """The run directory for this process's stages, checked for a multi-node cluster of `nodes` alive nodes
    (1 where only this process writes).

    A local path is used as it is. A URI gets a staging folder (filled with the run's completed outputs when
    `fetch`, for a stage that reads earlier ones); what the stages complete is published when the block ends
    without error (and whenever the caller calls `publish()`), and the staging folder is removed.
    """
    check_shared(run_dir, ray_cfg, nodes)
    if storage.is_local(run_dir):
        yield as_run_dir(run_dir)
        return
    parent = Path(ray_cfg.staging_dir or tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    local = parent / f"dce-staging-{uuid.uuid4().hex[:12]}"
    local.mkdir()
    run = RunDir(run_dir, local)
    try:
        if fetch:
            run.fetch()
        yield run
        run.publish()
    finally:
        shutil.rmtree(local, ignore_errors=True)


# ---- the output-path policy ----------------------------------------------------------------------------------
#
# The same for every command that writes (run, train, cluster and sweep-k of Parquet embeddings, federate, assign,
# prepare, and the jobs), checked before Ray starts:
# - a new directory is created fresh; an existing empty one is used;
# - an existing run of the same config continues only with --resume;
# - any other non-empty directory is refused, naming it; --overwrite replaces only the engine's own results in it
#   (folders with a manifest; a run's own files), and never a file of anything else;
# - an output inside an input (or equal to it) is refused;
# - a path the file system refuses (a file, no permission, read-only, full) is refused, naming the path and cause.

# What a run writes at its top level, besides its stage folders.
RUN_FILES = (CONFIG_FILE, RUN_FILE, "centroids.npy", "cluster.json", "metrics.json")
# The stage folders of a run (each with a manifest when complete) and its resumable state (Ray Train's checkpoints,
# k-means' partial state, TensorBoard's logs), which has none.
STAGE_FOLDERS = ("model", "refined", "embeddings", "assignments", "report", "sweep_k", "federated")
STATE_FOLDERS = ("train", "refine", "cluster", "tensorboard")
# Less free space than this on an output's file system is refused up front: nothing useful fits in it.
MIN_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class Output:
    """A checked output location; `fresh` when nothing was in it, so that a failed command may remove what it
    wrote (`discard_on_failure`), `created` when the folder itself did not exist."""

    location: Path | str
    fresh: bool
    created: bool


def run_config_hash(location: str | os.PathLike[str]) -> str | None:
    """The config hash of the run in `location` (its config.yaml is an engine's resolved config; "unknown" when it
    no longer validates), else None."""
    import yaml

    from engine.config import config_from_dict

    path = storage.join(location, CONFIG_FILE)
    try:
        if not storage.is_file(path):
            return None
        raw = yaml.safe_load(storage.read_text(path))
    except (OSError, yaml.YAMLError):
        return None
    # A user's own config.yaml is not a run's: the engine writes every section of its resolved config.
    if not isinstance(raw, dict) or not {"name", "data", "model", "cluster"} <= raw.keys():
        return None
    try:
        return config_from_dict(raw, source=str(path)).hash()
    except EngineError:  # a run's config that no longer validates here (another version, a missing extra)
        return "unknown"


def check_run_output(location: str | os.PathLike[str], *, config_hash: str, resume: bool = False,
                     overwrite: bool = False, inputs: Iterable[str | os.PathLike[str]] = (),
                     resume_command: str | None = "dce run") -> Output:
    """Check a run directory to write (see the policy above) before anything starts; with `overwrite`, remove the
    engine's own results found there. `resume_command` is what continues a run of the same config (None: nothing
    does, --overwrite is the only way)."""
    _check_not_inside(location, inputs)
    entries = _entries(location)
    saved = run_config_hash(location) if entries else None
    if resume:
        if saved is None:
            raise OutputError(f"{location}: not a run directory (no engine {CONFIG_FILE}), nothing to resume")
        _check_writable(location)
        return Output(location, fresh=False, created=False)
    if not entries:
        _check_writable(location)
        return Output(location, fresh=True, created=entries is None)
    if not overwrite:
        if saved == config_hash:
            again = f"continue it with `{resume_command} --resume {location}`, or " if resume_command else ""
            raise OutputError(f"{location} holds a run of this config already; {again}replace its results with "
                              f"--overwrite, or choose a new --out")
        if saved is not None:
            raise OutputError(f"{location} holds a run of another config (config hash {saved}, this one "
                              f"{config_hash}); choose a new --out, or replace its results with --overwrite")
        raise OutputError(f"{location} is not empty and is not a run directory ({_some(entries)}); choose a new "
                          f"--out or an empty folder: the engine never writes over other files")
    _check_writable(location)
    names = RUN_FILES + STAGE_FOLDERS + STATE_FOLDERS
    ours = [n for n in entries if n in names and _is_ours(location, n, entries[n], run=saved is not None)]
    theirs = [n for n in entries if n in names and n not in ours]
    if theirs:
        why = f"no {MANIFEST}, or files beside it" if entries[theirs[0]] else "not in a run directory"
        path = storage.join(location, theirs[0])
        raise OutputError(f"--overwrite replaces only the engine's own results, and {path} is not one ({why}); move it "
                          f"away or choose a new --out")
    leftovers = [n for n in entries
                 if saved is not None and n.startswith(".") and (".tmp-" in n or n.endswith(".partial"))]
    for name in ours + leftovers:
        storage.delete(storage.join(location, name))
    return Output(location, fresh=False, created=False)


def check_output(cfg: Any, location: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False,
                 pretrained: str | os.PathLike[str] | None = None, resume_command: str | None = "dce run") -> Output:
    """`check_run_output` for the run directory of a config: its data (`data.path`) and `pretrained` are inputs."""
    inputs = [*input_paths(cfg.data), *([pretrained] if pretrained else [])]
    return check_run_output(location, config_hash=cfg.hash(), resume=resume, overwrite=overwrite, inputs=inputs,
                            resume_command=resume_command)


def input_paths(data_cfg: Any) -> list[str]:
    """The files or folders a `data:` section reads (none for the built-in sets)."""
    paths = [getattr(data_cfg, "path", None), getattr(data_cfg, "labels_path", None),
             *(getattr(data_cfg, "images", None) or []),
             *(getattr(data_cfg, "labels", None) or [])]
    return [str(p) for p in paths if p]


def check_folder_output(location: str | os.PathLike[str], *, overwrite: bool = False,
                        inputs: Iterable[str | os.PathLike[str]] = ()) -> Output:
    """Check a result folder to write whole (`dce assign --out`, `dce prepare --out`) before anything starts: new
    or empty, or with --overwrite a complete result of the engine (with its manifest), which the new one replaces
    when it is complete."""
    _check_not_inside(location, inputs)
    entries = _entries(location)
    if entries is None or not entries:
        _check_writable(location)
        return Output(location, fresh=True, created=entries is None)
    ours = _is_result(location)
    if not ours or not overwrite:
        what = "a result of the engine; replace it with --overwrite" if ours else (
            f"not a result of the engine alone ({_some(entries)})")
        raise OutputError(f"{location} is not empty: {what}; or choose a new --out")
    _check_writable(location)
    return Output(location, fresh=False, created=False)


def check_run_writable(location: str | os.PathLike[str]) -> None:
    """A stage command's run directory (it updates that run's results): one the file system lets us write."""
    _check_writable(location)


@contextlib.contextmanager
def guard_output(output: Output, *, resumable: bool = True) -> Iterator[None]:
    """What a failed or interrupted command leaves in its output. A failure removes what it wrote into a fresh
    output, except, for a run that `dce run --resume` continues (`resumable`), its resumable state (a checkpoint,
    a complete stage, completed shards). An interruption keeps everything, and for a resumable run becomes an
    Interrupted naming the run to resume."""
    from engine import interrupt

    try:
        yield
    except BaseException as e:
        stopped = interrupt.as_interruption(e)
        if stopped is not None:
            local = storage.is_local(output.location)
            started = not local or (Path(storage.resolve(output.location)[1]) / CONFIG_FILE).is_file()
            if resumable and started and stopped.run_dir is None:
                stopped.run_dir = str(output.location)
            raise stopped from None
        if output.fresh and storage.is_local(output.location) and isinstance(e, Exception):
            folder = Path(storage.resolve(output.location)[1])
            _discard(folder, remove_folder=output.created, keep_state=resumable)
            kept = resumable and has_resumable_state(folder)
            if kept and isinstance(e, EngineError) and len(e.args) == 1 and isinstance(e.args[0], str):
                # The one error line also says what was kept and how to continue from it.
                e.args = (f"{e.args[0]} (kept for a resume: {', '.join(resumable_state(folder))}; continue with "
                          f"`dce run --resume {output.location}`)",)
        raise


def resumable_state(run_dir: Path) -> list[str]:
    """What in a run directory --resume continues from: complete stage folders, stages' checkpoints, partial
    folders of completed shards (names, sorted)."""
    if not run_dir.is_dir():
        return []
    return sorted([f"{n}/" for n in STAGE_FOLDERS if (run_dir / n / MANIFEST).is_file()]
                  + [f"{n}/" for n in STATE_FOLDERS if (run_dir / n).is_dir()]
                  + [p.name for p in run_dir.glob(".*.partial")])


def has_resumable_state(run_dir: Path) -> bool:
    """Anything in a run directory that --resume continues from (`resumable_state`)."""
    return bool(resumable_state(run_dir))


def _discard(folder: Path, *, remove_folder: bool, keep_state: bool) -> None:
    if not folder.is_dir() or (keep_state and has_resumable_state(folder)):
        return
    if remove_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for entry in folder.iterdir():
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _entries(location: str | os.PathLike[str]) -> dict[str, bool] | None:
    """The top-level entries of a folder (name -> is a folder); None when it does not exist. A file, or a path
    through one, is an OutputError."""
    if not storage.is_local(location):
        if storage.is_file(location):
            raise OutputError(f"{location}: is a file, not a folder")
        names = storage.files(location)
        if not names:
            return None
        return {n.split("/")[0]: "/" in n for n in names}
    path = Path(storage.resolve(location)[1])
    try:
        with os.scandir(path) as it:
            return {e.name: e.is_dir() for e in it}
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        file = next(p for p in (path, *path.parents) if p.is_file())
        raise OutputError(f"{location}: is a file, not a folder" if file == path else
                          f"{location}: cannot be a folder, {file} is a file") from None
    except OSError as e:
        raise _os_error(location, e) from None


def _is_ours(location: str | os.PathLike[str], name: str, is_dir: bool, *, run: bool) -> bool:
    """Whether an entry is the engine's to replace: a folder with a manifest, or in a run, its own files and state."""
    if is_dir and _is_result(storage.join(location, name)):
        return True
    return run and (name in STATE_FOLDERS if is_dir else name in RUN_FILES)


def _is_result(folder: str | os.PathLike[str]) -> bool:
    """A complete result folder of the engine and nothing else (on an object store: one with its manifest)."""
    from engine.data.folders import is_result_folder

    if not storage.is_local(folder):
        return storage.is_file(storage.join(folder, MANIFEST))
    return is_result_folder(Path(storage.resolve(folder)[1]))


def _some(entries: dict[str, bool], n: int = 3) -> str:
    names = sorted(entries)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_not_inside(location: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output equal to an input or inside it: local paths resolved, URIs compared as written (bucket and
    key, without their ?options), before anything touches the store."""
    out = _where(location)
    for given in inputs:
        if not given:
            continue
        source = _where(given)
        if out[0] == source[0] and (out[1] == source[1] or source[1] in out[1].parents):
            raise OutputError(f"--out {location} is {'the input' if out[1] == source[1] else 'inside the input'} "
                              f"{given}: writing there would change the input's own files; choose a folder outside it")


def _where(path: str | os.PathLike[str]) -> tuple[str, PurePosixPath]:
    """(scheme, path) of a local path (resolved; a glob stands for the folder it lists) or of a URI."""
    text = str(path)
    if storage.is_uri(text):
        scheme, _, rest = text.partition("://")
        return scheme, PurePosixPath("/" + rest.partition("?")[0].strip("/"))
    wild = [text.index(c) for c in "*?[" if c in text]
    if wild:
        text = os.path.dirname(text[:min(wild)]) or "."
    return "file", PurePosixPath(Path(text).resolve())


def _check_writable(location: str | os.PathLike[str]) -> None:
    """That the folder can be made (or written in) and its file system has room, by making and removing an empty
    folder in the nearest folder that exists: nothing is left behind."""
    if not storage.is_local(location):
        return
    path = Path(storage.resolve(location)[1])
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{location}: cannot be a folder, {existing} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=".dce-probe-", dir=existing)
        os.rmdir(probe)
        st = os.statvfs(existing)
    except OSError as e:
        raise _os_error(location, e, existing) from None
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        raise _os_error(location, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), existing)


def _os_error(location: str | os.PathLike[str], e: OSError, where: Path | None = None) -> OutputError:
    at = f" (in {where})" if where is not None and str(where) != str(Path(location)) else ""
    return OutputError(f"{location}: cannot write there: {e.strerror or e}{at}")
