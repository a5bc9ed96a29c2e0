"""A curation result folder: checked before Ray starts, written whole by rename with a manifest per folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine import storage
from engine.data.folders import partial_folder, staged_folder, write_manifest
from engine.errors import ConfigError
from engine.rundir import Output, check_folder_output


def check_result_output(out: str | os.PathLike[str], source: str, *, overwrite: bool) -> Output:
    """The output policy of `dce assign --out` (new or empty; with --overwrite a complete result of the engine;
    never inside the input)."""
    return check_folder_output(out, overwrite=overwrite, inputs=[source])


def state_folder(out: str | os.PathLike[str], key: dict[str, Any], root: str | os.PathLike[str] | None = None) -> Path:
    """Where an unfinished run keeps what it completed, reused by a rerun of the same input and settings: the
    hidden sibling `.NAME.partial` of a local --out (the engine's resumable-folder convention), else a folder
    named after --out in `root` (a local folder: --state-dir), or in the temp folder for an object-store --out."""
    return partial_folder(_state_base(out, root), key)


def state_folder_exists(out: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> bool:
    """Whether `state_folder` would find a folder of an earlier run (of any settings)."""
    base = _state_base(out, root)
    return (base.parent / f".{base.name}.partial").exists()


def check_state_dir(root: str | os.PathLike[str] | None, out: str | os.PathLike[str], source: str) -> None:
    """--state-dir: a local folder, neither inside --out nor inside the input (the run writes and removes there)."""
    if root is None:
        return
    if storage.is_uri(root) and not str(root).startswith("file:"):  # syntax only: no request to the store
        raise ConfigError(f"--state-dir={root}: should be a local folder (or a mount every node sees), not an "
                          "object store")
    path = _local_path(root).resolve()
    for name, other in (("--out", out), ("the input", source)):
        if storage.is_local(other) and path.is_relative_to(_local_path(other).resolve()):
            raise ConfigError(f"--state-dir={root}: should not be inside {name}, {other}")


def _state_base(out: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> Path:
    if root is None and storage.is_local(out):
        return _local_path(out)
    digest = hashlib.blake2b(str(out).encode(), digest_size=8).hexdigest()
    base = Path(tempfile.gettempdir()) if root is None else _local_path(root)
    return base / f"dce-curate-{digest}" / "result"


def _local_path(path: str | os.PathLike[str]) -> Path:
    """A local path or file:// URI as a path."""
    return Path(storage.resolve(path)[1]) if storage.is_uri(path) else Path(path)


def drop_state(state: Path) -> None:
    """Remove a finished (or refused) run's state folder, and the folder it made for it when left empty."""
    shutil.rmtree(state, ignore_errors=True)
    if state.parent.name.startswith("dce-curate-"):
        try:
            state.parent.rmdir()
        except OSError:  # not empty: another run's state
            pass


def subfolder(tmp: Path, name: str, files: list[Path], *, stage: str, config_hash: str, rows: int,
              **extra: Any) -> None:
    """`tmp/name/` holding `files` (moved) and its manifest."""
    import pyarrow.parquet as pq

    folder = tmp / name
    folder.mkdir()
    names = []
    for i, f in enumerate(files):
        names.append(f"{name}-{i:05d}.parquet")
        shutil.move(str(f), folder / names[-1])
    schema = str(pq.read_schema(folder / names[0])) if names else None
    write_manifest(folder, stage=stage, config_hash=config_hash, rows=rows, schema=schema, files=names, **extra)


def write_result(out: str | os.PathLike[str], build, *, stage: str, config_hash: str, rows: int,
                 **extra: Any) -> dict[str, Any]:
    """Write the result folder `out` whole: `build(tmp)` fills a staging folder and returns the names it made;
    a top-level manifest lists them, so `--overwrite` may later replace the folder and nothing else."""
    with staged_folder(out) as tmp:
        names = build(tmp)
        return write_manifest(tmp, stage=stage, config_hash=config_hash, rows=rows, files=sorted(names), **extra)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=float))
