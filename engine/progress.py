"""Stage progress for the user: rich status lines on a terminal, JSON lines for logs, or nothing."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

# The counts in a training epoch's record (engine.train's history): bookkeeping, not loss terms or measurements.
BOOKKEEPING = frozenset({"epoch", "rows", "augmented_rows"})


def epoch_terms(metrics: dict[str, Any]) -> str:
    """An epoch record's loss terms for a status line: "loss 0.1234  kl 0.05" (counts and seconds left out)."""
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                     if k not in BOOKKEEPING and k != "seconds" and isinstance(v, float))


class Progress:
    """Silent progress: what library callers get unless they ask for output."""

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        yield

    def epoch(self, metrics: dict[str, Any]) -> None:
        pass

    def iteration(self, record: dict[str, Any]) -> None:
        """One k-means iteration (`KMeans.history_` record)."""

    def info(self, message: str) -> None:
        pass


class RichProgress(Progress):
    """One line per stage with a spinner while it runs, its epochs and losses, and its time when done."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self._status = None
        self._name = ""
        self._epochs: int | None = None

    def set_epochs(self, epochs: int) -> None:
        self._epochs = epochs

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        self._name = name
        t0 = time.perf_counter()
        label = f"[bold cyan]{name}[/] {detail}".rstrip()
        with self.console.status(label) as status:
            self._status = status
            try:
                yield
            except BaseException as e:
                what = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                self.console.print(f"[bold red]✗[/] {name} {what} after {time.perf_counter() - t0:.1f} s")
                raise
            finally:
                self._status = None
        self.console.print(f"[bold green]✓[/] {name} [dim]{detail}[/] {time.perf_counter() - t0:.1f} s")

    def epoch(self, metrics: dict[str, Any]) -> None:
        total = f"/{self._epochs}" if self._epochs else ""
        line = f"[bold cyan]{self._name}[/] epoch {metrics.get('epoch')}{total}  {epoch_terms(metrics)}"
        if self._status is not None:
            self._status.update(line)

    def iteration(self, record: dict[str, Any]) -> None:
        if self._status is not None:
            where = f"{record['level']} " if "level" in record else ""
            where += f"part {record['part']} " if "part" in record else f"restart {record.get('run', 1)} "
            self._status.update(f"[bold cyan]{self._name}[/] {where}"
                                f"iteration {record['iter']}  objective {record['objective']:.6g}")

    def info(self, message: str) -> None:
        self.console.print(f"  {message}")


class JsonProgress(Progress):
    """One JSON object per event on stderr, for log collectors."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def _emit(self, **event: Any) -> None:
        self.stream.write(json.dumps({"time": time.time(), **event}) + "\n")
        self.stream.flush()

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        t0 = time.perf_counter()
        self._emit(event="stage_start", stage=name, detail=detail)
        try:
            yield
        except KeyboardInterrupt:
            self._emit(event="stage_interrupted", stage=name, seconds=time.perf_counter() - t0)
            raise
        except BaseException as e:
            self._emit(event="stage_failed", stage=name, error=str(e), seconds=time.perf_counter() - t0)
            raise
        self._emit(event="stage_end", stage=name, seconds=time.perf_counter() - t0)

    def epoch(self, metrics: dict[str, Any]) -> None:
        self._emit(event="epoch", **metrics)

    def iteration(self, record: dict[str, Any]) -> None:
        self._emit(event="iteration", **record)

    def info(self, message: str) -> None:
        self._emit(event="info", message=message)
