"""The suite's common result format: one JSON report, a Markdown table and a PNG plot per section.

Every report starts with the same header, so a committed result says where and how it was measured:

    {"section": "train", "command": "...", "timestamp": "2025-...Z",
     "machine": {"platform", "machine", "python", "cpu_count", "load_average", "backend", "device_kind",
                 "device_count", "versions": {"jax", "jaxlib", "flax", "optax", "numpy", "torch"?}},
     ...the section's own fields...}

Plots are drawn on an Agg canvas without ``pyplot`` (as in ``attn_jax.plots``): no display needed, nothing
kept in a global figure registry.
"""

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")
MIB = 2.0**20


def versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (absent ones are left out)."""
    found = {}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def machine() -> dict:
    """Where this process runs: OS, CPUs and their load, the JAX backend and its devices, package versions."""
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "backend": jax.default_backend(),
        "device_kind": str(devices[0].device_kind),
        "device_count": len(devices),
        "versions": versions(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, from the repository root."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([".venv/bin/python", "-m", "attn_jax.bench", *argv])


def header(section: str, argv: Sequence[str] | None = None) -> dict:
    """The fields every report starts with."""
    return {
        "section": section,
        "command": command_line(argv),
        "timestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
    }


def machine_line(report: dict) -> str:
    """One Markdown line naming the machine, the versions and the command of a report."""
    m = report["machine"]
    versions_text = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs (load {m['load_average']}), backend {m['backend']} "
        f"({m['device_count']} x {m['device_kind']}); {versions_text}. {report['timestamp']}. "
        f"Command: `{report['command']}`."
    )


def table(columns: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> list[str]:
    """A Markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: all right).

    Example:
      >>> print("\\n".join(table(["a", "b"], [[1, "x"]], align="rl")))
      | a | b |
      |---:|:---|
      | 1 | x |
    """
    align = align or "r" * len(columns)
    rule = "|".join("---:" if a == "r" else ":---" for a in align)
    lines = ["| " + " | ".join(columns) + " |", f"|{rule}|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def new_figure(panels: int = 1, *, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list]:
    """A figure of ``panels`` side-by-side axes on an Agg canvas."""
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def write(
    out_dir: str | os.PathLike, name: str, report: dict, markdown: str, figure: Figure | None = None
) -> list[Path]:
    """Writes ``name.json`` (the report), ``name.md`` and ``name.png`` under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(report, indent=2, default=float) + "\n")
    paths[1].write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    if figure is not None:
        paths.append(out_dir / f"{name}.png")
        figure.savefig(paths[-1], dpi=100)
    return paths


def fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    """``format(value, spec)``; ``missing`` for None, and booleans as ``yes``/``NO``.

    Example:
      >>> fmt(0.123456), fmt(None), fmt(3, ".1f"), fmt(False)
      ('0.123', '-', '3.0', 'NO')
    """
    if value is None:
        return missing
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def check(name: str, value, target: str, passed: bool | None) -> dict:
    """One target of the issue: ``passed`` is None when this run could not decide it (e.g. a smaller size)."""
    return {"name": name, "value": value, "target": target, "passed": passed}


def checks_table(checks: Sequence[dict]) -> list[str]:
    """The targets of a report as Markdown lines."""
    rows = [[c["name"], fmt(c["value"]), c["target"], fmt(c["passed"])] for c in checks]
    return ["Targets:", ""] + table(["check", "value", "target", "passed"], rows, align="lrll")
