"""`dce report`, `dce sweep-k` and `dce assign` on a real local Ray: the report's sections and images, its rendering in
headless Chromium, k chosen on blobs, new rows assigned exactly as the run did, and bad runs and inputs refused."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.data import read_table

SECTIONS = {"metrics", "map", "curves", "sizes", "images", "confusion", "run"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_failure(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def report(digits_run):
    result = invoke("report", digits_run, "--log-format", "json")
    assert result.exit_code == 0, result.output
    index = Path(json.loads(result.stdout.strip().splitlines()[-1])["report"])
    events = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert {"stage_start", "stage_end"} <= {e["event"] for e in events}
    return index


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections: set[str] = set()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.add(a["id"])
        if tag == "img":
            self.images.append(a["src"])
        for key in ("src", "href"):
            if key in a and tag != "img":
                self.links.append(a[key])


def test_report_holds_every_section(digits_run, report):
    from PIL import Image

    text = report.read_text()
    page = _Page()
    page.feed(text)
    page.close()
    assert page.sections == SECTIONS
    # Self-contained: every image inline as a PNG that decodes, nothing to fetch.
    assert len(page.images) >= 6
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.verify()
    assert all(link.startswith("#") for link in page.links), page.links
    assert not re.search(r"(src|href)=\"(https?:)?//", text)
    for name in ("map", "curves", "sizes", "samples", "centroids", "confusion"):
        assert (report.parent / f"{name}.png").is_file(), name
    # The section contents come from the run: metrics, the loss terms of its history, its config and versions.
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert f"{metrics['acc']:.4g}" in text
    assert "reconstruction" in text and "right by true label" in text
    # The training was augmented (tests/tiny.py): the history's count of transformed rows is not a loss curve.
    assert "augmented_rows" not in text
    assert "latent_dim: 4" in text and "scikit-learn" in text and "Time per stage" in text
    assert "No published figures" in text  # digits: none to cite


def test_report_renders_in_chromium(report, tmp_path):
    chromium = _chromium()
    shot = tmp_path / "report.png"
    errors, widths, requests = render(chromium, report, shot)
    assert not errors, errors
    assert len(widths) >= 6 and all(w > 0 for w in widths), widths  # every image decoded by the browser
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert shot.stat().st_size > 10_000
    if os.environ.get("DCE_ARTIFACTS"):
        folder = Path(os.environ["DCE_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, folder / "report.png")


def test_chromium_check_catches_a_broken_page(tmp_path):
    """The rendering check can fail: a script error, a console error and an undecodable image are all caught."""
    chromium = _chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("deliberate"); notDefined();</script></body></html>')
    errors, widths, _ = render(chromium, page, tmp_path / "broken.png")
    assert any("deliberate" in e for e in errors) and any("notDefined" in e for e in errors), errors
    assert widths == [0]


def test_report_rebuilds_with_another_map(digits_run, report):
    before = json.loads((report.parent / "_manifest.json").read_text())["time"]
    result = invoke("report", digits_run, "--set", "report.map=tsne", "--set", "report.sample=150", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(report) and not result.stderr.strip()
    assert json.loads((report.parent / "_manifest.json").read_text())["time"] > before
    assert "tsne (report.map) of a seeded sample of 150 of 1797 rows" in report.read_text()


def test_sweep_k_suggests_five_on_five_blobs(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.uniform(-20, 20, size=(5, 6))
    labels = np.arange(600) % 5
    z = (centers[labels] + rng.normal(scale=0.5, size=(600, 6))).astype(np.float32)
    pq.write_table(pa.table({"id": np.arange(600), "z": list(z)}), tmp_path / "blobs.parquet")
    out = tmp_path / "blobs"
    result = invoke("sweep-k", tmp_path / "blobs.parquet", "--out", out, "--k", "2..9",
                    "--set", "cluster.n_init=2", "--log-format", "json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    saved = json.loads((out / "sweep_k" / "sweep_k.json").read_text())
    assert printed["suggested_k"] == saved["suggested_k"] == 5
    assert [r["k"] for r in saved["results"]] == list(range(2, 10))
    inertia = [r["inertia"] for r in saved["results"]]
    assert all(a >= b * 0.999 for a, b in zip(inertia, inertia[1:], strict=False))  # the elbow curve falls
    assert min(saved["results"], key=lambda r: r["davies_bouldin"])["k"] == 5
    from PIL import Image

    with Image.open(out / "sweep_k" / "sweep_k.png") as img:
        img.verify()
    assert_clean_failure(invoke("sweep-k", out, "--k", "2-9"), r"--k '2-9' should be a range like 2\.\.30")
    assert_clean_failure(invoke("sweep-k", out, "--k", "2..600"), r"k=600 should be >= 2 and < the number of "
                                                                  r"embeddings \(600\)")


def test_curves_take_any_loss_terms_and_published_figures_by_data_set():
    """No Ray: the GAN's g_loss / d_loss are curves like any model's terms; MNIST gets the papers' ACC."""
    from engine.config import config_from_dict
    from engine.report import PUBLISHED, history_terms, known_dataset

    history = [{"epoch": 1, "g_loss": 1.2, "d_loss": 0.7, "seconds": 3.0, "rows": 100.0},
               {"epoch": 2, "g_loss": 1.0, "d_loss": 0.6, "encoder_loss": 0.2, "seconds": 3.0, "rows": 100.0}]
    assert history_terms(history) == ["g_loss", "d_loss", "encoder_loss"]
    mnist = config_from_dict({"data": {"source": "idx", "images": ["data/mnist/train-images-idx3-ubyte.gz"]}})
    assert known_dataset(mnist) == "mnist"
    assert ("DEC", 0.843) in [(method, acc) for method, _, acc in PUBLISHED["mnist"]]
    assert known_dataset(config_from_dict({})) is None  # digits: nothing to cite


def test_sweep_k_spreads_the_work_over_tasks_only_when_it_pays():
    from engine.sweep_k import parse_k_range, task_groups

    ks = parse_k_range("2..30")
    assert ks == list(range(2, 31)) and parse_k_range("8, 2,4") == [2, 4, 8]
    assert task_groups(ks, 1797, 10, 10, parallel=4) == [ks]  # small: one task, one worker start
    groups = task_groups(ks, 1_000_000, 10, 10, parallel=4)
    assert len(groups) == 4 and sorted(k for g in groups for k in g) == ks


def _digits_parquet(path: Path, n_features: int = 64) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)[:, :n_features]
    pq.write_table(pa.table({"id": np.arange(len(x)), "x": list(x)}), path)
    return x


def test_assign_reproduces_the_run(digits_run, tmp_path):
    import engine

    x = _digits_parquet(tmp_path / "digits.parquet")
    out = tmp_path / "assigned"
    result = invoke("assign", digits_run, "--input", tmp_path / "digits.parquet", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and not result.stderr.strip()  # --quiet: no progress
    run = read_table(digits_run / "assignments", stage="assign").sort_by("id")
    new = read_table(out, stage="assign").sort_by("id")
    assert new.column("id").equals(run.column("id"))
    assert new.column("cluster").equals(run.column("cluster"))
    np.testing.assert_allclose(new.column("distance").to_numpy(), run.column("distance").to_numpy(), rtol=1e-5)
    # The same from Python, rows in id order.
    labels = engine.load_run(digits_run).assign(x)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, run.column("cluster").to_numpy())


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("train", "report"))
    return to


def test_assign_refuses_bad_runs_and_inputs(digits_run, tmp_path):
    import engine
    from engine.errors import CheckpointError, ConfigError, DataError, IncompleteResultError

    parquet = tmp_path / "digits.parquet"
    _digits_parquet(parquet)
    no_model = _copy_run(digits_run, tmp_path / "no_model")
    shutil.rmtree(no_model / "model")
    assert_clean_failure(invoke("assign", no_model, "--input", parquet, "--out", tmp_path / "a"),
                         r"no_model/model: no _manifest\.json")
    no_centroids = _copy_run(digits_run, tmp_path / "no_centroids")
    (no_centroids / "centroids.npy").unlink()
    with pytest.raises(IncompleteResultError, match=r"no_centroids/centroids\.npy: not found"):
        engine.load_run(no_centroids)
    old = _copy_run(digits_run, tmp_path / "old")
    manifest = json.loads((old / "model" / "_manifest.json").read_text())
    (old / "model" / "_manifest.json").write_text(json.dumps({**manifest, "engine_version": "0.0.1"}))
    with pytest.raises(CheckpointError, match=r"old/model/_manifest\.json: written by engine version 0\.0\.1"):
        engine.load_run(old)
    gmm = _copy_run(digits_run, tmp_path / "gmm")
    # What the clustering was is read from cluster.json (a `dce cluster RUN --set cluster.method=gmm` leaves
    # config.yaml as it was).
    summary = json.loads((gmm / "cluster.json").read_text())
    (gmm / "cluster.json").write_text(json.dumps({**summary, "method": "gmm"}))
    with pytest.raises(ConfigError, match=r"cluster\.method=gmm labels rows without centroids"):
        engine.load_run(gmm)
    assert_clean_failure(invoke("assign", tmp_path, "--input", parquet, "--out", tmp_path / "a"),
                         "not a run directory")

    # New rows of the wrong width: named with the file, before any compute; and from Python.
    narrow = tmp_path / "narrow.parquet"
    x = _digits_parquet(narrow, n_features=60)
    assert_clean_failure(invoke("assign", digits_run, "--input", narrow, "--out", tmp_path / "a"),
                         r"narrow\.parquet: the rows have 60 features but the run's model .* takes 64")
    assert not (tmp_path / "a").exists()
    np.save(tmp_path / "narrow.npy", x)
    assert_clean_failure(invoke("assign", digits_run, "--input", tmp_path / "narrow.npy", "--out", tmp_path / "a"),
                         r"narrow\.npy: the rows have 60 features")
    with pytest.raises(DataError, match=r"the rows to assign have 60 features .* takes 64"):
        engine.load_run(digits_run).assign(x)
    assert_clean_failure(invoke("assign", digits_run, "--input", parquet, "--column", "pixels", "--out",
                                tmp_path / "a"), r"missing column 'pixels'")


# ---- headless Chromium over the DevTools protocol ------------------------------------------------


def _chromium() -> str:
    """The Chromium binary; without one the test is skipped, unless DCE_REQUIRE_CHROMIUM=1 (CI) makes it fail."""
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("DCE_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"DCE_REQUIRE_CHROMIUM=1 but none of {CHROMIUM_NAMES} is on PATH (apt-get install chromium)")
    pytest.skip("no chromium binary (apt-get install chromium); set DCE_REQUIRE_CHROMIUM=1 to make this fail")


def render(chromium: str, page: Path, screenshot: Path, timeout: float = 90) -> tuple[list[str], list[int], list[str]]:
    """Open `page` in headless Chromium, driven over --remote-debugging-pipe (CDP, no extra packages); save a
    full-page screenshot. Returns (console errors and uncaught exceptions, each <img>'s decoded width, URLs
    requested)."""
    cmd_read, cmd_write = os.pipe()  # Chromium reads commands on its fd 3
    out_read, out_write = os.pipe()  # and writes replies and events on its fd 4

    def child_fds() -> None:
        # Runs before the fds outside pass_fds are closed. Copies above 9 first: a pipe end may itself be fd 3 or 4
        # and must not be overwritten before it moves.
        high_read, high_write = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10), fcntl.fcntl(out_write, fcntl.F_DUPFD, 10)
        os.dup2(high_read, 3)
        os.dup2(high_write, 4)

    profile = screenshot.parent / f".chromium-{screenshot.stem}"
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1280,1024", "about:blank"],
        pass_fds=(3, 4), preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(cmd_read)
    os.close(out_write)
    deadline = time.monotonic() + timeout
    buffer, events, next_id = b"", [], 0

    def receive() -> dict:
        nonlocal buffer
        while b"\0" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out_read], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer within {timeout} s")
            chunk = os.read(out_read, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            buffer += chunk
        message, buffer = buffer.split(b"\0", 1)
        return json.loads(message)

    def call(method: str, session: str | None = None, **params) -> dict:
        nonlocal next_id
        next_id += 1
        request = {"id": next_id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(cmd_write, json.dumps(request).encode() + b"\0")
        while True:
            message = receive()
            if message.get("id") == next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            events.append(message)

    def wait_for(method: str) -> None:
        while not any(e.get("method") == method for e in events):
            events.append(receive())

    try:
        target = call("Target.createTarget", url="about:blank")["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            call(f"{domain}.enable", session)
        call("Page.navigate", session, url=page.resolve().as_uri())
        wait_for("Page.loadEventFired")
        widths = call("Runtime.evaluate", session, returnByValue=True,
                      expression="Array.from(document.images).map(i => i.complete ? i.naturalWidth : -1)")
        size = call("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        call("Browser.close")
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(cmd_write)
        os.close(out_read)
        shutil.rmtree(profile, ignore_errors=True)
    errors, requests = [], []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
        elif method == "Network.requestWillBeSent":
            requests.append(params["request"]["url"])
    return errors, widths["result"]["value"], requests
