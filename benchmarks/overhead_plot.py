"""Plots of one overhead run, from the ``overhead-<date>.json`` that ``overhead.py``
writes beside its report: CPU per streamed chunk (EPP and Envoy) per cell, and
throughput relative to plain Envoy round-robin (a) per cell, as PNGs next to the .json.

Needs only matplotlib and the standard library, so any venv that has matplotlib can
draw them::

    python benchmarks/overhead_plot.py benchmarks/results/overhead-<date>.json

Prints the path of every PNG it wrote, one per line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# The goals, drawn as reference lines.
GOAL_EPP_US_PER_CHUNK = 25.0
GOAL_RPS_RATIO_C16 = {"json-1024": 0.5, "json-32768": 0.7}
EPP_COLOR, ENVOY_COLOR = "#1f77b4", "#ff7f0e"


def _cell_name(row: dict[str, Any]) -> str:
    scenario = row["scenario_label"].split(")")[0] + ")"
    return f"{scenario} {row['workload_label']}, c={row['concurrency']}"


def plot_cpu_per_chunk(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Grouped bars: EPP and Envoy CPU µs per streamed chunk, one pair per streamed cell
    with an EPP in the path."""
    cells = [r for r in rows if r["streaming"] and r["epp_us_per_chunk"] is not None
             and r["scenario"] not in ("a", "c")]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(cells) + 2), 5.5))
    xs = range(len(cells))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r["epp_us_per_chunk"] for r in cells], width,
           label="EPP", color=EPP_COLOR)
    ax.bar([x + width / 2 for x in xs], [r["envoy_us_per_chunk"] or 0 for r in cells], width,
           label="Envoy", color=ENVOY_COLOR)
    ax.axhline(GOAL_EPP_US_PER_CHUNK, color="black", linestyle="--", linewidth=1,
               label=f"goal: EPP ≤ {GOAL_EPP_US_PER_CHUNK:g} µs (c=16)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([_cell_name(r) for r in cells], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("CPU µs per streamed chunk")
    ax.set_title("CPU per streamed chunk (SSE), by process")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput_ratio(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One bar per cell with an EPP in the path: its req/s ÷ (a)'s in the same run. Paced
    streams are left out: their throughput is set by the pods' decode step."""
    cells = [r for r in rows if r["rps_ratio_to_a"] is not None and not r["paced"]]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(cells) + 2), 5.5))
    colors = [ENVOY_COLOR if r["streaming"] else EPP_COLOR for r in cells]
    ax.bar(range(len(cells)), [r["rps_ratio_to_a"] for r in cells], color=colors)
    for workload, goal in GOAL_RPS_RATIO_C16.items():
        xs = [i for i, r in enumerate(cells)
              if r["workload"] == workload and r["concurrency"] == 16 and r["scenario"] == "b"]
        for x in xs:
            ax.hlines(goal, x - 0.45, x + 0.45, color="black", linestyles="--", linewidth=1.2)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([_cell_name(r) for r in cells], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("req/s ÷ (a) Envoy round-robin, same workload and c")
    ax.set_title("Throughput with the EPP in the path, relative to plain Envoy\n"
                 "(blue: JSON bodies, orange: SSE streams; dashes: the goals for (b) at c=16)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(data_file: Path) -> list[Path]:
    """Draw every plot of ``data_file`` beside it; returns the PNGs written."""
    rows = json.loads(data_file.read_text(encoding="utf-8"))
    stem = data_file.with_suffix("")
    written = [
        plot_cpu_per_chunk(rows, Path(f"{stem}-cpu-per-chunk.png")),
        plot_throughput_ratio(rows, Path(f"{stem}-throughput-ratio.png")),
    ]
    return [p for p in written if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: plot one .json, print the PNG paths."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for path in plot_file(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
