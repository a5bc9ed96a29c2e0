"""benchmarks/codes_ceiling.py: a run's ACC beside labelled classifiers on its codes (no Ray: run folders made here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import codes_ceiling  # noqa: E402
import record  # noqa: E402


def _folder(path: Path, stage: str, table: pa.Table, parts: int = 2) -> None:
    """A complete stage folder as the engine writes one: Parquet shards and a manifest listing them."""
    path.mkdir(parents=True)
    files = []
    for i, piece in enumerate(np.array_split(np.arange(table.num_rows)[::-1], parts)):  # shards out of id order
        name = f"{stage}-{i}.parquet"
        pq.write_table(table.take(pa.array(piece)), path / name)
        files.append(name)
    (path / "_manifest.json").write_text(json.dumps({"stage": stage, "rows": table.num_rows, "files": files}))


def make_run(root: Path, z: np.ndarray, labels: np.ndarray | None, clusters: np.ndarray, name: str = "run") -> Path:
    run = root / name
    ids = np.arange(len(z), dtype=np.int64)
    columns = {"id": ids, "z": pa.FixedSizeListArray.from_arrays(pa.array(z.astype(np.float32).ravel()), z.shape[1])}
    if labels is not None:
        columns["label"] = labels.astype(np.int64)
    _folder(run / "embeddings", "embed", pa.table(columns))
    _folder(run / "assignments", "assign", pa.table({"id": ids, "cluster": clusters.astype(np.int32),
                                                     "distance": np.zeros(len(z), np.float32)}))
    (run / "run.json").write_text(json.dumps({"name": "toy"}))
    return run


@pytest.fixture
def blobs():
    """Three far-apart blobs of 100 rows; the run's partition puts 30 rows of blob 0 in blob 1's cluster."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 100)
    z = rng.normal(size=(300, 4)) + 20 * np.eye(4)[y]
    clusters = y.copy()
    clusters[:30] = 1
    return z, y, clusters


def test_codes_that_separate_the_classes_show_the_clustering_as_the_limit(tmp_path, blobs):
    z, y, clusters = blobs
    line = codes_ceiling.measure(make_run(tmp_path, z, y, clusters), [1, 5], svm_rows=1000, folds=3)
    assert line["acc"] == 0.9 and line["knn1"] == 1.0 and line["knn5"] == 1.0 and line["svm"] == 1.0
    assert line["headroom"] == pytest.approx(0.1)
    assert (line["config"], line["rows"], line["dim"]) == ("toy", 300, 4)


def test_a_row_is_not_its_own_neighbour(tmp_path):
    """Labels that the codes do not carry: leave-one-out votes are at chance (a row voting for itself scores 1.0),
    even where exact duplicates put another row first in faiss' list."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 3))
    z[200:] = z[:200]  # every row has an exact duplicate
    y = rng.integers(0, 2, 400)
    line = codes_ceiling.measure(make_run(tmp_path, z, y, y), [1, 3], svm_rows=0, folds=2)
    assert line["acc"] == 1.0 and line["svm"] is None
    assert 0.3 < line["knn3"] < 0.7
    assert line["knn1"] < 0.7
    assert line["headroom"] < 0


def test_record_appends_one_table(tmp_path, blobs, monkeypatch, capsys):
    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(record, "RESULTS", results)
    run = make_run(tmp_path, *blobs)
    assert codes_ceiling.main([str(run), "--neighbors", "1", "--svm-rows", "0", "--record"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["knn1"] == 1.0
    text = results.read_text()
    assert "| run | `toy` | 300 x 4 | 0.9000 | 1.0000 | - | +10.0 |" in text


@pytest.mark.parametrize("broken, message", [
    ("missing", "no such run directory"),
    ("no_assignments", "assignments: no _manifest.json"),
    ("no_labels", "embeddings: no label column"),
])
def test_bad_run_gets_one_error_line(tmp_path, blobs, capsys, broken, message):
    z, y, clusters = blobs
    if broken == "missing":
        run = tmp_path / "nothing"
    elif broken == "no_labels":
        run = make_run(tmp_path, z, None, clusters)
    else:
        run = make_run(tmp_path, z, y, clusters)
        (run / "assignments" / "_manifest.json").unlink()
    assert codes_ceiling.main([str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_bad_settings_exit_2(tmp_path, blobs, capsys):
    assert codes_ceiling.main([str(make_run(tmp_path, *blobs)), "--neighbors", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --neighbors")
