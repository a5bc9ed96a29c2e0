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
from engine.rundir import Output, check_folder_output


def check_result_output(out: str | os.PathLike[str], source: str, *, overwrite: bool) -> Output:
    """The output policy of `dce assign --out` (new or empty; with --overwrite a complete result of the engine;
    never inside the input)."""
    return check_folder_output(out, overwrite=overwrite, inputs=[source])


def state_folder(out: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """Where an unfinished run keeps what it completed, reused by a rerun of the same input and settings: the
    hidden sibling `.NAME.partial` of a local --out (the engine's resumable-folder convention), a temp folder
    named after an object-store --out."""
    if storage.is_local(out):
        return partial_folder(Path(storage.resolve(out)[1]) if storage.is_uri(out) else Path(out), key)
    digest = hashlib.blake2b(str(out).encode(), digest_size=8).hexdigest()
    return partial_folder(Path(tempfile.gettempdir()) / f"dce-curate-{digest}" / "result", key)


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
