"""Shared by the benchmark scripts: the machine's description and appending a table to RESULTS.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def append_section(title: str, header: list[str], rows: list[list[object]], notes: str = "",
                   measured: str | None = None) -> None:
    """Append one dated markdown section; earlier sections are never rewritten.

    `measured`: the "date · machine" line of results measured elsewhere (another machine's JSON lines
    recorded here); by default today and this machine.
    """
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    lines = [
        "",
        f"## {title}",
        "",
        measured or f"{_dt.date.today().isoformat()} · {machine()}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
