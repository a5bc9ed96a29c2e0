"""The `dce` command line: the whole pipeline and each stage alone, with one-line errors for bad input."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from engine.rundir import RunDir

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Deep Cluster Engine: train an encoder, embed, cluster and evaluate on Ray.")

ConfigArg = Annotated[str | None, typer.Argument(help="Config file or name in configs/ (default: digits).")]
RunDirArg = Annotated[str, typer.Argument(help="Run directory written by `dce run` or `dce train` (a path or "
                                             "an object store URI).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")]
OutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Run directory, a path or an object store URI "
                                            "such as s3://bucket/runs/name (default: runs/<name>).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs.")]


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class FederatedBackend(str, Enum):
    ray = "ray"
    flower = "flower"


LogFormatOpt = Annotated[LogFormat, typer.Option("--log-format", help="Progress as text or JSON lines.")]


def _progress(quiet: bool, log_format: LogFormat = LogFormat.text):
    from engine.progress import JsonProgress, Progress, RichProgress

    if quiet:
        return Progress()
    return JsonProgress() if log_format == LogFormat.json else RichProgress()


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with `error: <message>` on stderr and exit code 2, never a traceback; Ctrl-C and SIGTERM end
    with `interrupted: ...`, exit code 130 or 143, and Ray shut down."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.interrupt import command_outcome

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as e:
            outcome = command_outcome(e)
            if outcome is None:
                raise
            code, line = outcome
            if code != 2:
                _shutdown_ray()
            typer.echo(line, err=True)
            raise typer.Exit(code) from None

    return wrapper


def _shutdown_ray() -> None:
    """Stop this process's Ray (a local one with its workers; a joined cluster is only left)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


EmbeddingsArg = Annotated[str, typer.Argument(help="Parquet embeddings: a run's embeddings/, a folder, file, glob "
                                             "or object store URI.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the engine's own results in an existing "
                                            "--out (folders with its manifest); other files are never touched.")]


def _quiet_env(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _runtime(cfg, verbose: bool):
    from engine.runtime import init_ray

    return init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, verbose=verbose)


@contextlib.contextmanager
def _run_dir(cfg, run_dir: str | Path, verbose: bool, *, fetch: bool) -> Iterator[RunDir]:
    """Ray started or joined, then the run directory as the stages see it (checked on a multi-node cluster;
    staged and published for an object-store URI)."""
    from engine.rundir import open_run_dir

    with open_run_dir(run_dir, cfg.ray, nodes=_runtime(cfg, verbose).worker_nodes, fetch=fetch) as run:
        yield run


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


@app.command()
@friendly_errors
def run(config: ConfigArg = None, set_: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False,
        verbose: VerboseOpt = False, log_format: LogFormatOpt = LogFormat.text,
        no_report: Annotated[bool, typer.Option("--no-report", help="Skip the report stage "
                                                "(report.enabled=false).")] = False,
        resume: Annotated[Path | None, typer.Option("--resume", metavar="RUN_DIR", help=(
            "Continue a killed run with its saved config: finished stages are skipped."))] = None,
        pretrained: Annotated[Path | None, typer.Option("--pretrained", metavar="RUN_DIR", help=(
            "Take the trained model of RUN_DIR (or a model/ folder, or a checkpoint.pt) instead of training: "
            "it must be the model the config builds. Then refine / embed / cluster as configured."))] = None,
        overwrite: OverwriteOpt = False,
        ) -> None:
    """Run the whole pipeline: train, (refine for dec / idec,) embed, cluster, evaluate, report."""
    from engine.config import load_config
    from engine.pipeline import config_for_resume, run_pipeline

    _quiet_env(verbose)
    if resume is not None:
        if no_report:
            from engine.errors import ConfigError

            raise ConfigError("--no-report cannot be used with --resume: a resumed run continues with its saved "
                              "config (report.enabled)")
        cfg, out = config_for_resume(resume, overrides=set_, config=config, out=out), resume
    else:
        cfg = load_config(config, [*(set_ or []), *(["report.enabled=false"] if no_report else [])])
    result = run_pipeline(cfg, out, progress=_progress(quiet, log_format), verbose=verbose,
                          resume=resume is not None, pretrained=pretrained, overwrite=overwrite)
    if log_format == LogFormat.json:
        typer.echo(json.dumps({"run_dir": str(result.run_dir), "metrics": result.metrics,
                               "seconds": result.seconds}))
    elif not quiet:
        _print_metrics(result.metrics, f"{cfg.name}: {result.run_dir}")
    else:
        typer.echo(str(result.run_dir))


@app.command()
@friendly_errors
def train(config: ConfigArg = None, set_: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False,
          verbose: VerboseOpt = False, overwrite: OverwriteOpt = False) -> None:
    """Train the encoder only; writes RUN_DIR/model/."""
    from engine import storage
    from engine.config import load_config
    from engine.pipeline import open_input, train_stage
    from engine.rundir import check_output, guard_output, run_dir_for

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    run_dir = run_dir_for(cfg, out)
    output = check_output(cfg, run_dir, overwrite=overwrite)  # first: a refusal need not import torch
    open_input(cfg)  # file, column and k checks before Ray starts
    with guard_output(output, resumable=False), _run_dir(cfg, run_dir, verbose, fetch=False) as run:
        train_stage(cfg, run, _progress(quiet))
    typer.echo(storage.join(run_dir, "model"))


def _stage_command(stage: str) -> Callable[..., None]:
    def command(run_dir: RunDirArg, set_: SetOpt = None, quiet: QuietOpt = False,
                verbose: VerboseOpt = False) -> None:
        from engine import pipeline
        from engine.rundir import check_run_writable

        _quiet_env(verbose)
        cfg = pipeline.load_run_config(run_dir, set_)
        check_run_writable(run_dir)
        with _run_dir(cfg, run_dir, verbose, fetch=True) as run:
            result = getattr(pipeline, f"{stage}_stage")(cfg, run, _progress(quiet))
        if stage == "evaluate":
            _print_metrics(result, str(run_dir)) if not quiet else typer.echo(json.dumps(result))
        else:
            typer.echo(str(run_dir))

    return command


app.command("refine", help="dec / idec: refine the run's pretrained model; writes RUN_DIR/refined/.")(
    friendly_errors(_stage_command("refine")))
app.command("embed", help="Embed the run's data with its model; writes RUN_DIR/embeddings/.")(
    friendly_errors(_stage_command("embed")))


EmbeddingsPathArg = Annotated[str, typer.Argument(help="A run directory, or Parquet embeddings: a folder, "
                                                  "file or glob.")]
EmbeddingsConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="Config for Parquet embeddings "
                                                         "(its cluster section; default: plain k-means, "
                                                         "cluster.k=10, cluster.manifold=none).")]
EmbeddingsOutOpt = Annotated[str | None, typer.Option("--out", "-o", help="Run directory for Parquet embeddings "
                                                       "(default: runs/<name>).")]
ColumnOpt = Annotated[str, typer.Option(help="Vector column of Parquet embeddings.")]
IdColumnOpt = Annotated[str | None, typer.Option(help="Id column of Parquet embeddings ('' numbers the rows).")]
LabelColumnOpt = Annotated[str | None, typer.Option(help="Optional label column of Parquet embeddings.")]


@contextlib.contextmanager
def _run_or_embeddings(path: str, config: str | None, set_: list[str] | None, out: str | None, column: str,
                       id_column: str | None, label_column: str | None, verbose: bool,
                       progress, overwrite: bool = False) -> Iterator[tuple[Any, str, RunDir]]:
    """(config, run directory, the RunDir the stages get) of PATH: a run directory as it is, or Parquet embeddings made
    elsewhere, checked and imported into the run directory --out. Ray is connected inside; an object-store
    run directory is published on exit, as every stage command does."""
    from engine import pipeline, storage
    from engine.config import config_from_dict, load_config
    from engine.errors import ConfigError
    from engine.rundir import Output, check_output, check_run_writable, guard_output, run_dir_for

    is_run = storage.is_file(storage.join(path, pipeline.CONFIG_FILE))
    if is_run:
        if config is not None or out is not None or overwrite:
            raise ConfigError(f"{path} is a run directory: it has its own config and outputs, so --config, "
                              "--out and --overwrite (for Parquet embeddings) do not apply")
        cfg = pipeline.load_run_config(path, set_)
        run_dir = path
        check_run_writable(run_dir)
        output = Output(run_dir, fresh=False, created=False)
    else:
        folder = Path(path)
        if folder.is_dir() and not any(folder.rglob("*.parquet")):
            from engine.errors import IncompleteResultError

            raise IncompleteResultError(f"{path}: not a run directory (no {pipeline.CONFIG_FILE}) and no Parquet "
                                        "embeddings in it")
        data = {"source": "parquet", "path": str(path), "column": column, "id_column": id_column or None,
                "label_column": label_column, "normalize": "none"}
        # Without --config: the engine's plain defaults (k-means, no manifold), not the digits recipe's UMAP + GMM.
        base = load_config(config).to_dict() if config is not None else {"name": "embeddings"}
        cfg = config_from_dict({**base, "data": data}, set_, source=f"{path}")
        if cfg.cluster.method == "posterior":
            raise ConfigError(f"cluster.method=posterior labels rows by a trained model's posterior q(c|x), and "
                              f"embeddings imported from {path} come without a model; choose another "
                              f"cluster.method, or cluster a run directory")
        run_dir = run_dir_for(cfg, out)
        output = check_output(cfg, run_dir, overwrite=overwrite, resume_command=None)
        pipeline.open_input(cfg, check_model=False)  # file, column and k checks before Ray starts
    with guard_output(output, resumable=False), _run_dir(cfg, run_dir, verbose, fetch=is_run) as run:
        if not is_run:
            pipeline.import_embeddings(cfg, run, progress)
        yield cfg, str(run_dir), run


@app.command("cluster")
@friendly_errors
def cluster(
    path: EmbeddingsPathArg,
    config: EmbeddingsConfigOpt = None,
    set_: SetOpt = None,
    out: EmbeddingsOutOpt = None,
    column: ColumnOpt = "z",
    id_column: IdColumnOpt = "id",
    label_column: LabelColumnOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cluster with the config's cluster.method; writes centroids.npy, cluster.json and assignments/.

    PATH is a run directory (its embeddings/), or embeddings made elsewhere as Parquet (a folder, file or
    glob): they are checked, imported into the run directory --out, and clustered there.
    """
    from engine import pipeline

    _quiet_env(verbose)
    progress = _progress(quiet)
    with _run_or_embeddings(path, config, set_, out, column, id_column, label_column, verbose,
                            progress, overwrite) as (cfg, run_dir, run):
        summary = pipeline.cluster_stage(cfg, run, progress)
    if not quiet:
        typer.echo(f"{run_dir}: {summary['method']} k={summary['k']}, inertia {summary['inertia']:.6g}")
    else:
        typer.echo(str(run_dir))


app.command("evaluate", help="Metrics of RUN_DIR's assignments; writes metrics.json.")(
    friendly_errors(_stage_command("evaluate")))


@app.command()
@friendly_errors
def report(run_dir: RunDirArg, set_: SetOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = False,
           log_format: LogFormatOpt = LogFormat.text) -> None:
    """(Re)build RUN_DIR/report/index.html, one self-contained page, and its PNGs (--set report.map=umap ...)."""
    from engine import pipeline

    _quiet_env(verbose)
    from engine import storage
    from engine.rundir import check_run_writable

    cfg = pipeline.load_run_config(run_dir, set_)
    check_run_writable(run_dir)
    # Ray too: the image section reads sample rows of the input with Ray Data.
    with _run_dir(cfg, run_dir, verbose, fetch=True) as run:
        index = pipeline.report_stage(cfg, run, _progress(quiet, log_format))
    index = storage.join(run_dir, str(index.relative_to(run.local)))
    typer.echo(json.dumps({"report": index}) if log_format == LogFormat.json else index)


@app.command("sweep-k")
@friendly_errors
def sweep_k(
    path: EmbeddingsPathArg,
    k: Annotated[str, typer.Option("--k", help="The ks to try: a range 2..30 or a list 2,4,8.")] = "2..30",
    config: EmbeddingsConfigOpt = None,
    set_: SetOpt = None,
    out: EmbeddingsOutOpt = None,
    column: ColumnOpt = "z",
    id_column: IdColumnOpt = "id",
    label_column: LabelColumnOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = LogFormat.text,
    overwrite: OverwriteOpt = False,
) -> None:
    """K-means of the embeddings for each k (Ray tasks sharing one copy of them): inertia, silhouette,
    Davies-Bouldin, Calinski-Harabasz, a plot and the suggested k (highest silhouette) in RUN_DIR/sweep_k/.

    PATH is a run directory or Parquet embeddings (imported into --out, as `dce cluster` does).
    """
    from engine.data import read_manifest
    from engine.sweep_k import RULE, SWEEP_DIR, check_ks, parse_k_range, sweep_run

    _quiet_env(verbose)
    ks = parse_k_range(k)  # before Ray starts
    progress = _progress(quiet, log_format)
    with _run_or_embeddings(path, config, set_, out, column, id_column, label_column, verbose,
                            progress, overwrite) as (cfg, run_dir, run):
        check_ks(ks, read_manifest(run.folder("embeddings"), stage="embed")["rows"])

        def on_result(r: dict[str, Any]) -> None:
            progress.info(f"k={r['k']}: " + ", ".join(
                f"{key} {'—' if r[key] is None else f'{r[key]:.4g}'}"
                for key in ("inertia", "silhouette", "davies_bouldin", "calinski_harabasz")))

        with progress.stage("sweep-k", f"k = {ks[0]}..{ks[-1]} ({len(ks)} values)"):
            sweep = sweep_run(run, cfg, ks, on_result=on_result)
    from engine import storage

    where = storage.join(run_dir, SWEEP_DIR)
    if log_format == LogFormat.json:
        typer.echo(json.dumps({"run_dir": str(run_dir), **sweep}))
    elif quiet:
        typer.echo(where)
    else:
        from rich.console import Console
        from rich.table import Table

        keys = ("inertia", "silhouette", "davies_bouldin", "calinski_harabasz")
        table = Table(title=f"{where}: suggested k = {sweep['suggested_k']} ({RULE})")
        for name in ("k", *keys):
            table.add_column(name, justify="right")
        for r in sweep["results"]:
            table.add_row(str(r["k"]), *("—" if r[key] is None else f"{r[key]:.4g}" for key in keys))
        Console().print(table)


@app.command()
@friendly_errors
def assign(
    run_dir: RunDirArg,
    input_: Annotated[Path, typer.Option("--input", "-i", help="New rows: Parquet (a file, folder or glob) with "
                                         "the run's raw input column, or a .npy matrix / images.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the assignments (id, cluster, distance): a "
                                     "path or an object store URI.")],
    column: Annotated[str, typer.Option(help="Vector column of Parquet input.")] = "x",
    id_column: Annotated[str | None, typer.Option(help="Id column of Parquet input ('' numbers the rows).")] = "id",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    log_format: LogFormatOpt = LogFormat.text,
    overwrite: OverwriteOpt = False,
) -> None:
    """Embed new rows with the run's model (and its input normalisation) and give each its nearest centroid,
    streaming with Ray Data; writes --out like RUN_DIR/assignments/."""
    from engine.predict import assign_source, check_assign_output, input_source, load_run, open_new_rows
    from engine.rundir import load_run_config
    from engine.runtime import use_gpu

    _quiet_env(verbose)
    progress = _progress(quiet, log_format)
    load_run_config(run_dir)  # a folder that is no run is said first
    data = input_source(input_, column=column, id_column=id_column or None)
    check_assign_output(run_dir, data, out, overwrite=overwrite)  # then the output: no model loaded to refuse it
    run = load_run(run_dir)
    source = open_new_rows(run, data)
    _runtime(run.config, verbose)  # after every check on the run, the input and the output
    with progress.stage("assign", f"{source.n_rows} rows of {input_} to {len(run.centroids)} clusters"):
        manifest = assign_source(run, source, out, use_gpu=use_gpu(run.config.embed.use_gpu), overwrite=overwrite)
        progress.info(f"{manifest['rows']} rows in {len(manifest['files'])} shard(s)")
    if log_format == LogFormat.json:
        typer.echo(json.dumps({"out": out, "rows": manifest["rows"], "k": manifest["k"]}))
    else:
        typer.echo(out)


def _floats(text: str, flag: str) -> list[float]:
    from engine.errors import ConfigError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}={text!r} should be a comma-separated list of numbers") from None


@app.command()
@friendly_errors
def dedup(
    path: EmbeddingsArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for kept/, duplicates/ and summary.json.")],
    eps: Annotated[float, typer.Option(help="Remove rows whose cosine similarity to a kept row exceeds 1 - eps.")]
    = 0.05,
    k: Annotated[int | None, typer.Option("--k", help="Spherical k-means clusters (default: rows / 1000).")] = None,
    probes: Annotated[int, typer.Option(help="At most this many clusters each row is compared in: its own and the "
                                        "next-nearest where a pair is possible (1: within-cluster only, misses "
                                        "pairs split across clusters).")] = 5,  # = curate.dedup.DEFAULT_PROBES
    keep: Annotated[str, typer.Option(help="Which row of a duplicate group stays: hard (farthest from the "
                                      "centroid), easy (closest) or random.")] = "hard",
    seed: Annotated[int, typer.Option(help="Seed of the k-means sample and of --keep random.")] = 0,
    summary_eps: Annotated[str, typer.Option(help="Also count the rows each of these eps would remove "
                                             "(same pass).")] = "0.001,0.005,0.01,0.02,0.05,0.1,0.2",
    column: ColumnOpt = "z",
    id_column: Annotated[str, typer.Option(help="Id column of the embeddings.")] = "id",
    state_dir: Annotated[str | None, typer.Option(help="Local folder for the unfinished run's state (default: "
                                                  "beside a local --out, the temp folder for an object store); on "
                                                  "a cluster, one every node mounts.")] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Semantic deduplication (SemDeDup): spherical k-means, then exact cosine similarity within each cluster on
    Ray workers. A rerun of a killed or interrupted run continues from its finished clusters."""
    from engine.curate import dedup as run_dedup
    from engine.curate.dedup import check_settings
    from engine.curate.output import check_result_output, check_state_dir
    from engine.curate.source import open_embeddings
    from engine.rundir import guard_output
    from engine.runtime import curation_cpus, init_ray

    _quiet_env(verbose)
    eps_list = _floats(summary_eps, "--summary-eps")
    check_settings(eps, k, keep, eps_list, 1, None, probes)
    rows = open_embeddings(path, column=column, id_column=id_column).n_rows  # file and column checks before Ray
    if k is not None and k > rows:
        from engine.errors import ConfigError

        raise ConfigError(f"--k={k} should be <= the number of rows, {rows}")
    output = check_result_output(out, path, overwrite=overwrite)
    check_state_dir(state_dir, out, path)
    init_ray(num_cpus=curation_cpus(), verbose=verbose)
    progress = _progress(quiet)
    with guard_output(output, resumable=False):
        summary = run_dedup(path, out, eps=eps, k=k, keep=keep, seed=seed, column=column, id_column=id_column,
                            summary_eps=eps_list, probes=probes, overwrite=overwrite, state_dir=state_dir,
                            on_progress=lambda stage, info: progress.info(f"{stage}: {info}"))
    typer.echo(out if quiet else f"{out}: kept {summary['kept']} of {summary['rows']} rows, removed "
               f"{summary['removed']} (eps {eps}, k {summary['k']}, keep {keep})")


@app.command()
@friendly_errors
def sample(
    path: EmbeddingsArg,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for sampled/, hierarchy/ and summary.json.")],
    n: Annotated[int, typer.Option("--n", help="Rows to draw.")],
    levels: Annotated[int, typer.Option(help="Levels of the k-means hierarchy.")] = 3,
    k: Annotated[str | None, typer.Option("--k", help="Clusters per level, bottom up: 1000,200,40 (default: rows "
                                          "/ 50 at most 4096, then 5x fewer a level).")] = None,
    strategy: Annotated[str, typer.Option(help="Within a level-1 cluster: random or closest (to its "
                                          "centroid).")] = "random",
    resample_steps: Annotated[int, typer.Option(help="Resampling steps per level (Vo et al. 2024).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the sample, k-means and the draws.")] = 0,
    column: ColumnOpt = "z",
    id_column: Annotated[str, typer.Option(help="Id column of the embeddings.")] = "id",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Cluster-balanced sampling (Vo et al. 2024): hierarchical k-means with resampling steps, then N rows drawn
    evenly across the hierarchy."""
    from engine.curate import sample as run_sample
    from engine.curate.output import check_result_output
    from engine.curate.sample import check_rows, check_settings
    from engine.curate.source import open_embeddings
    from engine.rundir import guard_output
    from engine.runtime import curation_cpus, init_ray

    _quiet_env(verbose)
    ks = None if k is None else [int(v) for v in _floats(k, "--k")]
    check_settings(n, levels, ks, strategy, resample_steps)
    check_rows(n, levels, ks, open_embeddings(path, column=column, id_column=id_column).n_rows)
    output = check_result_output(out, path, overwrite=overwrite)
    init_ray(num_cpus=curation_cpus(), verbose=verbose)
    progress = _progress(quiet)
    with guard_output(output, resumable=False):
        summary = run_sample(path, out, n=n, levels=levels, k=ks, strategy=strategy, resample_steps=resample_steps,
                             seed=seed, column=column, id_column=id_column, overwrite=overwrite,
                             on_progress=lambda stage, info: progress.info(f"{stage}: {info}"))
    typer.echo(out if quiet else f"{out}: {summary['n']} of {summary['rows']} rows from "
               f"{summary['clusters_drawn_from']} clusters (k per level {summary['k']})")


@app.command()
@friendly_errors
def prepare(config: ConfigArg = None, set_: SetOpt = None,
            out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the Parquet shards.")] = Path("data"),
            verbose: VerboseOpt = False, overwrite: OverwriteOpt = False) -> None:
    """Write the config's data source as Parquet shards (id, x, label), streaming; usable as a parquet source."""
    from engine.config import load_config
    from engine.data import open_source
    from engine.data.prepare import check_prepare_output, prepare_source

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    check_prepare_output(cfg.data, out, overwrite=overwrite)  # first: a refusal need not read the input
    open_source(cfg.data)  # file and column checks before Ray starts
    _runtime(cfg, verbose)
    manifest = prepare_source(cfg.data, out, config_hash=cfg.hash(), overwrite=overwrite)
    typer.echo(f"{out}: {manifest['rows']} rows in {len(manifest['files'])} shard(s)")


@app.command()
@friendly_errors
def federate(config: ConfigArg = None, set_: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False,
             verbose: VerboseOpt = False, log_format: LogFormatOpt = LogFormat.text,
             overwrite: OverwriteOpt = False,
             backend: Annotated[FederatedBackend | None, typer.Option(
                 help="ray: Ray actors host the clients; flower: a Flower ServerApp and ClientApps, on Flower's "
                      "simulation engine or, with federated.flower.address, on a SuperLink's SuperNodes "
                      "(default: federated.backend).")] = None) -> None:
    """Federated k-means over the config's partitions: only centroids, counts and sums leave each one."""
    from engine.config import load_config
    from engine.federated.run import run_federated

    _quiet_env(verbose)
    cfg = load_config(config, [*(set_ or []), *([f"federated.backend={backend.value}"] if backend else [])])
    result = run_federated(cfg, out, progress=_progress(quiet, log_format), verbose=verbose, overwrite=overwrite)
    s = result.summary
    if log_format == LogFormat.json:
        typer.echo(json.dumps({"run_dir": str(result.run_dir), "summary": s}, default=float))
    elif quiet:
        typer.echo(str(result.run_dir))
    else:
        reference = s["reference"] or {}
        privacy = s["privacy"] or {}
        _print_metrics({"mode": s["mode"], "partitions": len(s["partitions"]), "rounds": s["rounds"],
                        "inertia": s["inertia"], "inertia / centralised": reference.get("inertia_ratio"),
                        "ARI to centralised": reference.get("ari_to_centralised"), "bytes up": s["bytes_up"],
                        "bytes down": s["bytes_down"], "dropouts": len(s["dropouts"]),
                        "epsilon spent": privacy.get("epsilon")}, f"{cfg.name}: {result.run_dir}")


@app.command()
def datasets() -> None:
    """List the built-in data sources."""
    from rich.console import Console
    from rich.table import Table

    from engine.data import SOURCES

    table = Table(title="data sources (data.source)")
    table.add_column("source")
    table.add_column("what it is")
    for name, what in SOURCES.items():
        table.add_row(name, what)
    Console().print(table)


def main() -> None:
    from engine import interrupt

    interrupt.install()
    app(prog_name="dce")


if __name__ == "__main__":
    sys.exit(main())
