"""The `dce` command line: the whole pipeline and each stage alone, with one-line errors for bad input."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Deep Cluster Engine: train an encoder, embed, cluster and evaluate on Ray.")

ConfigArg = Annotated[str | None, typer.Argument(help="Config file or name in configs/ (default: digits).")]
RunDirArg = Annotated[Path, typer.Argument(help="Run directory written by `dce run` or `dce train`.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (default: runs/<name>).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Ray's own logs.")]


class LogFormat(str, Enum):
    text = "text"
    json = "json"


LogFormatOpt = Annotated[LogFormat, typer.Option("--log-format", help="Progress as text or JSON lines.")]


def _progress(quiet: bool, log_format: LogFormat = LogFormat.text):
    from engine.progress import JsonProgress, Progress, RichProgress

    if quiet:
        return Progress()
    return JsonProgress() if log_format == LogFormat.json else RichProgress()


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input ends with `error: <message>` on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from engine.errors import find_engine_error, user_message

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            err = find_engine_error(e)
            if err is None:
                raise
            typer.echo(f"error: {user_message(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_env(verbose: bool) -> None:
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        for name in ("ray", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _runtime(cfg, verbose: bool):
    from engine.runtime import init_ray

    return init_ray(cfg.ray.address, num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, verbose=verbose)


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
        resume: Annotated[Path | None, typer.Option("--resume", metavar="RUN_DIR", help=(
            "Continue a killed run with its saved config: finished stages are skipped."))] = None) -> None:
    """Run the whole pipeline: train, (refine for dec / idec,) embed, cluster, evaluate."""
    from engine.config import load_config
    from engine.pipeline import config_for_resume, run_pipeline

    _quiet_env(verbose)
    if resume is not None:
        cfg, out = config_for_resume(resume, overrides=set_, config=config, out=out), resume
    else:
        cfg = load_config(config, set_)
    result = run_pipeline(cfg, out, progress=_progress(quiet, log_format), verbose=verbose,
                          resume=resume is not None)
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
          verbose: VerboseOpt = False) -> None:
    """Train the encoder only; writes RUN_DIR/model/."""
    from engine.config import load_config
    from engine.pipeline import open_input, run_dir_for, train_stage

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    run_dir = run_dir_for(cfg, out)
    open_input(cfg)  # file, column and k checks before Ray starts
    _runtime(cfg, verbose)
    train_stage(cfg, run_dir, _progress(quiet))
    typer.echo(str(run_dir / "model"))


def _stage_command(stage: str) -> Callable[..., None]:
    def command(run_dir: RunDirArg, set_: SetOpt = None, quiet: QuietOpt = False,
                verbose: VerboseOpt = False) -> None:
        from engine import pipeline

        _quiet_env(verbose)
        cfg = pipeline.load_run_config(run_dir, set_)
        _runtime(cfg, verbose)
        result = getattr(pipeline, f"{stage}_stage")(cfg, run_dir, _progress(quiet))
        if stage == "evaluate":
            _print_metrics(result, str(run_dir)) if not quiet else typer.echo(json.dumps(result))
        else:
            typer.echo(str(run_dir))

    return command


app.command("refine", help="dec / idec: refine the run's pretrained model; writes RUN_DIR/refined/.")(
    friendly_errors(_stage_command("refine")))
app.command("embed", help="Embed the run's data with its model; writes RUN_DIR/embeddings/.")(
    friendly_errors(_stage_command("embed")))
@app.command("cluster")
@friendly_errors
def cluster(
    path: Annotated[Path, typer.Argument(help="A run directory, or Parquet embeddings: a folder, file or glob.")],
    config: Annotated[str | None, typer.Option("--config", "-c", help="Config for Parquet embeddings "
                                                "(its cluster section; default: digits).")] = None,
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory for Parquet embeddings "
                                             "(default: runs/<name>).")] = None,
    column: Annotated[str, typer.Option(help="Vector column of Parquet embeddings.")] = "z",
    id_column: Annotated[str | None, typer.Option(help="Id column of Parquet embeddings ('' numbers the rows)."
                                                  )] = "id",
    label_column: Annotated[str | None, typer.Option(help="Optional label column of Parquet embeddings.")] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Cluster with the config's cluster.method; writes centroids.npy, cluster.json and assignments/.

    PATH is a run directory (its embeddings/), or embeddings made elsewhere as Parquet (a folder, file or
    glob): they are checked, imported into the run directory --out, and clustered there.
    """
    from engine import pipeline
    from engine.config import config_from_dict, load_config

    _quiet_env(verbose)
    progress = _progress(quiet)
    if (path / pipeline.CONFIG_FILE).is_file():
        if config is not None or out is not None:
            from engine.errors import ConfigError

            raise ConfigError(f"{path} is a run directory: it has its own config and outputs, so --config and "
                              "--out (for Parquet embeddings) do not apply")
        cfg = pipeline.load_run_config(path, set_)
        run_dir = path
        _runtime(cfg, verbose)
    else:
        if path.is_dir() and not any(path.rglob("*.parquet")):
            from engine.errors import IncompleteResultError

            raise IncompleteResultError(f"{path}: not a run directory (no {pipeline.CONFIG_FILE}) and no Parquet "
                                        "embeddings in it")
        data = {"source": "parquet", "path": str(path), "column": column, "id_column": id_column or None,
                "label_column": label_column, "normalize": "none"}
        cfg = config_from_dict({**load_config(config, set_).to_dict(), "data": data}, source=f"{path}")
        run_dir = pipeline.run_dir_for(cfg, out)
        pipeline.open_input(cfg, check_model=False)  # file, column and k checks before Ray starts
        _runtime(cfg, verbose)
        pipeline.import_embeddings(cfg, run_dir, progress)
    summary = pipeline.cluster_stage(cfg, run_dir, progress)
    if not quiet:
        typer.echo(f"{run_dir}: {summary['method']} k={summary['k']}, inertia {summary['inertia']:.6g}")
    else:
        typer.echo(str(run_dir))


app.command("evaluate", help="Metrics of RUN_DIR's assignments; writes metrics.json.")(
    friendly_errors(_stage_command("evaluate")))


@app.command()
@friendly_errors
def prepare(config: ConfigArg = None, set_: SetOpt = None,
            out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the Parquet shards.")] = Path("data"),
            verbose: VerboseOpt = False) -> None:
    """Write the config's data source as Parquet shards (id, x, label), streaming; usable as a parquet source."""
    from engine.config import load_config
    from engine.data.prepare import prepare_source

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    from engine.data import open_source

    open_source(cfg.data)  # file and column checks before Ray starts
    _runtime(cfg, verbose)
    manifest = prepare_source(cfg.data, out, config_hash=cfg.hash())
    typer.echo(f"{out}: {manifest['rows']} rows in {len(manifest['files'])} shard(s)")


@app.command()
@friendly_errors
def federate(config: ConfigArg = None, set_: SetOpt = None, out: OutOpt = None, quiet: QuietOpt = False,
             verbose: VerboseOpt = False, log_format: LogFormatOpt = LogFormat.text) -> None:
    """Federated k-means over the config's partitions: only centroids, counts and sums leave each one."""
    from engine.config import load_config
    from engine.federated.run import run_federated

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    result = run_federated(cfg, out, progress=_progress(quiet, log_format), verbose=verbose)
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
    app(prog_name="dce")


if __name__ == "__main__":
    sys.exit(main())
