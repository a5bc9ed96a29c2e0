"""Input sources, the shard schema, describe() and atomic result folders, on a real local Ray where needed."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import config_from_dict
from engine.data.describe import describe, normalisation
from engine.data.folders import (
    MANIFEST,
    read_manifest,
    read_shards,
    read_table,
    staged_folder,
    write_dataset,
    write_manifest,
)
from engine.data.schema import check_finite, vector_array, vectors_to_numpy
from engine.data.sources import open_source, read_dataset, read_shard
from engine.errors import ConfigError, DataError, IncompleteResultError, find_engine_error

MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


# ---- helpers ---------------------------------------------------------------------------------------


def data_cfg(**data):
    return config_from_dict({"data": data}).data


def input_schema(dim: int, labels: bool = True) -> pa.Schema:
    fields = [pa.field("id", pa.int64()), pa.field("x", pa.list_(pa.float32(), dim))]
    if labels:
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields)


def collect(source) -> pa.Table:
    """Every row of the source read through Ray Data, sorted by id."""
    import ray

    table = pa.concat_tables(ray.get(read_dataset(source).to_arrow_refs()))
    return table.sort_by("id")


def read_all_shards(source) -> pa.Table:
    """The same rows read in this process, shard by shard (no Ray)."""
    return pa.concat_tables([read_shard(source.config, spec) for spec in source.specs])


def x_of(table: pa.Table) -> np.ndarray:
    return vectors_to_numpy(table.column("x"))


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """An idx file as MNIST ships them: magic 0x00000803 (uint8, 3-D) or 0x00000801 (uint8, 1-D), then the
    dimensions as big-endian uint32, then the bytes."""
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)
    return path


def fsl(m: np.ndarray, value_type: pa.DataType | None = None) -> pa.Array:
    m = np.asarray(m)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1), value_type or pa.float32()), m.shape[1])


def lists(m: np.ndarray, list_type: pa.DataType | None = None) -> pa.Array:
    return pa.array([list(row) for row in np.asarray(m).tolist()], list_type or pa.list_(pa.float64()))


def first_line(err: BaseException) -> str:
    return str(err).splitlines()[0]


def write_parquet(path: Path, row_group_size: int | None = None, **columns) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# ---- sources: the input schema and the right rows ----------------------------------------------------


def test_digits_source_reads_every_row_once_in_several_shards(ray_local):
    from sklearn.datasets import load_digits

    src = open_source(data_cfg(source="digits", rows_per_shard=500))
    assert len(src.specs) == 4 and src.dim == 64 and src.n_rows == 1797 and src.image_shape == (8, 8)
    t = collect(src)
    assert t.schema.equals(input_schema(64))
    assert t.num_rows == 1797
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(1797))
    ref = load_digits()
    np.testing.assert_array_equal(x_of(t), ref.data.astype(np.float32))
    np.testing.assert_array_equal(t.column("label").to_numpy(), ref.target)
    assert set(t.column("label").to_numpy()) == set(range(10))


def test_blobs_source_through_ray_matches_the_shards(ray_local):
    src = open_source(data_cfg(source="blobs", n_samples=2500, n_features=5, centers=4, rows_per_shard=700))
    assert len(src.specs) == 4
    t = collect(src)
    assert t.schema.equals(input_schema(5))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(2500))
    assert t.equals(read_all_shards(src))


def test_blobs_guarantees():
    """What a blobs config guarantees: the data is a function of (seed, n_samples, n_features, centers,
    cluster_std, center_box) only. The same config gives the same data, a different seed different data, and
    rows_per_shard (a throughput knob the pipeline may choose per cluster) changes nothing."""
    base = dict(source="blobs", n_samples=2500, n_features=6, centers=5, cluster_std=0.5, seed=3)
    ref = read_all_shards(open_source(data_cfg(**base, rows_per_shard=2500)))
    assert ref.num_rows == 2500 and ref.schema.equals(input_schema(6))
    assert read_all_shards(open_source(data_cfg(**base, rows_per_shard=2500))).equals(ref)
    for rows_per_shard in (7, 1000, 1024, 1025):
        assert read_all_shards(open_source(data_cfg(**base, rows_per_shard=rows_per_shard))).equals(ref)

    labels = ref.column("label").to_numpy()
    assert labels.min() >= 0 and labels.max() < 5 and len(np.unique(labels)) == 5
    # Labels are the generating centre: every point lies nearest to its own centre (std 0.5, box +-10).
    from engine.data.sources import blob_centers

    centers = blob_centers(data_cfg(**base))
    x = x_of(ref)
    nearest = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.99

    other = read_all_shards(open_source(data_cfg(**{**base, "seed": 4})))
    assert not np.allclose(x_of(other), x)
    assert not np.array_equal(other.column("label").to_numpy(), labels)


def test_parquet_folder_of_two_files_with_different_vector_types(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    folder = tmp_path / "in"
    folder.mkdir()
    # a: fixed_size_list<float32>; b: list<double> in row groups of 3 (so 3 shards); custom column names
    write_parquet(folder / "a.parquet", emb=fsl(xa), key=pa.array(np.arange(100, 105)),
                  y=pa.array([0, 1, 2, 0, 1], pa.int32()))
    write_parquet(folder / "b.parquet", row_group_size=3, emb=lists(xb), key=pa.array(np.arange(200, 207)),
                  y=pa.array([2, 2, 1, 1, 0, 0, 2], pa.int64()))
    # Hidden and underscore entries (staging folders, Spark's _temporary) are not part of the data.
    (folder / "_temporary").mkdir()
    write_parquet(folder / "_temporary" / "c.parquet", emb=fsl(xa), key=pa.array(np.arange(5)), y=pa.array([0] * 5))
    write_parquet(folder / ".d.parquet", emb=fsl(xa), key=pa.array(np.arange(5)), y=pa.array([0] * 5))

    src = open_source(data_cfg(source="parquet", path=str(folder), column="emb", label_column="y", id_column="key"))
    assert src.n_rows == 12 and src.has_labels and len(src.specs) == 1 + 3
    t = collect(src)
    assert t.schema.equals(input_schema(3))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.r_[np.arange(100, 105), np.arange(200, 207)])
    np.testing.assert_allclose(x_of(t), np.vstack([xa, xb]).astype(np.float32))
    np.testing.assert_array_equal(t.column("label").to_numpy(), [0, 1, 2, 0, 1, 2, 2, 1, 1, 0, 0, 2])


@pytest.mark.parametrize("make", [
    pytest.param(lambda m: fsl(m), id="fixed_size_list<float>"),
    pytest.param(lambda m: fsl(m, pa.float64()), id="fixed_size_list<double>"),
    pytest.param(lambda m: lists(m, pa.list_(pa.float32())), id="list<float>"),
    pytest.param(lambda m: lists(m, pa.list_(pa.float64())), id="list<double>"),
    pytest.param(lambda m: lists(m, pa.large_list(pa.float64())), id="large_list<double>"),
    pytest.param(lambda m: lists(m.astype(int), pa.list_(pa.int16())), id="list<int16>"),
])
def test_parquet_vector_column_types(tmp_path, make):
    m = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [-1, 0, 250, 3]], dtype=np.float64)
    path = write_parquet(tmp_path / "v.parquet", x=make(m), id=pa.array([7, 8, 9]))
    src = open_source(data_cfg(source="parquet", path=str(path)))
    t = read_all_shards(src)
    assert t.schema.equals(input_schema(4, labels=False))
    np.testing.assert_array_equal(x_of(t), m.astype(np.float32))
    np.testing.assert_array_equal(t.column("id").to_numpy(), [7, 8, 9])


def test_parquet_without_ids_numbers_rows_across_files_in_order(ray_local, tmp_path):
    # x[i] = [file, row in file]: the id must be the row's position in (sorted file, row) order.
    a = np.array([[0, r] for r in range(4)], dtype=np.float32)
    b = np.array([[1, r] for r in range(5)], dtype=np.float32)
    write_parquet(tmp_path / "b.parquet", row_group_size=2, x=fsl(b))
    write_parquet(tmp_path / "a.parquet", row_group_size=3, x=fsl(a))
    src = open_source(data_cfg(source="parquet", path=str(tmp_path), id_column=None))
    assert not src.has_labels and src.n_rows == 9 and len(src.specs) == 2 + 3
    t = collect(src)
    assert t.schema.equals(input_schema(2, labels=False))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(9))
    np.testing.assert_array_equal(x_of(t), np.vstack([a, b]))

    # A glob names the same files; one naming only b numbers b's rows from 0.
    globbed = open_source(data_cfg(source="parquet", path=str(tmp_path / "*.parquet"), id_column=None))
    assert read_all_shards(globbed).equals(t)
    only_b = read_all_shards(open_source(data_cfg(source="parquet", path=str(tmp_path / "b*"), id_column=None)))
    np.testing.assert_array_equal(only_b.column("id").to_numpy(), np.arange(5))
    np.testing.assert_array_equal(x_of(only_b), b)


def test_npy_matrix_with_labels(ray_local, tmp_path):
    x = np.random.default_rng(1).normal(size=(25, 4))
    y = np.arange(25, dtype=np.int32) % 3
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    src = open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy"),
                               rows_per_shard=10))
    assert len(src.specs) == 3 and src.dim == 4 and src.image_shape is None
    t = collect(src)
    assert t.schema.equals(input_schema(4))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(25))
    np.testing.assert_array_equal(x_of(t), x.astype(np.float32))
    np.testing.assert_array_equal(t.column("label").to_numpy(), y)


def test_npy_images_are_flattened(ray_local, tmp_path):
    images = np.arange(12 * 3 * 5, dtype=np.uint8).reshape(12, 3, 5)
    np.save(tmp_path / "img.npy", images)
    src = open_source(data_cfg(source="npy", path=str(tmp_path / "img.npy"), rows_per_shard=5))
    assert src.image_shape == (3, 5) and src.dim == 15 and not src.has_labels
    t = collect(src)
    assert t.schema.equals(input_schema(15, labels=False))
    np.testing.assert_array_equal(x_of(t), images.reshape(12, 15).astype(np.float32))


def test_idx_two_files_concatenated_with_ids_continuing(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    im1, im2 = rng.integers(0, 256, (6, 3, 4), dtype=np.uint8), rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    lb1, lb2 = rng.integers(0, 10, 6, dtype=np.uint8), rng.integers(0, 10, 5, dtype=np.uint8)
    files = [write_idx(tmp_path / "a-images.gz", im1, gz=True), write_idx(tmp_path / "b-images", im2)]
    labels = [write_idx(tmp_path / "a-labels", lb1), write_idx(tmp_path / "b-labels.gz", lb2, gz=True)]
    assert (tmp_path / "b-images").read_bytes()[:4] == b"\x00\x00\x08\x03"
    assert (tmp_path / "a-labels").read_bytes()[:4] == b"\x00\x00\x08\x01"
    src = open_source(data_cfg(source="idx", images=[str(f) for f in files], labels=[str(f) for f in labels],
                               rows_per_shard=4))
    assert src.n_rows == 11 and src.dim == 12 and src.image_shape == (3, 4) and len(src.specs) == 2 + 2
    t = collect(src)
    assert t.schema.equals(input_schema(12))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(11))
    np.testing.assert_array_equal(x_of(t), np.vstack([im1.reshape(6, 12), im2.reshape(5, 12)]).astype(np.float32))
    np.testing.assert_array_equal(t.column("label").to_numpy(), np.r_[lb1, lb2])


@pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="no MNIST files in shared/data")
def test_real_mnist_t10k_first_shard():
    cfg = data_cfg(source="idx", images=[str(MNIST / "t10k-images-idx3-ubyte.gz")],
                   labels=[str(MNIST / "t10k-labels-idx1-ubyte.gz")], rows_per_shard=2000)
    src = open_source(cfg)
    assert src.n_rows == 10_000 and src.dim == 784 and src.image_shape == (28, 28) and len(src.specs) == 5
    t = read_shard(cfg, src.specs[0])
    assert t.schema.equals(input_schema(784))
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(2000))
    x = x_of(t)
    assert x.min() == 0 and x.max() == 255
    assert set(t.column("label").to_numpy()) == set(range(10))


# ---- bad input ---------------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    write_idx(tmp_path / "img", np.zeros((3, 2, 2), np.uint8))
    gone, glob = str(tmp_path / "gone"), str(tmp_path / "*.parquet")
    cases = [
        (dict(source="parquet", path=gone), gone, "Parquet file or folder not found"),
        (dict(source="parquet", path=glob), glob, "no Parquet files found"),
        (dict(source="npy", path=gone), gone, "data file not found"),
        (dict(source="npy", path=str(tmp_path / "x.npy"), labels_path=gone), gone, "labels file not found"),
        (dict(source="idx", images=[gone]), gone, "idx file not found"),
        (dict(source="idx", images=[str(tmp_path / "img")], labels=[gone]), gone, "idx file not found"),
    ]
    for data, named, message in cases:
        with pytest.raises(DataError) as e:
            open_source(data_cfg(**data))
        assert str(e.value) == f"{named}: {message}"


def test_missing_columns_are_named_with_the_columns_there(tmp_path):
    path = write_parquet(tmp_path / "f.parquet", id=pa.array([1, 2]), x=fsl(np.ones((2, 2))))
    with pytest.raises(DataError, match=r"f\.parquet: missing column 'emb' \(data\.column\); "
                                        r"the file has columns \['id', 'x'\]"):
        open_source(data_cfg(source="parquet", path=str(path), column="emb"))
    with pytest.raises(DataError, match=r"f\.parquet: missing column 'y' \(data\.label_column\)"):
        open_source(data_cfg(source="parquet", path=str(path), label_column="y"))
    with pytest.raises(DataError, match=r"missing column 'key' \(data\.id_column\).*data\.id_column=null"):
        open_source(data_cfg(source="parquet", path=str(path), id_column="key"))


@pytest.mark.parametrize("column, message", [
    pytest.param(pa.array(["a", "b"]), r"column 'x' has type string; expected a list of numbers", id="string"),
    pytest.param(pa.array([["a"], ["b"]]), r"column 'x' has type list<.*: string>; expected a list of numbers",
                 id="list<string>"),
    pytest.param(pa.array([1.0, 2.0]), r"column 'x' has type double; expected a list of numbers", id="double"),
])
def test_non_numeric_vector_column(tmp_path, column, message):
    path = write_parquet(tmp_path / "f.parquet", id=pa.array([1, 2]), x=column)
    with pytest.raises(DataError, match=rf"f\.parquet: {message}"):
        open_source(data_cfg(source="parquet", path=str(path)))


def test_non_integer_label_column(tmp_path):
    path = write_parquet(tmp_path / "f.parquet", id=pa.array([1, 2]), x=fsl(np.ones((2, 2))), y=pa.array([0.5, 1.0]))
    with pytest.raises(DataError, match=r"f\.parquet: label column 'y' has type double; expected integers"):
        open_source(data_cfg(source="parquet", path=str(path), label_column="y"))


def test_mixed_vector_lengths_within_a_file_name_the_file_row(tmp_path):
    rows = [[1.0, 2.0, 3.0]] * 5 + [[1.0, 2.0]] + [[1.0, 2.0, 3.0]]
    path = write_parquet(tmp_path / "f.parquet", row_group_size=2, id=pa.array(np.arange(7)),
                         x=pa.array(rows, pa.list_(pa.float32())))
    src = open_source(data_cfg(source="parquet", path=str(path)))
    assert src.dim is None  # a list column's length is only known by reading it
    for spec in src.specs[:2]:
        read_shard(src.config, spec)
    # Row 5 of the file is row 1 of its row group: the message counts rows in the file.
    with pytest.raises(DataError, match=r"f\.parquet: column 'x' has vectors of mixed lengths: "
                                        r"row 4 has 3, row 5 has 2"):
        read_shard(src.config, src.specs[2])


def test_different_fixed_sizes_across_files(tmp_path):
    write_parquet(tmp_path / "a.parquet", id=pa.array([1]), x=fsl(np.ones((1, 3))))
    write_parquet(tmp_path / "b.parquet", id=pa.array([2]), x=fsl(np.ones((1, 4))))
    with pytest.raises(DataError, match=r"b\.parquet: column 'x' has vectors of length 4, other files have 3"):
        open_source(data_cfg(source="parquet", path=str(tmp_path)))


def test_different_list_lengths_across_files_are_caught_by_describe(ray_local, tmp_path):
    write_parquet(tmp_path / "a.parquet", id=pa.array([1, 2]), x=lists(np.ones((2, 3))))
    write_parquet(tmp_path / "b.parquet", id=pa.array([3]), x=lists(np.ones((1, 2))))
    src = open_source(data_cfg(source="parquet", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"in: column 'x' has vectors of different lengths \[2, 3\]"):
        describe(read_dataset(src), source="in")


def test_nan_in_npy_names_file_row_and_id_from_inside_ray(ray_local, tmp_path):
    x = np.ones((25, 3))
    x[13, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    src = open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy"), rows_per_shard=10))
    with pytest.raises(Exception) as excinfo:
        read_dataset(src).materialize()
    err = find_engine_error(excinfo.value)
    assert isinstance(err, DataError), excinfo.value
    # Row 13 of the file, in the second shard: the row is counted in the file, not in the shard.
    assert first_line(err) == f"{tmp_path / 'x.npy'}: column 'x' row 13 (id=13) has NaN values"


def test_inf_in_parquet_names_file_row_and_id_from_inside_ray(ray_local, tmp_path):
    x = np.ones((6, 2), dtype=np.float32)
    x[4, 0] = -np.inf
    write_parquet(tmp_path / "a.parquet", id=pa.array([1, 2]), x=fsl(np.ones((2, 2))))
    write_parquet(tmp_path / "b.parquet", row_group_size=3, id=pa.array(np.arange(100, 106)), x=fsl(x))
    src = open_source(data_cfg(source="parquet", path=str(tmp_path)))
    with pytest.raises(Exception) as excinfo:
        describe(read_dataset(src))
    err = find_engine_error(excinfo.value)
    assert isinstance(err, DataError), excinfo.value
    assert first_line(err) == f"{tmp_path / 'b.parquet'}: column 'x' row 4 (id=104) has inf values"


def test_errors_from_ray_tasks_carry_only_our_message(ray_local, tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 2), np.nan))
    src = open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy")))
    with pytest.raises(Exception) as excinfo:
        read_dataset(src).materialize()
    assert str(find_engine_error(excinfo.value)) == f"{tmp_path / 'x.npy'}: column 'x' row 0 (id=0) has NaN values"


def test_null_ids_and_labels_name_the_row(tmp_path):
    path = write_parquet(tmp_path / "f.parquet", row_group_size=2, x=fsl(np.ones((4, 2))),
                         id=pa.array([1, 2, 3, None]), y=pa.array([0, None, 1, 1]))
    src = open_source(data_cfg(source="parquet", path=str(path), label_column="y"))
    with pytest.raises(DataError, match=r"f\.parquet: label column 'y' row 1 is null"):
        read_all_shards(src)
    src = open_source(data_cfg(source="parquet", path=str(path)))
    with pytest.raises(DataError, match=r"f\.parquet: id column 'id' row 3 is null"):
        read_all_shards(src)


def test_npy_labels_of_the_wrong_length(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"y\.npy: labels have shape \(4,\) but .*x\.npy has 5 rows"):
        open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "y.npy")))


def test_npy_bad_files(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5))
    (tmp_path / "t.npy").write_text("not numpy")
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    np.save(tmp_path / "f.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match=r"v\.npy: expected an \(n, d\) matrix or \(n, h, w\) images, got shape"):
        open_source(data_cfg(source="npy", path=str(tmp_path / "v.npy")))
    with pytest.raises(DataError, match=r"t\.npy: not a readable \.npy data file"):
        open_source(data_cfg(source="npy", path=str(tmp_path / "t.npy")))
    with pytest.raises(DataError, match=r"f\.npy: labels must be integers, got dtype float32"):
        open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy"), labels_path=str(tmp_path / "f.npy")))


def test_idx_label_count_differs_from_image_count(tmp_path):
    img = write_idx(tmp_path / "img", np.zeros((4, 2, 2), np.uint8))
    lab = write_idx(tmp_path / "lab.gz", np.zeros(3, np.uint8), gz=True)
    with pytest.raises(DataError, match=r"lab\.gz: holds 3 labels but .*img has 4 images"):
        open_source(data_cfg(source="idx", images=[str(img)], labels=[str(lab)]))
    with pytest.raises(DataError, match=r"data\.labels names 2 files but data\.images names 1"):
        open_source(data_cfg(source="idx", images=[str(img)], labels=[str(lab), str(lab)]))


@pytest.mark.parametrize("head", [b"\x12\x34\x08\x03", b"\x00\x00\x07\x03", b"P5\n2"],
                         ids=["not-zero", "unknown-type", "pgm"])
def test_idx_bad_magic(tmp_path, head):
    (tmp_path / "img").write_bytes(head + b"\x00" * 32)
    with pytest.raises(DataError, match=rf"img: not an idx file \(bad magic number {head.hex()}\)"):
        open_source(data_cfg(source="idx", images=[str(tmp_path / "img")]))


def test_idx_truncated_plain_file_is_caught_up_front(tmp_path):
    raw = write_idx(tmp_path / "img", np.zeros((4, 2, 2), np.uint8)).read_bytes()
    (tmp_path / "img").write_bytes(raw[:-3])
    with pytest.raises(DataError, match=r"img: idx file is truncated or padded \(29 bytes, header says 32\)"):
        open_source(data_cfg(source="idx", images=[str(tmp_path / "img")]))
    (tmp_path / "short-header").write_bytes(raw[:10])
    with pytest.raises(DataError, match=r"short-header: unreadable idx file"):
        open_source(data_cfg(source="idx", images=[str(tmp_path / "short-header")]))


@pytest.mark.parametrize("cut", ["content", "stream"])
def test_idx_truncated_gzip_file_is_caught_when_read(tmp_path, cut):
    path = tmp_path / "img.gz"
    raw = struct.pack(">IIII", 0x00000803, 4, 2, 2) + bytes(range(16))
    if cut == "content":  # a complete gzip stream of a short file
        path.write_bytes(gzip.compress(raw[:-3]))
        message = r"img\.gz: idx file is truncated or padded \(29 bytes, header says 32\)"
    else:  # the gzip stream itself is cut off
        path.write_bytes(gzip.compress(raw)[:-12])
        message = r"img\.gz: unreadable or truncated idx file"
    cfg = data_cfg(source="idx", images=[str(path)])
    src = open_source(cfg)  # the header is readable: only decompressing everything tells
    with pytest.raises(DataError, match=message):
        read_shard(cfg, src.specs[0])


def test_duplicate_ids_in_parquet_are_caught_by_describe(ray_local, tmp_path):
    write_parquet(tmp_path / "a.parquet", id=pa.array([5, 1, 7]), x=fsl(np.ones((3, 2))))
    write_parquet(tmp_path / "b.parquet", id=pa.array([7, 5, 7, 9]), x=fsl(np.ones((4, 2))))
    src = open_source(data_cfg(source="parquet", path=str(tmp_path)))
    with pytest.raises(DataError, match=r"^in: column 'id' is not unique \(id 5 appears 2 times\)$"):
        describe(read_dataset(src), source="in")


def test_empty_parquet(tmp_path):
    empty = write_parquet(tmp_path / "e.parquet", id=pa.array([], pa.int64()), x=fsl(np.ones((0, 2))))
    with pytest.raises(DataError, match=r"e\.parquet: the Parquet data has no rows"):
        open_source(data_cfg(source="parquet", path=str(empty)))
    (tmp_path / "z.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"z\.parquet: not a readable Parquet file"):
        open_source(data_cfg(source="parquet", path=str(tmp_path / "z.parquet")))
    # An empty file next to a non-empty one is only skipped.
    full = tmp_path / "full"
    full.mkdir()
    os.replace(empty, full / "e.parquet")
    write_parquet(full / "f.parquet", id=pa.array([3]), x=fsl(np.ones((1, 2))))
    src = open_source(data_cfg(source="parquet", path=str(full)))
    assert src.n_rows == 1 and len(src.specs) == 1


def test_bad_source_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key 'data\.colum'"):
        data_cfg(source="parquet", path="p", colum="x")
    with pytest.raises(ConfigError, match=r"'data\.rows_per_shard': Input should be greater than or equal to 1"):
        data_cfg(source="digits", rows_per_shard=0)
    with pytest.raises(ConfigError, match=r"'data\.source' must be one of .*; got 'csv'"):
        data_cfg(source="csv")
    with pytest.raises(ConfigError, match=r"missing key 'data\.path'"):
        data_cfg(source="npy")


# ---- describe ----------------------------------------------------------------------------------------

# Hand-worked: columns (0, 2, 4), (2, 2, 2), (4, -6, 2).
TINY = np.array([[0, 2, 4], [2, 2, -6], [4, 2, 2]], dtype=np.float64)
EXPECTED = {
    "none": ([0, 0, 0], [1, 1, 1]),
    "max": ([0, 0, 0], [1 / 6, 1 / 6, 1 / 6]),  # largest |value| is 6
    "minmax": ([0, 2, -6], [1 / 4, 1, 1 / 10]),  # a constant column keeps scale 1
    "standard": ([2, 2, 0], [1 / np.sqrt(8 / 3), 1, 1 / np.sqrt(56 / 3)]),  # population std
    "center": ([2, 2, 0], [1 / 6, 1 / 6, 1 / 6]),  # means; the farthest value from its mean: -6, 6 from 0
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_normalisation_by_hand(kind):
    shift, scale = normalisation(kind, n=3, s=TINY.sum(0), sq=(TINY**2).sum(0), lo=TINY.min(0), hi=TINY.max(0))
    assert shift.dtype == scale.dtype == np.float32
    np.testing.assert_allclose(shift, EXPECTED[kind][0], rtol=1e-6)
    np.testing.assert_allclose(scale, EXPECTED[kind][1], rtol=1e-6)


def test_center_makes_an_image_set_and_its_inverse_the_same_rows_up_to_sign():
    x = np.random.default_rng(0).integers(0, 256, size=(50, 16)).astype(np.float64)
    x[:, :4] = 0  # an empty border, as MNIST's

    def scaled(rows):
        shift, scale = normalisation("center", n=len(rows), s=rows.sum(0), sq=(rows**2).sum(0), lo=rows.min(0),
                                     hi=rows.max(0))
        return (rows - shift) * scale

    np.testing.assert_allclose(scaled(255 - x), -scaled(x), atol=1e-6)
    assert np.abs(scaled(x)).max() == pytest.approx(1.0)


def test_normalisation_unknown_kind():
    with pytest.raises(ValueError, match="unknown normalisation 'l2'"):
        normalisation("l2", n=1, s=np.zeros(1), sq=np.zeros(1), lo=np.zeros(1), hi=np.zeros(1))


def test_describe_digits(ray_local):
    src = open_source(data_cfg(source="digits", rows_per_shard=600))
    info = describe(read_dataset(src), normalize="max", image_shape=src.image_shape, source="digits")
    assert (info.n_rows, info.dim, info.has_labels, info.n_classes) == (1797, 64, True, 10)
    np.testing.assert_array_equal(info.shift, np.zeros(64))
    np.testing.assert_allclose(info.scale, np.full(64, 1 / 16))
    assert info.to_json() == {"n_rows": 1797, "dim": 64, "has_labels": True, "n_classes": 10,
                              "image_shape": [8, 8], "source": "digits"}


@pytest.mark.parametrize("kind", ["minmax", "standard", "center"])
def test_describe_adds_statistics_across_shards(ray_local, tmp_path, kind):
    np.save(tmp_path / "x.npy", TINY)
    src = open_source(data_cfg(source="npy", path=str(tmp_path / "x.npy"), rows_per_shard=1))
    info = describe(read_dataset(src), normalize=kind)
    assert (info.n_rows, info.dim, info.has_labels, info.n_classes) == (3, 3, False, None)
    np.testing.assert_allclose(info.shift, EXPECTED[kind][0], rtol=1e-6)
    np.testing.assert_allclose(info.scale, EXPECTED[kind][1], rtol=1e-6)


# ---- shards: atomic result folders -------------------------------------------------------------------


def small_dataset(n: int = 6):
    import ray.data

    table = pa.table({"id": pa.array(np.arange(n)), "z": vector_array(np.arange(n * 2).reshape(n, 2))})
    return ray.data.from_arrow(table).repartition(2), table


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_dataset_writes_a_manifest_and_reads_back(ray_local, tmp_path):
    ds, table = small_dataset()
    out = tmp_path / "embeddings"
    manifest = write_dataset(ds, out, stage="embed", config_hash="abc123", expected_rows=6, latent_dim=2)
    assert os.listdir(tmp_path) == ["embeddings"]  # no temporary sibling left
    on_disk = json.loads((out / MANIFEST).read_text())
    assert on_disk == manifest == read_manifest(out, stage="embed")
    assert manifest["stage"] == "embed" and manifest["rows"] == 6 and manifest["config_hash"] == "abc123"
    assert manifest["latent_dim"] == 2 and manifest["engine_version"]
    assert manifest["files"] and sorted(manifest["files"]) == sorted(p.name for p in out.glob("*.parquet"))
    assert manifest["schema"].startswith("id: int64\nz: fixed_size_list<") and "float>[2]" in manifest["schema"]
    assert read_table(out).sort_by("id").equals(table)
    with pytest.raises(IncompleteResultError, match="holds stage 'embed', expected 'assign'"):
        read_manifest(out, stage="assign")


def test_a_folder_without_manifest_is_not_a_result(tmp_path):
    (tmp_path / "half").mkdir()
    pq.write_table(pa.table({"id": [1]}), tmp_path / "half" / "part.parquet")
    for folder in (tmp_path / "half", tmp_path / "missing"):
        with pytest.raises(IncompleteResultError, match=rf"{folder.name}: no _manifest\.json"):
            read_manifest(folder)
        with pytest.raises(IncompleteResultError):
            read_table(folder)


def test_staged_folder_leaves_nothing_after_an_error(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError, match="boom"), staged_folder(out) as tmp:
        (tmp / "part.parquet").write_bytes(b"half")
        write_manifest(tmp, stage="embed", config_hash="h")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="finished without a _manifest.json"), staged_folder(out) as tmp:
        (tmp / "part.parquet").write_bytes(b"half")
    assert os.listdir(tmp_path) == []


def test_a_failed_rewrite_keeps_the_previous_result(ray_local, tmp_path, monkeypatch):
    ds, _ = small_dataset()
    out = tmp_path / "result"
    write_dataset(ds, out, stage="embed", config_hash="first")
    before = snapshot(out)

    with pytest.raises(KeyboardInterrupt), staged_folder(out) as tmp:
        write_manifest(tmp, stage="embed", config_hash="second")
        raise KeyboardInterrupt  # a killed run, not only an exception
    with pytest.raises(DataError, match=r"result: wrote 6 rows but the input has 7"):
        write_dataset(ds, out, stage="embed", config_hash="second", expected_rows=7)
    assert os.listdir(tmp_path) == ["result"] and snapshot(out) == before

    # Fault injection: the final rename fails after the old folder was moved aside; it must come back.
    import engine.data.folders as shards

    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"), staged_folder(out) as tmp:
        write_manifest(tmp, stage="embed", config_hash="third")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["result"] and snapshot(out) == before

    # A successful rewrite replaces it and leaves no old copy behind.
    write_dataset(ds, out, stage="embed", config_hash="fourth")
    assert os.listdir(tmp_path) == ["result"] and read_manifest(out)["config_hash"] == "fourth"


def test_expected_rows_mismatch_leaves_nothing(ray_local, tmp_path):
    ds, _ = small_dataset()
    with pytest.raises(DataError, match=r"new: wrote 6 rows but the input has 5"):
        write_dataset(ds, tmp_path / "new", stage="embed", config_hash="h", expected_rows=5)
    assert os.listdir(tmp_path) == []


def test_read_shards_reads_only_the_manifest_files(ray_local, tmp_path):
    ds, table = small_dataset()
    out = tmp_path / "result"
    write_dataset(ds, out, stage="embed", config_hash="h")
    stray = pa.table({"id": pa.array([100, 101]), "z": vector_array(np.zeros((2, 2)))})
    pq.write_table(stray, out / "stray.parquet")
    assert pq.read_table(out).num_rows == 8  # a plain folder reader would take the stray file
    got = pa.concat_tables(ray_local.get(read_shards(out, stage="embed").to_arrow_refs()))
    assert got.sort_by("id").equals(table)
    assert read_table(out).sort_by("id").equals(table)
    assert read_table(out, columns=["id"]).column_names == ["id"]


# ---- the schema helpers ----------------------------------------------------------------------------


M = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)


def test_vectors_to_numpy_types():
    for column in (fsl(M), fsl(M, pa.float64()), lists(M), lists(M, pa.large_list(pa.int64())),
                   pa.chunked_array([fsl(M[:1]), fsl(M[1:])]), pa.chunked_array([lists(M[:2]), lists(M[2:])])):
        got = vectors_to_numpy(column)
        assert got.dtype == np.float32 and got.shape == (3, 3)
        np.testing.assert_array_equal(got, M)
    np.testing.assert_array_equal(vectors_to_numpy(fsl(M).slice(1)), M[1:])
    np.testing.assert_array_equal(vectors_to_numpy(lists(M).slice(2)), M[2:])
    assert vectors_to_numpy(pa.chunked_array([], pa.list_(pa.float32(), 3))).shape == (0, 3)


def test_vectors_to_numpy_tensor_extensions():
    from ray.data.extensions import ArrowTensorArray

    images = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    for column in (ArrowTensorArray.from_numpy(images), pa.FixedShapeTensorArray.from_numpy_ndarray(images)):
        np.testing.assert_array_equal(vectors_to_numpy(column), images.reshape(3, 8))
        np.testing.assert_array_equal(vectors_to_numpy(pa.chunked_array([column])), images.reshape(3, 8))


def test_vectors_to_numpy_errors_name_where_column_and_row():
    with pytest.raises(DataError, match=r"^f\.parquet: column 'emb' row 1 is null$"):
        vectors_to_numpy(pa.array([[1.0], None, [2.0]], pa.list_(pa.float32(), 1)), name="emb", where="f.parquet")
    # rows count through the chunks, and from first_row
    nulls = pa.chunked_array([lists(M), pa.array([[1.0, 2, 3], None], pa.list_(pa.float64()))])
    with pytest.raises(DataError, match=r"^f: column 'x' row 4 is null$"):
        vectors_to_numpy(nulls, where="f")
    with pytest.raises(DataError, match=r"^f: column 'x' row 14 is null$"):
        vectors_to_numpy(nulls, where="f", first_row=10)
    with pytest.raises(DataError, match=r"^column 'x' has null elements inside its vectors$"):
        vectors_to_numpy(pa.array([[1.0, None]], pa.list_(pa.float64())))
    with pytest.raises(DataError, match=r"^f: column 'x' has vectors of mixed lengths: row 0 has 3, row 2 has 2$"):
        vectors_to_numpy(pa.array([[1, 2, 3], [1, 2, 3], [1, 2], [1]], pa.list_(pa.float32())), where="f")
    with pytest.raises(DataError, match=r"column 'x' has vectors of mixed lengths: row 0 has 3, row 3 has 2$"):
        vectors_to_numpy(pa.chunked_array([lists(M), lists(M[:, :2])]))
    with pytest.raises(DataError, match=r"^f: column 'x' holds string; expected numbers$"):
        vectors_to_numpy(pa.array([["a"]]), where="f")
    with pytest.raises(DataError, match=r"^column 'x' has type int64; expected a list or fixed_size_list"):
        vectors_to_numpy(pa.array([1, 2]))


def test_vector_array_and_check_finite():
    arr = vector_array(M.astype(np.float64))
    assert arr.type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(vectors_to_numpy(arr), M)
    with pytest.raises(ValueError, match="expected a 2-D matrix"):
        vector_array(np.zeros(3))
    check_finite(M)
    bad = M.copy()
    bad[2, 1] = np.inf
    bad[1, 0] = np.nan
    with pytest.raises(DataError, match=r"^f: column 'x' row 6 \(id=41\) has NaN values$"):
        check_finite(bad, np.array([40, 41, 42]), where="f", first_row=5)
    with pytest.raises(DataError, match=r"^column 'x' row 2 has inf values$"):
        check_finite(bad[[0, 0, 2]])
