"""The table, the JSON file and the chart of one run."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from .harness import Section


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "switch_interval_ms": sys.getswitchinterval() * 1e3,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _fmt(v: float, unit: str) -> str:
    if v != v:
        return "n/a"
    if unit == "1/s":
        return f"{v:,.0f}/s"
    if unit == "us":
        return f"{v:,.0f} us" if v >= 100 else f"{v:.1f} us"
    if unit == "ms":
        return f"{v:,.2f} ms"
    if unit == "s":
        return f"{v:.3f} s"
    if unit == "B":
        return f"{v:,.0f} B"
    return f"{v:,.0f}"


def table(sections: list[Section]) -> str:
    """A Markdown table: every row with its ratio to the baseline and its target."""
    lines = [
        "| benchmark | subject | metric | value | ratio | target | met |",
        "| --- | --- | --- | ---: | ---: | --- | --- |",
    ]
    for sec in sections:
        for r in sec.rows:
            ratio = "" if r.ratio is None or math.isnan(r.ratio) else f"{r.ratio:.2f}x"
            met = "" if r.met is None else ("yes" if r.met else "**no**")
            lines.append(
                f"| {sec.name}: {r.group} | {r.subject} | {r.metric} | {_fmt(r.value, r.unit)} "
                f"| {ratio} | {r.target or ''} | {met} |"
            )
    for sec in sections:
        for note in sec.notes:
            lines.append(f"\n_{sec.name}: {note}_")
    return "\n".join(lines)


def write_json(path: Path, mode: str, sections: list[Section]) -> None:
    data = {
        "mode": mode,
        "machine": machine(),
        "sections": [
            {
                "name": s.name,
                "rows": [r.__dict__ for r in s.rows],
                "notes": s.notes,
                "raw": s.raw,
            }
            for s in sections
        ],
    }
    path.write_text(json.dumps(data, indent=1, default=float, allow_nan=True))


_LATENCY_SUBJECTS = [
    "raw call_soon_threadsafe (asyncio)",
    "raw rcts (asyncio)",
    "raw rcts (uvloop)",
    "ThreadPoolExecutor.submit",
    "LoopThread.submit (asyncio)",
    "AsyncBG.submit (asyncio)",
    "enqueue->consumer (asyncio)",
    "AsyncBG.submit (uvloop)",
]


def chart(path: Path, sections: list[Section], title: str) -> bool:
    """Latency distributions (idle, contended) and periodic drift; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_name = {s.name: s for s in sections}
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    lat = by_name.get("latency")
    for ax, cond in zip(axes[0], ("idle", "contended"), strict=True):
        data = lat.raw.get(cond, {}) if lat else {}
        names = [n for n in _LATENCY_SUBJECTS if data.get(n)]
        if names:
            ax.boxplot(
                [[x * 1e6 for x in data[n]] for n in names],
                vert=False,
                whis=(1, 99),
                showfliers=False,
            )
            ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
            ax.set_xscale("log")
        ax.set_xlabel("submit-to-start latency, us (box: p25-p75, whiskers: p1-p99)")
        ax.set_title(f"latency, {cond}" + (" (one GIL-hungry thread)" if cond != "idle" else ""))
        ax.grid(True, axis="x", alpha=0.3)
    per = by_name.get("periodic")
    for ax, cond in zip(axes[1], ("idle", "contended"), strict=True):
        data = per.raw.get(cond, {}) if per else {}
        for name, errs in data.items():
            if errs:
                ax.plot(range(len(errs)), [e * 1e3 for e in errs], label=name, lw=1)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("tick")
        ax.set_ylabel("start error vs schedule, ms (symlog)")
        ax.set_title(f"periodic every 20 ms with 5 ms work, {cond}")
        ax.grid(True, alpha=0.3)
        if data:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
