"""Atomic result folders: written to a temporary sibling, checked, given a `_manifest.json`, renamed into place.

On an object store (a pyarrow URI such as s3://...), which cannot rename a folder, the manifest written last is the
commit: the old manifest is removed first, the files are written in place, and a folder without its manifest is
never read as a result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine import storage
from engine.data.schema import ID
from engine.errors import DataError, IncompleteResultError, OutputError

MANIFEST = storage.MANIFEST


def engine_version() -> str:
    from engine.version import __version__

    return __version__


@contextlib.contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir`; on success it replaces `out_dir`, on error it is removed.

    `out_dir` never holds a half-written result: either the old complete folder or the new one. On an object store
    the folder is written locally and uploaded on success, its manifest last.
    """
    if not storage.is_local(out_dir):
        with tempfile.TemporaryDirectory(prefix="dce-stage-") as tmp:
            yield Path(tmp)
            if not (Path(tmp) / MANIFEST).is_file():
                raise RuntimeError(f"{out_dir}: staged folder finished without a {MANIFEST}")
            storage.copy(tmp, out_dir)
        return
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(folder: Path, out: Path) -> None:
    """Rename a finished folder (it must hold its manifest) to `out`, replacing what was there only when that is
    the engine's own (`replaceable`); anything else at `out` is an OutputError and stays as it is."""
    if not (folder / MANIFEST).is_file():
        raise RuntimeError(f"{folder}: staged folder finished without a {MANIFEST}")
    old = None
    if out.exists() or out.is_symlink():
        if not replaceable(out):
            raise OutputError(f"{out}: exists and is not a result of the engine (no {MANIFEST}); it is left as it "
                              f"is: move it away, or write elsewhere")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(folder, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous complete result back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def replaceable(out: Path) -> bool:
    """Whether a stage may replace the folder `out`: a complete result and nothing else (`is_result_folder`), an
    empty folder, or what an interrupted write of a result leaves (Parquet shards and hidden temp files, no
    manifest). Never a file, a link, or a folder with anything else in it."""
    if out.is_symlink() or not out.is_dir():
        return False
    if (out / MANIFEST).is_file():
        return is_result_folder(out)
    return all(p.is_file() and (p.suffix == ".parquet" or p.name.startswith(".")) for p in out.iterdir())


def is_result_folder(folder: Path) -> bool:
    """A complete result of the engine and nothing else: its manifest and the files that lists (and hidden temp
    files); a file of the user's put beside them makes it not the engine's to replace."""
    try:
        listed = {MANIFEST, *(json.loads((folder / MANIFEST).read_text()).get("files") or [])}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return all(p.name in listed or p.name.startswith(".") for p in folder.iterdir())


# ---- resumable folders: shards kept across crashes, each with its completion record -----------------

PARTIAL = "_partial.json"
DONE = "_done"


def partial_folder(out_dir: str | Path, key: dict[str, Any]) -> Path:
    """`.NAME.partial`, the sibling of `out_dir` where a resumable stage writes its shards one by one.

    It survives a crash; a rerun with the same `key` (what the shards depend on: config hash, model...)
    reuses its completed shards, any other key empties it first.
    """
    out = Path(out_dir)
    folder = out.parent / f".{out.name}.partial"
    record = folder / PARTIAL
    key = json.loads(json.dumps(key))  # as it reads back
    if folder.exists():
        try:
            same = json.loads(record.read_text()) == key
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            return folder
        shutil.rmtree(folder)
    (folder / DONE).mkdir(parents=True)
    _write_json(record, key)
    return folder


def write_shard(table: pa.Table, folder: str | Path, *, prefix: str) -> dict[str, Any]:
    """Write one shard of a partial folder: the Parquet file by rename, then its completion record.

    The name comes from the shard's ids, so a retried block (its actor died) overwrites its own shard
    instead of adding a second copy of its rows.
    """
    folder = Path(folder)
    ids = np.ascontiguousarray(table.column(ID).to_numpy())
    name = f"{prefix}-{hashlib.blake2b(ids.tobytes(), digest_size=8).hexdigest()}.parquet"
    with storage.atomic_path(folder / name) as tmp:
        pq.write_table(table, tmp)
    record = {"file": name, "rows": table.num_rows}
    _write_json(folder / DONE / f"{name}.json", record)
    return record


def completed_shards(folder: str | Path) -> list[dict[str, Any]]:
    """The completion records of a partial folder's shards, by file name; files without one (half-written,
    or written just before a crash) are deleted, to be written again."""
    folder = Path(folder)
    records = {}
    for path in (folder / DONE).glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # a record is written by rename, so this is not ours
        if (folder / record["file"]).is_file():
            records[record["file"]] = record
    for path in folder.iterdir():
        if path.is_file() and path.name != PARTIAL and path.name not in records:
            path.unlink()
    return [records[name] for name in sorted(records)]


def completed_ids(folder: str | Path) -> np.ndarray:
    """The ids in a partial folder's completed shards."""
    paths = [Path(folder) / r["file"] for r in completed_shards(folder)]
    if not paths:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([pq.read_table(p, columns=[ID]).column(ID).to_numpy() for p in paths])


def commit_partial(folder: str | Path, out_dir: str | Path, *, stage: str, config_hash: str,
                   expected_rows: int | None = None, **extra: Any) -> dict[str, Any]:
    """Turn a partial folder whose shards are all written into `out_dir`, with its manifest.

    A row count other than `expected_rows` is a DataError, and the partial folder is discarded.
    """
    folder, out = Path(folder), Path(out_dir)
    records = completed_shards(folder)
    rows = sum(r["rows"] for r in records)
    if expected_rows is not None and rows != expected_rows:
        shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{out}: wrote {rows} rows but the input has {expected_rows}")
    files = [r["file"] for r in records]
    schema = str(pq.read_schema(folder / files[0])) if files else None
    shutil.rmtree(folder / DONE)
    (folder / PARTIAL).unlink()
    manifest = write_manifest(folder, stage=stage, config_hash=config_hash, rows=rows, schema=schema, files=files,
                              **extra)
    _move_into_place(folder, out)
    return manifest


def _write_json(path: Path, value: Any) -> None:
    storage.write_text(path, json.dumps(value))


def write_manifest(folder: str | Path, *, stage: str, config_hash: str, rows: int | None = None,
                   schema: str | None = None, files: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "rows": rows,
        "schema": schema,
        "files": files,
        "config_hash": config_hash,
        "engine_version": engine_version(),
        "time": time.time(),
        **extra,
    }
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def read_manifest(folder: str | Path, *, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a complete folder (a local path or a URI); a folder without one is incomplete and raises."""
    path = storage.join(folder, MANIFEST)
    if not storage.is_file(path):
        raise IncompleteResultError(
            f"{folder}: no {MANIFEST}; this folder is missing or was never completed, so it is not a result"
        )
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise IncompleteResultError(f"{path}: unreadable manifest ({e})") from None
    if stage is not None and manifest.get("stage") != stage:
        raise IncompleteResultError(f"{folder}: holds stage '{manifest.get('stage')}', expected '{stage}'")
    return manifest


def write_dataset(ds, out_dir: str | Path, *, stage: str, config_hash: str, expected_rows: int | None = None,
                  **extra: Any) -> dict[str, Any]:
    """Write a Ray Dataset as Parquet shards into `out_dir`, atomically, with a manifest.

    When `expected_rows` is given the written row count must equal it: a stage never loses or duplicates
    rows silently. To an object store URI, Ray Data's write tasks write the shards in place from whichever node
    they run on, and the manifest commits the folder.
    """
    if not storage.is_local(out_dir):
        return _write_dataset_to_store(ds, str(out_dir), stage=stage, config_hash=config_hash,
                                       expected_rows=expected_rows, **extra)
    with staged_folder(out_dir) as tmp:
        ds.write_parquet(str(tmp))
        files = sorted(p.name for p in tmp.glob("*.parquet"))
        rows = sum(pq.ParquetFile(tmp / f).metadata.num_rows for f in files)
        if expected_rows is not None and rows != expected_rows:
            raise DataError(f"{out_dir}: wrote {rows} rows but the input has {expected_rows}")
        schema = str(pq.read_schema(tmp / files[0])) if files else None
        manifest = write_manifest(tmp, stage=stage, config_hash=config_hash, rows=rows, schema=schema,
                                  files=files, **extra)
    return manifest


def _write_dataset_to_store(ds, out_dir: str, *, stage: str, config_hash: str, expected_rows: int | None,
                            **extra: Any) -> dict[str, Any]:
    storage.delete(storage.join(out_dir, MANIFEST))  # the old result stops being one before any file changes
    storage.delete(out_dir)
    fs, path = storage.resolve(out_dir)
    try:
        ds.write_parquet(path, filesystem=fs)
        files = [f for f in storage.files(out_dir) if f.endswith(".parquet") and "/" not in f]
        rows = sum(pq.ParquetFile(f"{path}/{f}", filesystem=fs).metadata.num_rows for f in files)
        if expected_rows is not None and rows != expected_rows:
            raise DataError(f"{out_dir}: wrote {rows} rows but the input has {expected_rows}")
        schema = str(pq.read_schema(f"{path}/{files[0]}", filesystem=fs)) if files else None
        manifest = write_manifest(out_dir, stage=stage, config_hash=config_hash, rows=rows, schema=schema,
                                  files=files, **extra)
    except BaseException:
        storage.delete(out_dir)
        raise
    return manifest


def shard_paths(folder: str | Path, *, stage: str | None = None) -> list[str]:
    """The Parquet files of a complete folder, as listed in its manifest (URIs for a folder on an object store)."""
    manifest = read_manifest(folder, stage=stage)
    if storage.is_uri(folder):
        return [storage.join(folder, f) for f in manifest.get("files") or []]
    return [str(Path(folder) / f) for f in manifest.get("files") or []]


def read_shards(folder: str | Path, *, stage: str | None = None, columns: list[str] | None = None):
    """A complete folder's shards as a Ray Dataset (only the files its manifest lists), one task per file.

    The manifest already names every file, so there is nothing to list: `ray.data.read_parquet` (Ray 2.60's
    datasource V2) spends 10 s or more per call listing files on a small machine, and a folder reader would also
    pick up stray files.
    """
    import ray.data

    paths = shard_paths(folder, stage=stage)
    if not paths:
        raise DataError(f"{folder}: the manifest lists no shards")

    def read(batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path in batch["path"]:
            yield pq.read_table(str(path), columns=columns)

    items = [{"path": p} for p in paths]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read, batch_size=1, batch_format="numpy"
    )


def read_table(folder: str | Path, *, stage: str | None = None, columns: list[str] | None = None):
    """A complete folder's shards as one pyarrow Table in this process (for small columns such as ids)."""
    paths = shard_paths(folder, stage=stage)
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in paths]) if paths else None
