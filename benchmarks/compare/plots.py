"""PNG plots of a comparison run, from its ``cells.json`` (matplotlib: run with the peers'
venv, ``.venv-peers/bin/python benchmarks/compare/plots.py RESULTS_DIR``).

- ``ttft-cdf.png``: the TTFT distribution of every router, one panel per workload at its
  headline rate;
- ``<workload>-vs-rate.png`` for every swept workload: hit rate, output throughput and
  TTFT p90 against the request rate.

Prints the name of every file written. Standalone on purpose: no import of the package.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Ours solid, baselines dashed, peers dash-dot, the oracle dotted black.
STYLES = {"ours": "-", "baseline": "--", "peer": "-.", "oracle": ":"}


def _style(router: str, kind: str, palette: dict[str, Any], headline: str) -> dict[str, Any]:
    if router not in palette:
        palette[router] = f"C{len(palette) % 10}"
    color = "black" if kind == "oracle" else palette[router]
    return {"linestyle": STYLES.get(kind, "-"), "color": color,
            "linewidth": 2.2 if router == headline else 1.4}


def ttft_cdf(data: dict[str, Any], out: Path, palette: dict[str, Any]) -> Path:
    cells = data["cells"]
    mains = _main_rates(data)
    workloads = list(mains)
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.6),
                             squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        rate = mains[workload]
        for cell in cells:
            if cell["workload"] != workload or cell["rate"] != rate:
                continue
            values = data["ttft"].get(f"{cell['router']}|{workload}|{rate:g}", [])
            if not values:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, ys, where="post", label=cell["router"],
                    **_style(cell["router"], cell["kind"], palette, _headline(data)))
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (fleet seconds, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{workload} at {rate:g} req/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"TTFT CDF per router — {data['plan']['pods']} × {data['plan']['profile']}, "
                 f"time scale {data['plan']['time_scale']:g}")
    fig.tight_layout()
    path = out / "ttft-cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versus_rate(data: dict[str, Any], workload: str, out: Path,
                palette: dict[str, Any]) -> Path:
    cells = [c for c in data["cells"] if c["workload"] == workload]
    routers = list(dict.fromkeys(c["router"] for c in cells))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    panels = [
        ("hit rate (cached / prompt tokens)", lambda c: c["hit_rate"], False),
        ("output tokens/s (fleet)", lambda c: c["output_tokens_per_s"], False),
        ("TTFT p90 (fleet s, log)", lambda c: c["ttft_s"][1], True),
    ]
    for ax, (label, value, log) in zip(axes, panels, strict=True):
        for router in routers:
            mine = sorted((c for c in cells if c["router"] == router), key=lambda c: c["rate"])
            ax.plot([c["rate"] for c in mine], [value(c) for c in mine], marker="o",
                    label=router, **_style(router, mine[0]["kind"], palette, _headline(data)))
        ax.set_xlabel("request rate (req/s, fleet)")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{workload}: hit rate and throughput vs request rate")
    fig.tight_layout()
    path = out / f"{workload}-vs-rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _headline(data: dict[str, Any]) -> str:
    """The row drawn thicker: the report's headline (``epp default``)."""
    return str(data.get("headline") or "epp default")


def _main_rates(data: dict[str, Any]) -> dict[str, float]:
    """Each workload's headline rate: the report's (``main_rates``), else the highest."""
    given = data.get("main_rates") or {}
    out: dict[str, float] = {}
    for cell in data["cells"]:
        w = cell["workload"]
        out[w] = given.get(w, max(out.get(w, 0.0), cell["rate"]))
    return out


def main(argv: list[str]) -> int:
    out = Path(argv[1])
    data = json.loads((out / "cells.json").read_text(encoding="utf-8"))
    palette: dict[str, Any] = {}
    written = [ttft_cdf(data, out, palette)]
    for workload in dict.fromkeys(c["workload"] for c in data["cells"]):
        if len({c["rate"] for c in data["cells"] if c["workload"] == workload}) > 1:
            written.append(versus_rate(data, workload, out, palette))
    for path in written:
        print(path.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
