"""``soak.png``: what a soak run looked like, from its ``soak.json``.

Left: seconds per committed round (round 1 includes the key ceremony), failed
attempts counted in the title. Right: resident memory of the coordinator's
process tree (daemon, SuperLink, gateway, ServerApp) over the run, its peak
marked; the hospitals' total on a second axis, since on one box they dwarf it.

``python -m bench.soak_plot OUT/soak.json`` redraws it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot_soak"]


def plot_soak(result: dict[str, Any], path: Path) -> Path:
    """Draw ``result`` (a soak.json object) to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (rounds_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    durations = result.get("round_s") or []
    rounds_ax.bar(range(1, len(durations) + 1), durations, color="tab:blue")
    if result.get("round_median_s") is not None:
        rounds_ax.axhline(
            result["round_median_s"],
            color="tab:orange",
            linestyle="--",
            label=f"median {result['round_median_s']:.0f} s (rounds 2+)",
        )
        rounds_ax.legend(loc="upper right")
    rounds_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds_ax.set_xlabel("round")
    rounds_ax.set_ylabel("seconds to commit")
    rounds_ax.set_title(
        f"{result['rounds_completed']}/{result['rounds_requested']} rounds committed, "
        f"{result['failed_rounds']} failed attempts"
    )

    series = result.get("rss_series") or []
    if series:
        minutes = [t / 60 for t, _, _ in series]
        mem_ax.plot(minutes, [c for _, c, _ in series], color="tab:red", label="coordinator")
        peak = max(series, key=lambda p: p[1])
        mem_ax.annotate(
            f"peak {peak[1]:,.0f} MB",
            (peak[0] / 60, peak[1]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
        )
        mem_ax.set_ylim(0, peak[1] * 1.25)
        lines = mem_ax.get_lines()
        if any(h for _, _, h in series):
            hosp_ax = mem_ax.twinx()
            hosp_ax.plot(
                minutes, [h for _, _, h in series], color="tab:gray", alpha=0.6, label="hospitals"
            )
            hosp_ax.set_ylabel("hospitals' RSS, MB (all on this box)")
            lines += hosp_ax.get_lines()
        mem_ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    mem_ax.set_xlabel("minutes since start")
    mem_ax.set_ylabel("coordinator RSS, MB")
    mem_ax.set_title(f"{result['hospitals']} hospitals on one host")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1])
    print(plot_soak(json.loads(source.read_text()), source.with_name("soak.png")))
