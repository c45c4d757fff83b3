"""python -m benchmarks --against REV: the in-memory path now ("after") against REV ("before").

REV is checked out with ``git worktree`` into a temporary folder outside the
repository. Both sides run the *current* benchmark code, each trial in a fresh
interpreter (``python -m benchmarks.against --worker TREE KIND MODE``) that puts
its tree first on ``sys.path`` before asyncbg is imported and refuses to go on
if asyncbg came from anywhere else. No second virtual environment: asyncbg's
dependencies are those of the current venv on both sides, which is what we
want to hold constant anyway (a REV needing other ones fails loudly at import).

Trials alternate in rotating order (before, after, after, before, ...) so that
the machine's drift lands on both sides alike; each figure is the median over
trials.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import MODES, Deadline, Mode, gil_hog, median, percentile

ROOT = Path(__file__).resolve().parent.parent
FLAG = 0.97  # a ratio below this is flagged as "worse"


# name -> (unit, higher_is_better). The ratio is always oriented so that
# >= 1.0 means "not worse": after/before for rates, before/after for the rest.
FIGURES: dict[str, tuple[str, bool]] = {
    "submit-to-start p50, idle": ("us", False),
    "submit-to-start p99, idle": ("us", False),
    "submit-to-start p50, contended": ("us", False),
    "submit-to-start p99, contended": ("us", False),
    "jobs/s, 1 thread": ("1/s", True),
    "jobs/s, 4 threads": ("1/s", True),
    "enqueue-to-consume p50, idle": ("us", False),
    "enqueue-to-consume p99, idle": ("us", False),
    "memory per pending job": ("B", False),
}
# Memory gets its own interpreter: RSS growth is only meaningful in a process
# that has not already churned through the speed figures' allocations.
KINDS = ("speed", "memory")


# ---------------------------------------------------------------- worker side


def _import_asyncbg_from(tree: Path) -> str:
    """Import asyncbg with ``tree`` first on sys.path; its file, or SystemExit."""
    if "asyncbg" in sys.modules:
        raise SystemExit("asyncbg was imported before its tree was put on sys.path")
    sys.path.insert(0, str(tree))
    import asyncbg

    where = Path(asyncbg.__file__ or "").resolve()
    if not where.is_relative_to(tree.resolve()):
        raise SystemExit(f"asyncbg came from {where}, not from {tree}")
    return str(where)


def _speed(mode: Mode) -> dict[str, float]:
    # The current benchmark code, imported before asyncbg's tree went on the
    # path, so that REV's own benchmarks/ (if any) never shadows it.
    from .latency import _samples
    from .subjects import AsyncBGSubject
    from .throughput import _jobs_per_second

    out: dict[str, float] = {}
    s = AsyncBGSubject("asyncio")
    try:
        for cond, n, contended in (
            ("idle", mode.latency_samples, False),
            ("contended", mode.contended_samples, True),
        ):
            with gil_hog(contended):
                lat, _ = _samples(s.bg_submit, n, Deadline(mode.time_budget))
            out[f"submit-to-start p50, {cond}"] = percentile(lat, 50) * 1e6
            out[f"submit-to-start p99, {cond}"] = percentile(lat, 99) * 1e6
        lat, _ = _samples(s.enqueue, mode.latency_samples, Deadline(mode.time_budget))
        out["enqueue-to-consume p50, idle"] = percentile(lat, 50) * 1e6
        out["enqueue-to-consume p99, idle"] = percentile(lat, 99) * 1e6
        for threads in (1, 4):
            rate = _jobs_per_second(
                s.bg_submit, mode.throughput_jobs, threads, Deadline(mode.time_budget)
            )
            out[f"jobs/s, {threads} thread{'s' if threads > 1 else ''}"] = rate
    finally:
        s.close()
    return out


def _memory(mode: Mode) -> dict[str, float]:
    from .memory import asyncbg_submit

    return {"memory per pending job": asyncbg_submit(mode.memory_items)}


def worker(tree: Path, kind: str, mode_name: str) -> None:
    import logging

    # expected warnings (items left at stop) would only clutter stderr
    logging.getLogger("asyncbg").setLevel(logging.ERROR)
    mode = MODES[mode_name]
    run: Callable[[Mode], dict[str, float]] = {"speed": _speed, "memory": _memory}[kind]
    # the benchmark modules first (see _speed), asyncbg's tree second
    from . import latency, memory, subjects, throughput  # noqa: F401

    where = _import_asyncbg_from(tree)
    figures = run(mode)
    print(json.dumps({"asyncbg_file": where, "figures": figures}))


# ---------------------------------------------------------------- parent side


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _trial(tree: Path, kind: str, mode: Mode) -> dict[str, Any]:
    # cwd=ROOT puts the current benchmarks package first for ``-m``; the worker
    # then puts ``tree`` in front of it for asyncbg alone.
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.against", "--worker", str(tree), kind, mode.name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=max(120.0, 4 * mode.time_budget),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} trial on {tree} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _ratio(before: float, after: float, higher_is_better: bool) -> float:
    num, den = (after, before) if higher_is_better else (before, after)
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return float("nan")
    return num / den


def _fmt(v: float, unit: str) -> str:
    from .report import _fmt as fmt

    return fmt(v, unit)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| figure | before | after | ratio (>= 1.0 = not worse: after/before for jobs/s, "
        "before/after for latencies and memory) | flag |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = r["ratio"]
        flag = f"**< {FLAG}x**" if ratio == ratio and ratio < FLAG else ""
        shown = "n/a" if ratio != ratio else f"{ratio:.2f}x"
        lines.append(
            f"| {r['figure']} | {_fmt(r['before'], r['unit'])} | {_fmt(r['after'], r['unit'])} "
            f"| {shown} | {flag} |"
        )
    return "\n".join(lines)


def _safe(rev: str) -> str:
    return re.sub(r"[^A-Za-z0-9._~^@-]", "_", rev)


def run_against(rev: str, mode: Mode, out_dir: Path) -> int:
    t0 = time.monotonic()
    try:
        sha = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--against: {rev!r} is not a commit in {ROOT}") from None
    head = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    # outside the repository, so that nothing under ROOT (ruff, pytest,
    # setuptools discovery) ever sees a second copy of the package
    tmp = Path(tempfile.mkdtemp(prefix="asyncbg-against-"))
    tree = tmp / "tree"
    sides = {"after": ROOT, "before": tree}
    # Twice the mode's trials, which is even, so each side runs first as often
    # as second: a 0.97x flag needs tighter medians than the figures of one
    # run, and a trial here is only seconds.
    trials = 2 * mode.trials
    runs: dict[str, dict[str, list[float]]] = {s: {f: [] for f in FIGURES} for s in sides}
    files: dict[str, set[str]] = {s: set() for s in sides}
    order: list[str] = []
    try:
        _git("worktree", "add", "--detach", str(tree), sha)
        for t in range(trials):
            # before, after | after, before | before, after | ...
            names = ["before", "after"] if t % 2 == 0 else ["after", "before"]
            for side in names:
                order.append(side)
                for kind in KINDS:
                    print(f"   trial {t + 1}/{trials}: {side} {kind}", file=sys.stderr, flush=True)
                    res = _trial(sides[side], kind, mode)
                    files[side].add(res["asyncbg_file"])
                    for name, value in res["figures"].items():
                        runs[side][name].append(float(value))
    finally:
        # never added, or half-added: the prune below forgets it either way
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(tmp, ignore_errors=True)
        _git("worktree", "prune")
    if files["before"] & files["after"]:
        raise RuntimeError(f"both sides imported asyncbg from {files['before']}")
    rows = []
    for name, (unit, higher) in FIGURES.items():
        b, a = median(runs["before"][name]), median(runs["after"][name])
        rows.append(
            {
                "figure": name,
                "unit": unit,
                "before": b,
                "after": a,
                "ratio": _ratio(b, a, higher),
                "higher_is_better": higher,
                "flagged": _ratio(b, a, higher) < FLAG,
                "trials_before": runs["before"][name],
                "trials_after": runs["after"][name],
            }
        )
    from .report import machine

    m = machine()
    elapsed = time.monotonic() - t0
    after_desc = f"{head[:10]}{' + uncommitted changes' if dirty else ''}"
    header = (
        f"asyncbg --against {rev}: before = {rev} ({sha[:10]}), after = {after_desc}; "
        f"AsyncBG.submit/enqueue (asyncio), {mode.name} mode, {trials} trials per side "
        f"(medians), {m['date_utc']}: Python {m['python']}, {m['cores']} cores "
        f"({m['cpu']}), {elapsed:.0f} s"
    )
    text = header + "\n\n" + table(rows)
    flagged = [r["figure"] for r in rows if r["flagged"]]
    if flagged:
        text += f"\n\n_below {FLAG}x: {', '.join(flagged)}_"
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"against-{_safe(rev)}"
    (out_dir / f"{stem}.md").write_text(text + "\n")
    data = {
        "rev": rev,
        "before_commit": sha,
        "after_commit": head,
        "after_dirty": dirty,
        "mode": mode.name,
        "trials_per_side": trials,
        "order": order,
        "flag_below": FLAG,
        "asyncbg_file": {s: sorted(f) for s, f in files.items()},
        "before_tree": str(tree),
        "machine": m,
        "seconds": elapsed,
        "rows": rows,
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, allow_nan=True))
    print(f"\nwrote {out_dir / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(
            "usage: python -m benchmarks --against REV (this module's own "
            "entry is the per-trial worker)"
        )
