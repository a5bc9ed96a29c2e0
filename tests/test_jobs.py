"""Ray Jobs end to end on a real token-auth `ray start --head`: the pipeline submitted by SDK, the training job
(jobs.train_encoder) by CLI, then a stage job (jobs.cluster) on the pipeline's run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from markers import needs
from ray.exceptions import AuthenticationError
from ray.job_submission import JobStatus, JobSubmissionClient
from ray_head import RayHead, ray_cli, start_ray_head

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXCLUDES = [".venv*", "runs", ".git", "*.egg-info", "__pycache__", "test-artifacts", ".pytest_cache", ".ruff_cache"]
N_DIGITS = 1797
METRICS = {"acc", "nmi", "ari", "silhouette", "davies_bouldin", "calinski_harabasz", "inertia"}
# Generous: on the shared 2-core development machine a digits pipeline job has taken over 4 minutes under load.
JOB_TIMEOUT_S = 480
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def pipeline_entrypoint(out: Path, epochs: int, job: str = "pipeline") -> list[str]:
    # k-means, not the default UMAP + GMM: this module tests submission, and UMAP alone takes minutes on a busy machine.
    return ["python", "-m", f"jobs.{job}", "--config", "configs/digits.yaml", "--set", f"train.epochs={epochs}",
            "--set", "cluster.method=kmeans", "--set", "cluster.manifold=none", "--set", "cluster.n_init=1",
            "--out", str(out)]


@pytest.fixture(scope="module")
@needs("own_cluster")
def head() -> Iterator[RayHead]:
    import ray

    # This module talks to its own cluster; conftest's `ray_local` starts the in-process Ray again for later modules.
    if ray.is_initialized():
        ray.shutdown()
    # Two pipelines run at once below, each wanting 4 scheduling slots (training workers + the tasks feeding them).
    head = start_ray_head(num_cpus=8)
    yield head
    head.stop()


@pytest.fixture(scope="module")
def client(head: RayHead) -> JobSubmissionClient:
    # An explicit Authorization header wins over any token this process's own Ray state would add by itself.
    return JobSubmissionClient(head.dashboard_url, headers=head.auth_header)


@dataclass
class Submissions:
    sdk_job: str
    sdk_run: Path
    cli_job: str
    cli_run: Path
    cli: subprocess.Popen
    cli_log: Path


@pytest.fixture(scope="module")
def submissions(head: RayHead, client: JobSubmissionClient, tmp_path_factory) -> Iterator[Submissions]:
    """Both jobs start together: on 2 cores their Ray start-up latencies overlap, which halves the wait."""
    tmp = tmp_path_factory.mktemp("jobs")
    sdk_run, cli_run, cli_log = tmp / "sdk-run", tmp / "cli-run", tmp / "cli.log"
    sdk_job = client.submit_job(
        entrypoint=subprocess.list2cmdline(pipeline_entrypoint(sdk_run, epochs=2)),
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
    )
    cli_job = f"cli-{uuid.uuid4().hex[:8]}"
    cmd = [ray_cli(), "job", "submit", "--address", head.dashboard_url, "--submission-id", cli_job,
           "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
           "--", *pipeline_entrypoint(cli_run, epochs=1, job="train_encoder")]
    # The CLI gets the token only from its environment: RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN_PATH.
    with open(cli_log, "w") as log:
        cli = subprocess.Popen(cmd, cwd=REPO, env=head.env, stdout=log, stderr=subprocess.STDOUT)
    yield Submissions(sdk_job, sdk_run, cli_job, cli_run, cli, cli_log)
    if cli.poll() is None:
        cli.kill()
        cli.wait()


def wait_for_job(client: JobSubmissionClient, job_id: str, timeout: float = JOB_TIMEOUT_S) -> JobStatus:
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.25)  # a status call is one small HTTP request; 2 s polls added ~1 s to every job
    if status not in TERMINAL:
        client.stop_job(job_id)
    return status


def check_run_dir(run: Path) -> None:
    for stage in ("model", "embeddings", "assignments"):
        assert (run / stage / "_manifest.json").is_file(), f"{stage}/ has no manifest: {sorted(run.iterdir())}"
    assert json.loads((run / "embeddings" / "_manifest.json").read_text())["rows"] == N_DIGITS
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRICS <= metrics.keys(), f"missing {METRICS - metrics.keys()}"
    assert 0 < metrics["acc"] <= 1, metrics
    files = sorted((run / "assignments").glob("*.parquet"))
    assert files, f"no Parquet files in {run / 'assignments'}"
    ids = np.concatenate([pq.read_table(f, columns=["id"]).column("id").to_numpy() for f in files])
    np.testing.assert_array_equal(np.sort(ids), np.arange(N_DIGITS))  # every id exactly once


def test_sdk_submit_runs_pipeline(submissions: Submissions, client: JobSubmissionClient):
    job = submissions.sdk_job
    status = wait_for_job(client, job)
    assert status == JobStatus.SUCCEEDED, f"job {job} {status}:\n{client.get_job_logs(job)}"
    check_run_dir(submissions.sdk_run)


def test_cli_submit_runs_the_training_job(submissions: Submissions, client: JobSubmissionClient):
    try:
        returncode = submissions.cli.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        returncode = None
    output = submissions.cli_log.read_text(errors="replace")
    assert returncode == 0, f"`ray job submit` exited with {returncode}:\n{output}"
    assert f"Job '{submissions.cli_job}' succeeded" in output, output
    assert client.get_job_status(submissions.cli_job) == JobStatus.SUCCEEDED
    run = submissions.cli_run
    # The job's result line, among its logs in the CLI's output.
    results = [json.loads(line) for line in output.splitlines() if line.startswith('{"run_dir"')]
    assert results == [{"run_dir": str(run), "model": str(run / "model")}], output
    manifest = json.loads((run / "model" / "_manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["epochs"] == 1 and (run / "config.yaml").is_file()
    assert not (run / "embeddings").exists()  # the training stage only


def test_sdk_submit_runs_a_stage_job_on_the_pipelines_run(submissions: Submissions, client: JobSubmissionClient):
    assert wait_for_job(client, submissions.sdk_job) == JobStatus.SUCCEEDED
    run = submissions.sdk_run
    job = client.submit_job(
        entrypoint=subprocess.list2cmdline(["python", "-m", "jobs.cluster", str(run), "--set", "cluster.k=5",
                                            "--set", "cluster.n_init=1"]),
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
    )
    status = wait_for_job(client, job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {job} {status}:\n{logs}"
    result = json.loads(logs.strip().splitlines()[-1])
    assert result["cluster"]["k"] == 5 and METRICS <= result["metrics"].keys(), result
    assert json.loads((run / "cluster.json").read_text())["k"] == 5
    assert json.loads((run / "metrics.json").read_text()) == result["metrics"]


def test_http_without_or_with_wrong_token_is_refused(head: RayHead):
    url = f"{head.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url, timeout=10)
    assert (missing.value.code, missing.value.read()) == (401, b"Unauthorized: Missing authentication token")
    wrong_token = {"Authorization": "Bearer " + "0" * 64}
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(urllib.request.Request(url, headers=wrong_token), timeout=10)
    assert (wrong.value.code, wrong.value.read()) == (403, b"Forbidden: Invalid authentication token")
    # The SDK turns a 403 into AuthenticationError already in its constructor (GET /api/version).
    with pytest.raises(AuthenticationError, match="Authentication failed: Forbidden: Invalid authentication token"):
        JobSubmissionClient(head.dashboard_url, headers=wrong_token)


def test_sdk_client_without_token_is_refused(head: RayHead, tmp_path):
    # A fresh process, so that no token this one holds (environment, ~/.ray/auth_token, Ray's cache) leaks in.
    env = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["HOME"] = str(tmp_path)  # no default ~/.ray/auth_token either
    code = (
        "import sys\n"
        "from ray.exceptions import AuthenticationError\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "try:\n"
        "    JobSubmissionClient(sys.argv[1]).submit_job(entrypoint='echo must-not-run')\n"
        "except AuthenticationError as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, head.dashboard_url], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "refused: Authentication required: Unauthorized: Missing authentication token" in done.stdout, done.stdout
