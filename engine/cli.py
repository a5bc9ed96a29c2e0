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
        verbose: VerboseOpt = False, log_format: LogFormatOpt = LogFormat.text) -> None:
    """Run the whole pipeline: train, (refine for dec / idec,) embed, cluster, evaluate."""
    from engine.config import load_config
    from engine.pipeline import run_pipeline

    _quiet_env(verbose)
    cfg = load_config(config, set_)
    result = run_pipeline(cfg, out, progress=_progress(quiet, log_format), verbose=verbose)
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
app.command("cluster", help="K-means on RUN_DIR/embeddings; writes centroids.npy and assignments/.")(
    friendly_errors(_stage_command("cluster")))
app.command("evaluate", help="Metrics of RUN_DIR's assignments; writes metrics.json.")(
    friendly_errors(_stage_command("evaluate")))


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
