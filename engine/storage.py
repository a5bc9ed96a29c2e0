"""Files on a local path or behind any pyarrow FileSystem URI (s3://, gs://, hdfs://, ...): resolve, read, write, copy.

A URI carries its own options in pyarrow's form, e.g. `s3://bucket/runs/x?endpoint_override=host:9000&scheme=http`
for an S3-compatible store; credentials come from the usual places (environment, instance profile). Writes of
one file are atomic on both sides (temp file + rename locally, one PUT on an object store); a folder copy
writes its `_manifest.json` last, so the manifest commits the folder on stores that cannot rename.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs

from engine.errors import ConfigError

MANIFEST = "_manifest.json"
_CHUNK = 8 << 20


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The filesystem of `path` and the path inside it (absolute for local paths)."""
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(str(path))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a path or a URI that pyarrow.fs can open ({e})") from None
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def is_local(path: str | os.PathLike[str]) -> bool:
    """True for plain paths and file:// URIs: storage only this machine sees unless it is a shared mount."""
    return not is_uri(path) or isinstance(resolve(path)[0], pafs.LocalFileSystem)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base/part/...`; a URI keeps its `?options` at the end."""
    base = str(base)
    head, sep, query = base.partition("?") if is_uri(base) else (base, "", "")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


def exists(path: str | os.PathLike[str]) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike[str]) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def size_and_mtime(path: str | os.PathLike[str]) -> tuple[int, int]:
    """A file's size in bytes and its modification time in nanoseconds (what tells a changed file)."""
    fs, p = resolve(path)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such file")
    return int(info.size), int(info.mtime_ns or 0)


def open_input(path: str | os.PathLike[str]) -> IO[bytes]:
    fs, p = resolve(path)
    return fs.open_input_stream(p)


def open_output(path: str | os.PathLike[str]) -> IO[bytes]:
    """A stream to write `path` (its parent folders are made); on an object store the object appears on close."""
    fs, p = resolve(path)
    fs.create_dir(p.rpartition("/")[0], recursive=True)
    return fs.open_output_stream(p)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open_input(path) as f:
        return f.read()


def read_text(path: str | os.PathLike[str]) -> str:
    return read_bytes(path).decode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary local path beside `path` for the caller to write; it replaces `path` by rename when the block
    ends, and is removed when the block fails. Readers of `path` see the old file or the new one, never a part:
    every file the engine writes on its own goes through here. The temporary name is hidden and has no suffix of
    its own (`.NAME.tmp-XXXXXXXX`), so no reader listing `*.json` or `*.parquet` ever takes it for a file; writers
    that add a suffix to a name (np.save) are given a file object instead (`write_npy`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file atomically: readers see the old content or the new one, never a part."""
    if not is_uri(path):
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return
    with open_output(path) as f:  # one PUT: an object store shows the whole object or none
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def write_npy(path: str | os.PathLike[str], array: object) -> None:
    """`np.save` of `array` to `path`, atomically (see `atomic_path`)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def files(path: str | os.PathLike[str]) -> list[str]:
    """The files under folder `path`, recursively, relative to it with '/' separators; [] when it is missing."""
    fs, root = resolve(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def delete(path: str | os.PathLike[str]) -> None:
    """Remove a file or a folder with everything in it; nothing happens when it is missing."""
    fs, p = resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a file, or a folder's files, from `src` to `dst` (either local or a URI).

    A folder is committed the way readers check it: `dst`'s old manifest is removed first, then its old files,
    the new files are copied and the new manifest last, so `dst` never shows a manifest over partial files.
    """
    sfs, sp = resolve(src)
    if sfs.get_file_info(sp).type == pafs.FileType.File:
        _copy_file(sfs, sp, dst)
        return
    names = files(src)
    if MANIFEST in names:
        delete(join(dst, MANIFEST))
        names = [n for n in names if n != MANIFEST] + [MANIFEST]
    delete(dst)
    for name in names:
        _copy_file(sfs, f"{sp}/{name}", join(dst, name))


def _copy_file(sfs: pafs.FileSystem, sp: str, dst: str | os.PathLike[str]) -> None:
    with sfs.open_input_stream(sp) as f, open_output(dst) as out:
        while chunk := f.read(_CHUNK):
            out.write(chunk)
