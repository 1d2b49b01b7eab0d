"""Chunked compression of .safetensors inputs: peak anonymous memory against table size,
and throughput with 1, 2 and 4 processes (torchrun) on one machine.

Each input is a float32 table of N x 128 written here as a .safetensors file chunk by
chunk (never whole in memory; N(0, 1) rows, seed 0) next to the output, in a temporary
folder (``--tmp``). ``embpress compress IN OUT --sparsity 0.8 --block 1x4 --bits 8`` runs
in a child process whose anonymous memory (``RssAnon`` of /proc/<pid>/status: not the
input's page cache, which the kernel can drop and reread) is sampled every 5 ms; the
peak is reported beside the output bytes. Throughput: input GB per second of wall time,
command start to exit (process start and imports included).

Usage (from the repository root)::

    python bench/stream_memory.py                      # 0.5, 1.5, 2 and 8 GB, then 1/2/4 processes
    python bench/stream_memory.py --rows 1M 3M         # 0.5 and 1.5 GB only
    python bench/stream_memory.py --rows 60M --no-procs   # larger than this machine's RAM
    python bench/stream_memory.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAME = "stream_memory"
SCRIPT = "bench/stream_memory.py"
DIM = 128
OPTIONS = ["--sparsity", "0.8", "--block", "1x4", "--bits", "8"]


def parse_rows(text: str) -> int:
    scale = {"k": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def write_table(path: Path, rows: int, dim: int, chunk_rows: int = 1 << 18) -> None:
    """A safetensors file holding ``emb.weight`` [rows, dim] float32, written in chunks."""
    import numpy as np

    nbytes = rows * dim * 4
    header = json.dumps({"emb.weight": {"dtype": "F32", "shape": [rows, dim], "data_offsets": [0, nbytes]}})
    header += " " * (-len(header) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header.encode())
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            fh.write(rng.standard_normal((n, dim), dtype=np.float32).tobytes())


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_sampled(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command``; its wall time and the peak RssAnon summed over it and its children."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            pids = [proc.pid]
            try:
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                pids += [int(c) for c in children]
                for child in children:  # torchrun's workers are its children
                    pids += [int(g) for g in Path(f"/proc/{child}/task/{child}/children").read_text().split()]
            except OSError:
                pass
            peak[0] = max(peak[0], sum(_anon_kib(p) for p in pids))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": wall, "peak_anon_bytes": peak[0] * 1024}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [parse_rows(r) for r in args.rows]
    results: dict[str, Any] = {"sizes": [], "procs": [], "dim": DIM, "options": OPTIONS}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="embpress-stream-") as tmp:
        for rows in sizes:
            src, dst = Path(tmp) / f"in-{rows}.safetensors", Path(tmp) / f"out-{rows}.safetensors"
            write_table(src, rows, DIM)
            got = run_sampled([sys.executable, "-m", "embpress", "compress", str(src), str(dst), *OPTIONS])
            got.update(rows=rows, in_bytes=src.stat().st_size, out_bytes=dst.stat().st_size)
            results["sizes"].append(got)
            print(f"{rows:,} rows: {got}", file=sys.stderr, flush=True)
            if rows != sizes[0] or args.no_procs:
                src.unlink()
            dst.unlink()
        if not args.no_procs:
            rows = sizes[0]
            src, dst = Path(tmp) / f"in-{rows}.safetensors", Path(tmp) / "out-procs.safetensors"
            for n in args.procs:
                command = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc-per-node={n}",
                ]
                command += ["-m", "embpress", "compress", str(src), str(dst), *OPTIONS]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
                got = run_sampled(command if n > 1 else command[:1] + command[5:], env)
                got.update(procs=n, rows=rows, in_bytes=src.stat().st_size)
                results["procs"].append(got)
                print(f"{n} process(es): {got}", file=sys.stderr, flush=True)
    return results


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, png: Path | None) -> str:
    mib = 2**20
    rows = []
    base = data["sizes"][0] if data["sizes"] else None
    for r in data["sizes"]:
        extra = r["peak_anon_bytes"] - r["out_bytes"]
        growth = ""
        if base is not None and r is not base:
            delta = (r["peak_anon_bytes"] - base["peak_anon_bytes"]) - (r["out_bytes"] - base["out_bytes"])
            growth = f"{delta / mib:+.1f} MiB"
        rows.append([
            f"{r['rows']:,} x {data['dim']}",
            common.fmt_bytes(r["in_bytes"]),
            common.fmt_bytes(r["out_bytes"]),
            f"{r['peak_anon_bytes'] / mib:.0f} MiB",
            f"{extra / mib:.0f} MiB",
            growth,
            common.fmt_seconds(r["wall_s"]),
            f"{r['in_bytes'] / r['wall_s'] / 1e9:.2f}",
        ])  # fmt: skip
    md = [
        "## Larger than memory: chunked compression and processes",
        "",
        f"Command: `{cmd}`",
        "",
        common.machine_markdown(),
        "",
        f"`embpress compress IN OUT {' '.join(data['options'])}` on a float32 .safetensors table (read "
        "in row chunks: mapped, or with pread beyond RAM + swap; default `--memory 512MiB`); peak anonymous "
        "memory (RssAnon, sampled "
        "every 5 ms) of the process, which holds the output (its chunks' tables, unjoined) until it "
        "writes them.",
        "",
        common.md_table(
            [
                "table",
                "input",
                "output",
                "peak anon",
                "peak − output",
                "vs first row (− output growth)",
                "wall",
                "GB/s",
            ],
            rows,
        ),
    ]
    md += target_lines(data)
    if data["procs"]:
        one = data["procs"][0]["wall_s"]
        prow = [
            [str(r["procs"]), common.fmt_seconds(r["wall_s"]), f"{r['in_bytes'] / r['wall_s'] / 1e9:.2f}",
             f"{one / r['wall_s']:.2f}", f"{r['peak_anon_bytes'] / mib:.0f} MiB"]
            for r in data["procs"]
        ]  # fmt: skip
        md += [
            "",
            f"Processes on this machine (torchrun --standalone, gloo; {data['procs'][0]['rows']:,} x "
            f"{data['dim']}; OMP threads = cores / processes; peak anon summed over the processes):",
            "",
            common.md_table(["processes", "wall", "GB/s", "speed-up", "peak anon (all)"], prow),
        ]
    return "\n".join(md) + "\n"


def target_lines(data: dict[str, Any]) -> list[str]:
    """PASS/FAIL of issue 15's memory targets: peak beyond the output at most about 600 MB
    at every size; 3M rows within 64 MiB of 1M rows' peak plus the output's growth."""
    mib, sizes = 2**20, {r["rows"]: r for r in data["sizes"]}
    if not sizes:
        return []
    worst = max(r["peak_anon_bytes"] - r["out_bytes"] for r in sizes.values())
    out = [
        "",
        f"- peak anon beyond the output at most {worst / mib:.0f} MiB at every size (target: about "
        f"600 MB): **{common.pass_fail(worst <= 600e6)}**",
    ]
    if 1_000_000 in sizes and 3_000_000 in sizes:
        a, b = sizes[1_000_000], sizes[3_000_000]
        delta = (b["peak_anon_bytes"] - a["peak_anon_bytes"]) - (b["out_bytes"] - a["out_bytes"])
        out.append(
            f"- 3M x {data['dim']} against 1M x {data['dim']}: {delta / mib:+.1f} MiB beyond the output's "
            f"growth (target: within 64 MB): **{common.pass_fail(abs(delta) <= 64e6)}**"
        )
    return out


def no_plot(data: Any, path: Path) -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--rows", nargs="+", default=["1M", "3M", "4M", "16M"], help="table rows (k, M, G suffixes)"
    )
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--no-procs", action="store_true", help="skip the torchrun runs")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the temporary input and output")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    common.add_output_args(p)
    args = p.parse_args(argv)
    common.finish_output_args(args)
    if args.quick:
        args.rows, args.procs = ["100k", "300k"], [1, 2]
    cmd = common.command_line(SCRIPT, argv if argv is not None else sys.argv[1:])
    return common.run_section(NAME, cmd, args, measure, no_plot, render)


if __name__ == "__main__":
    sys.exit(main())
