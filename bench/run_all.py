"""Run every benchmark and regenerate BENCHMARKS.md.

Each section runs as its own process (``python bench/<name>.py ...``, the exact command
is written next to its figures) and writes ``<name>.md`` / ``<name>.json`` and a PNG;
this script stitches the sections together with a description of the machine.

Usage (from the repository root)::

    python bench/run_all.py                       # full: BENCHMARKS.md + bench/results/ (~15 min on 2 cores)
    python bench/run_all.py --quick               # tiny sizes (a few minutes) -> out/bench-quick/
    python bench/run_all.py --only size lookup    # rerun some sections, keep the others' last results
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

SECTIONS = (
    "compress_cost",
    "size",
    "lookup",
    "lookup_avx2cpu",
    "deploy",
    "quality_ml100k",
    "quality_plan",
    "usage_overhead",
    "plan_cost",
    "stream_memory",
)
TITLES = {
    "compress_cost": "Compression cost (time and peak memory)",
    "size": "Size in memory and on disk",
    "lookup": "Lookup throughput",
    "lookup_avx2cpu": "Lookup throughput on an AVX2-only CPU (emulated)",
    "deploy": "Op boundary (torch custom ops)",
    "quality_ml100k": "Model quality: DLRM on MovieLens-100k",
    "quality_plan": "Quality against bytes: the planner against every uniform setting",
    "usage_overhead": "Usage recording overhead",
    "plan_cost": "Planning cost",
    "stream_memory": "Larger than memory: chunked compression and processes",
}
# Seconds a section may take before it is stopped (full run; --quick uses a quarter).
# The maintainers' reading of a full run, kept apart so that a rerun does not erase it.
MEANING = common.BENCH / "meaning.md"
TIMEOUTS = {
    "compress_cost": 900,
    "size": 420,
    "lookup": 300,
    "lookup_avx2cpu": 900,  # a first run compiles the kernels for the emulated CPU
    "deploy": 420,
    "quality_ml100k": 240,
    "quality_plan": 900,
    "usage_overhead": 240,
    "plan_cost": 420,
    "stream_memory": 900,
}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(common.REPO))
    except ValueError:
        return str(path)


def run_section(name: str, args: argparse.Namespace, out: Path, md_root: Path) -> tuple[str, float]:
    """Run one section script; return its markdown and its wall time."""
    script = common.BENCH / f"{name}.py"
    argv = ["--quick"] if args.quick else []
    argv += ["--out", _shown(out), "--md-root", _shown(md_root)]
    cmd = [sys.executable, str(script.relative_to(common.REPO)), *argv]
    timeout = TIMEOUTS[name] * (0.25 if args.quick else 1.0) * args.timeout_scale
    print(f"== {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=common.REPO, timeout=timeout, stdout=subprocess.DEVNULL)
        failed = f"exit code {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        failed = f"stopped after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    md_file = out / f"{name}.md"
    if failed or not md_file.exists():
        why = failed or "no section written"
        return (
            f"## {TITLES[name]}\n\nCommand: `{common.command_line(f'bench/{name}.py', argv)}`\n\n"
            f"**This section failed ({why}); see the run's stderr.**\n",
            seconds,
        )
    md = md_file.read_text()
    head, _, rest = md.partition("\n")
    info = common.machine_info()
    stamp = f"_Run {info['date']} on {info['cpu']}, {info['cores']} logical cores._"
    if stamp not in rest:  # kept in the section's file: a later --only run shows when it ran
        md = f"{head}\n\n{stamp}\n{rest}"
        md_file.write_text(md)
    return md, seconds


def summary(sections: dict[str, str]) -> list[str]:
    """Every PASS/FAIL line of the sections, grouped by section."""
    out = []
    for name, md in sections.items():
        hits = _target_lines(md)
        if hits:
            out.append(f"- {TITLES[name]}:")
            indent = "  "
            for h in hits:
                if h.startswith("*") and not h.startswith("**"):  # a heading of the section
                    out.append(f"  - {h}")
                    indent = "    "
                else:
                    out.append(f"{indent}{h if h.startswith('- ') else '- ' + h}")
    return out


def _target_lines(md: str) -> list[str]:
    """The section's PASS/FAIL lines; where they lie under more than one ``### `` heading
    (one section's targets on two models), each group after its heading in italics."""
    found: list[tuple[str | None, str]] = []
    heading = None
    for line in md.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        elif re.search(r"\*\*(PASS|FAIL)\*\*", line):
            found.append((heading, line.strip()))
    if len({h for h, _ in found}) < 2:
        return [line for _, line in found]
    out, shown = [], object()
    for h, line in found:
        if h != shown:
            out.append(f"*{h or 'the section'}:*")
            shown = h
        out.append(line)
    return out


def assemble(
    sections: dict[str, str], times: dict[str, float], args: argparse.Namespace, cmd: str, load_note: str
) -> str:
    info = common.machine_info()
    total = sum(times.values())
    lines = [
        "# Benchmarks" + (" (quick run: tiny sizes, not for quoting)" if args.quick else ""),
        "",
        "Generated by `bench/run_all.py`; do not edit by hand (the *What these numbers mean* section "
        "at the end is the place for prose). Every ratio is measured in the same run as the figures "
        "it divides, on this machine:",
        "",
        common.machine_markdown(info),
        "",
        f"Whole run: `{cmd}` ({total / 60:.1f} min: "
        + ", ".join(f"{n} {t:.0f} s" for n, t in times.items())
        + "). Each section below states the command that produced it.",
        "",
        load_note,
        "Contents: " + " · ".join(f"[{TITLES[n]}](#{_anchor(TITLES[n])})" for n in sections),
        "",
    ]
    for md in sections.values():
        lines += [md.rstrip(), ""]
    lines += [
        "## Targets at a glance",
        "",
        *summary(sections),
        "",
        "## What these numbers mean",
        "",
        MEANING.read_text().strip()
        if MEANING.exists() and not args.quick
        else "_Prose lives in bench/meaning.md and is included in full runs._",
        "",
    ]
    return "\n".join(lines)


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    slug = re.sub(r"[^\w\- ]", "", title.lower()).strip()
    return slug.replace(" ", "-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes; writes to --out, not BENCHMARKS.md")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for everything (default: quick out/bench-quick; full BENCHMARKS.md + bench/results/)",
    )
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every section's time limit")
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line("bench/run_all.py", argv)
    if args.out is not None:
        out = args.out if args.out.is_absolute() else common.REPO / args.out
        md_root, target = out, out / "BENCHMARKS.md"
    elif args.quick:
        out = common.REPO / "out" / "bench-quick"
        md_root, target = out, out / "BENCHMARKS.md"
    else:
        out, md_root, target = common.RESULTS, common.REPO, common.REPO / "BENCHMARKS.md"
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in SECTIONS if (common.BENCH / f"{n}.py").exists()]
    sections: dict[str, str] = {}
    times: dict[str, float] = {}
    load = common.OtherLoad()
    for name in names:
        kept = out / f"{name}.md"
        if args.only and name not in args.only:
            # not rerun: the section as its last run wrote it (it names its own command and date)
            if kept.exists():
                head, _, rest = kept.read_text().partition("\n")
                sections[name] = f"{head}\n\n_Kept from an earlier run (not rerun by this command)._\n{rest}"
            continue
        sections[name], times[name] = run_section(name, args, out, md_root)
        print(f"== {name}: {times[name]:.0f} s", file=sys.stderr, flush=True)
    target.write_text(assemble(sections, times, args, cmd, load.note("the benchmarks")))
    print(f"wrote {target} ({sum(times.values()) / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
