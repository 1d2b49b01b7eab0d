"""Helpers shared by the benchmark scripts (machine, timing, child processes, indices, tables).

Every benchmark script runs from the repository root as ``python bench/<name>.py`` and
imports this module by path (``bench/`` is put on ``sys.path`` by the scripts). Nothing here
depends on embpress, so the helpers also serve the reference runs.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
RESULT_TAG = "BENCH-RESULT "
MB = 1e6


# ------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_bytes() -> int:
    """Physical memory (MemTotal)."""
    return _meminfo("MemTotal")


def mem_available_bytes() -> int:
    """Memory the kernel says can be used now without swapping (MemAvailable)."""
    return _meminfo("MemAvailable")


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, library versions and the date, as a dict."""
    import numba
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_total_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def machine_markdown(info: dict[str, Any] | None = None) -> str:
    """The machine description as a markdown bullet list."""
    info = info or machine_info()
    return "\n".join(
        [
            f"- CPU: {info['cpu']}, {info['cores']} logical cores "
            f"(torch uses {info['torch_threads']} threads by default), {info['memory_gib']} GiB RAM",
            f"- {info['os']}, Python {info['python']}, torch {info['torch']}, numba {info['numba']}, "
            f"numpy {info['numpy']}",
            f"- date: {info['date']}",
        ]
    )


def quiet_torch_warnings() -> None:
    """Silence the deprecation chatter of torch.ao.quantization (the reference)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
    warnings.filterwarnings("ignore", message=r".*deprecated.*")


# ------------------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat (warm-up excluded)."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0


def timeit(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_time: float = 0.0) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then time it ``repeats`` times with perf_counter.

    ``min_time``: keep repeating (beyond ``repeats``) until the timed runs add up to this.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return Timing(tuple(times))


# ------------------------------------------------------------------------------ memory
def proc_status_kib(keys: Sequence[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Selected fields (KiB) of /proc/self/status."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where Linux refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak RSS of this process beyond a baseline taken at :meth:`start`.

    ``start`` resets the kernel's high-water mark (``/proc/self/clear_refs``) so that what
    was allocated before (the input table, imports, warm-up) does not count; ``stop``
    returns ``VmHWM - VmRSS(start)`` in bytes. Where the reset is refused the result
    includes everything before ``start`` and :attr:`exact` is False.
    """

    def __init__(self) -> None:
        self.base_kib = 0
        self.exact = False

    def start(self) -> None:
        import gc

        gc.collect()
        self.exact = reset_peak_rss()
        self.base_kib = proc_status_kib()["VmRSS"]

    def stop(self) -> int:
        status = proc_status_kib()
        return max(0, status["VmHWM"] - self.base_kib) * 1024


# ------------------------------------------------------------------------------ other load
def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) ticks of all CPUs from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


class OtherLoad:
    """How busy other processes kept the CPUs while a section ran.

    Busy CPU time of the whole machine (``/proc/stat``) minus this process's and its
    finished children's (``os.times``), as a fraction of the CPU time available.
    """

    def __init__(self) -> None:
        self.start_ticks = _cpu_ticks()
        self.start_own = self._own()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def fraction(self) -> float | None:
        end = _cpu_ticks()
        if self.start_ticks is None or end is None:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (end[0] - self.start_ticks[0]) / hz
        total = (end[1] - self.start_ticks[1]) / hz
        own = self._own() - self.start_own
        return max(0.0, (busy - own) / total) if total > 0 else None

    def note(self, what: str = "this section", threshold: float = 0.05) -> str:
        """A line for the markdown; a warning if others used more than ``threshold`` of the CPUs."""
        frac = self.fraction()
        if frac is None:
            return ""
        if frac > threshold:
            return (
                f"**Warning: other processes used {frac * 100:.0f}% of the CPUs while {what} ran; "
                "timings (multi-threaded ones most) are not reliable. Rerun on a quiet machine.**\n"
            )
        return f"_Other processes used {frac * 100:.0f}% of the CPUs while {what} ran._\n"


# ------------------------------------------------------------------------------ child processes
def run_child(script: Path, payload: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Run ``script --child JSON`` in a fresh interpreter and return the dict it reports.

    The child prints one line ``BENCH-RESULT {json}`` (see :func:`child_report`). A crash,
    a kill (out of memory) or a timeout comes back as ``{"error": "..."}``.
    """
    cmd = [sys.executable, str(script), "--child", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            result: dict[str, Any] = json.loads(line[len(RESULT_TAG) :])
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {"error": f"{why}: {' | '.join(tail)}"}


def child_report(result: dict[str, Any]) -> None:
    """Hand ``result`` back to :func:`run_child` (last line of stdout)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ ids
def uniform_indices(num_rows: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` int64 ids drawn uniformly from ``[0, num_rows)``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_rows, size=count, dtype=np.int64)


def zipf_indices(
    num_rows: int, count: int, exponent: float = 1.05, seed: int = 0, hot_seed: int = 0
) -> np.ndarray:
    """``count`` int64 ids with P(rank k) ~ 1 / k**exponent over ``num_rows`` ids.

    Ranks are mapped to ids by a random permutation drawn from ``hot_seed`` alone, so the
    hot rows are spread over the table (as hashed ids are) instead of sitting in its first
    pages, and samples of other ``seed`` s hit the same hot rows (usage recorded on one
    sample describes another, as training traffic describes serving traffic).
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_rows + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(count), side="right")
    ranks = np.minimum(ranks, num_rows - 1)
    perm = np.random.default_rng(hot_seed).permutation(num_rows)
    return perm[ranks].astype(np.int64)


def hot_fraction(ids: np.ndarray, num_rows: int, top: float = 0.01) -> float:
    """Share of lookups that hit the ``top`` fraction most frequent rows."""
    counts = np.bincount(ids, minlength=num_rows)
    k = max(1, int(num_rows * top))
    return float(np.sort(counts)[-k:].sum() / max(1, ids.size))


# ------------------------------------------------------------------------------ reference sizes
def reference_table_bytes(module: Any) -> dict[str, int]:
    """Bytes of a ``torch.ao.nn.quantized.EmbeddingBag`` / ``Embedding`` table, counted from its weight.

    ``module.weight()`` is the quint8 per-row tensor the packed params hold: ``rows x D``
    one-byte codes plus a float scale and a float zero point per row (the FBGEMM packed
    buffer the lookup reads is the same ``rows x (D + 8)`` bytes). ``disk`` is the size of
    ``torch.save(module.state_dict())``.
    """
    import torch

    q = module.weight()
    codes = q.int_repr()
    scales = q.q_per_channel_scales()
    zps = q.q_per_channel_zero_points()
    memory = (
        codes.numel() * codes.element_size()
        + scales.numel() * scales.element_size()
        + zps.numel() * zps.element_size()
    )
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return {"memory": int(memory), "disk": len(buf.getvalue())}


# ------------------------------------------------------------------------------ markdown
def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l / r / c), default l then r."""
    align = align or ("l" + "r" * (len(headers) - 1))
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_bytes(n: float | None) -> str:
    """Bytes in MB (10**6) with 2 decimals (kB for small values)."""
    if n is None:
        return "–"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.2f} MB"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}x"


def fmt_rate(x: float) -> str:
    """Lookups per second, in millions."""
    return f"{x / 1e6:.2f} M"


def pass_fail(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that reproduces a run, as typed at the repository root."""
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(REPO)) if exe.is_absolute() else str(exe)
    except ValueError:
        shown = "python"
    if not (REPO / shown).exists() and shown != "python":
        shown = "python"
    return " ".join([shown, script, *(shlex.quote(a) for a in argv)])


def add_output_args(p: Any) -> None:
    """The --out / --plots / --md-root options every section script takes."""
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="folder for the .md/.json section")
    p.add_argument("--plots", type=Path, help="folder for the PNG (default: --out)")
    p.add_argument("--md-root", type=Path, help="folder the markdown will live in (links; default --out)")


def finish_output_args(args: Any) -> None:
    """Default --plots and --md-root to --out."""
    args.plots = args.plots or args.out
    args.md_root = args.md_root or args.out


def run_section(name: str, cmd: str, args: Any, measure: Any, plot: Any, render: Any) -> int:
    """Measure, plot to ``<plots>/<name>.png``, render, write and print one section."""
    t0 = time.perf_counter()
    load = OtherLoad()
    data = measure(args)
    png = plot(data, args.plots / f"{name}.png")
    md = render(data, args, cmd, png)
    md += f"\n_Section run time: {time.perf_counter() - t0:.0f} s._ " + load.note()
    payload = data if isinstance(data, dict) else {"results": data}
    write_section(args.out, name, md, {"command": cmd, **payload})
    print(md)
    return 0


def write_section(out: Path, name: str, markdown: str, data: dict[str, Any]) -> None:
    """Write ``<out>/<name>.md`` (the section) and ``<out>/<name>.json`` (the numbers)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def relpath(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (for markdown links), POSIX separators."""
    return Path(os.path.relpath(path, start)).as_posix()


def setup_matplotlib() -> Any:
    """matplotlib with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write and close a matplotlib figure; return its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
