"""python -m benchmarks [--quick | --smoke] [--only NAME ...] [--postgres] [--redis]
[--out DIR]
[--chart-copy PATH] [--against REV]"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from . import (
    against,
    durable,
    http,
    latency,
    memory,
    periodic,
    postgres,
    redis,
    report,
    shutdown,
    throughput,
)
from .harness import MODES, Section

BENCHMARKS = {
    "latency": latency.run,
    "throughput": throughput.run,
    "periodic": periodic.run,
    "http": http.run,
    "shutdown": shutdown.run,
    "memory": memory.run,
    "durable": durable.run,
    "postgres": postgres.run,
    "redis": redis.run,
}
#: Not in a default run: they start a server (PostgreSQL, redis-server) and host
#: processes (``--postgres`` / ``--redis`` add them, ``--only NAME`` runs one alone).
OPTIONAL = {"postgres", "redis"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer trials and items (~3 min)")
    g.add_argument("--smoke", action="store_true", help="every benchmark, briefly (seconds)")
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    p.add_argument(
        "--postgres",
        action="store_true",
        help="add the PostgreSQL benchmark (a throw-away server, or env ASYNCBG_BENCH_PG_URL)",
    )
    p.add_argument(
        "--redis",
        action="store_true",
        help="add the Redis benchmark (a throw-away server, or env ASYNCBG_BENCH_REDIS_URL)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="results directory (default: benchmarks/results)",
    )
    p.add_argument("--chart-copy", type=Path, help="also copy the chart here (docs/...)")
    p.add_argument(
        "--against",
        metavar="REV",
        help="instead: the in-memory path of this tree ('after') against git revision REV "
        "('before'), trials interleaved, into OUT/against-REV.md and .json",
    )
    args = p.parse_args(argv)
    mode = MODES["quick" if args.quick else "smoke" if args.smoke else "full"]
    if args.against is not None:
        if args.only or args.chart_copy:
            p.error("--against runs its own figures: no --only or --chart-copy with it")
        return against.run_against(args.against, mode, args.out)
    # expected warnings (cancelled jobs, items left at stop) would drown the table
    logging.getLogger("asyncbg").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    t0 = time.monotonic()
    added = {n for n in OPTIONAL if getattr(args, n)}
    names = args.only or [n for n in BENCHMARKS if n not in OPTIONAL or n in added]
    for name in names:
        t = time.monotonic()
        print(f"== {name} ({mode.name})", file=sys.stderr, flush=True)
        sections.append(BENCHMARKS[name](mode))
        print(f"   {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    m = report.machine()
    header = (
        f"asyncbg benchmarks, {mode.name} mode, {m['date_utc']}: Python {m['python']}, "
        f"{m['cores']} cores ({m['cpu']}), {time.monotonic() - t0:.0f} s"
    )
    text = header + "\n\n" + report.table(sections)
    print(text)
    (args.out / f"results-{mode.name}.md").write_text(text + "\n")
    report.write_json(args.out / f"results-{mode.name}.json", mode.name, sections)
    png = args.out / f"chart-{mode.name}.png"
    if report.chart(png, sections, header):
        print(f"\nwrote {png}", file=sys.stderr)
        if args.chart_copy:
            args.chart_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, args.chart_copy)
    else:
        print(
            "\nmatplotlib is not installed: no chart (pip install 'asyncbg[bench]')",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
