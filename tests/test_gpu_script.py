"""benchmarks/gpu.py, the prepared GPU check, at tiny sizes on the CPU: so that it cannot rot between GPU loans.

It runs as the GPU machine would run it: a process in which ray, faiss and pydantic cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from markers import needs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
MNIST = ROOT.parent / "shared" / "data" / "mnist"
UNWANTED = ("ray", "faiss", "pydantic")

# A sitecustomize that makes every import of the unwanted packages fail, as on the GPU machine without them.
BLOCKER = f"""
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {UNWANTED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_gpu_script.py)", name=name)
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
@needs("slow")
def tiny_run(tmp_path_factory) -> list[dict]:
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    out = site / "gpu.jsonl"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)]
    if MNIST.is_dir():
        cmd += ["--data", str(MNIST)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    return lines


def _ok_or_skipped(row: dict) -> None:
    assert row["status"] in ("ok", "skipped"), row
    if row["status"] == "skipped":
        assert row["reason"], row


def test_no_ray_faiss_or_pydantic(tiny_run):
    last = tiny_run[-1]
    assert last["section"] == "imports"
    assert last["unwanted_imported"] == []
    assert last["seconds"] < 60


def test_every_case_and_implementation(tiny_run):
    rows = [r for r in tiny_run if r["section"] == "kmeans"]
    for case in ("a", "b"):
        impls = {r["impl"].split()[0] for r in rows if r["case"] == case}
        assert impls == {"engine", "flash-kmeans", "fastkmeans"}
    for r in rows:
        _ok_or_skipped(r)
        if r["status"] == "ok":
            assert r["seconds"] > 0 and r["tflops"] > 0 and r["peak_memory_mb"] > 0 and 1 <= r["n_iter"] <= r["iters"]
            if r["precision"] != "bf16":  # float32 Lloyd from one init, on well-separated blobs: one result
                assert r["inertia_ratio_to_fp32"] == pytest.approx(1.0, abs=1e-3), r
    engine = [r for r in rows if r["impl"] == "engine"]
    assert engine and all(r["status"] == "ok" for r in engine)
    for r in rows:
        if r["impl"].startswith("fastkmeans") and r["status"] == "ok":
            assert r["same_init"] is True


def test_fused_kernel_checked(tiny_run):
    rows = [r for r in tiny_run if r["section"] == "fused"]
    assert rows
    if importlib.util.find_spec("triton") is None:
        assert all(r["status"] == "skipped" and r["reason"] for r in rows)
        return
    assert all(r["status"] == "ok" and r["path"] == "triton interpreter" for r in rows), rows
    checked = [r for r in rows if "label_agreement" in r]
    assert {r["precision"] for r in checked} == {"fp32", "tf32", "bf16"}
    assert all(r["label_agreement"] == 1.0 and r["best_max_relative_error"] < 1e-5 for r in checked)


def test_training(tiny_run):
    rows = [r for r in tiny_run if r["section"] == "train"]
    assert [r["precision"] for r in rows if r["model"].startswith("mnist_ae")] == ["fp32", "bf16"]
    gan = [r for r in rows if r["model"].startswith("ClusterGAN")]
    assert len(gan) == 1
    for r in rows:
        assert r["status"] == "ok", r
        assert r["epochs"] >= 1 and r["seconds_per_epoch"] > 0
    assert 0 < gan[0]["acc"] <= 1
    assert ("MNIST" in rows[0]["data"]) == MNIST.is_dir()


def test_record_tables(tiny_run, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import record

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(record, "RESULTS", tmp_path / "RESULTS.md")
    gpu.record(tiny_run)
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("\n## ") == 3
    env = tiny_run[0]
    assert text.count(f"{env['date']} · CPU (no CUDA device) on {env['host']}") == 3  # where it was measured
    for title in ("GPU k-means", "Fused distance + argmin", "Training with engine/train/loop.py"):
        assert title in text
    kmeans_rows = [r for r in tiny_run if r["section"] == "kmeans"]
    assert sum(line.startswith("| a |") or line.startswith("| b |") for line in text.splitlines()) == len(kmeans_rows)
