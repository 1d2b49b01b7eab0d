"""In-process A/B timing of lookup kernel sources: is a kernel change faster, beyond noise?

``bench/ab.py`` times whole revisions in two worker processes; on a shared 2-core machine
its cells move by 5-15% from run to run, more than most kernel changes gain. This script
loads several versions of one kernel file (``layouts/_mixed_kernels.py`` or
``layouts/_kernels.py``) side by side into one process, each as its own module compiled
by numba (the kernels define their helpers in-file, so a copy is self-contained), and
calls their bag kernels directly on the same table and ids, alternating the versions call
by call and their order round by round: a slow phase of the machine hits every version
alike. It times the kernel alone (no module, bounds or output around it) and checks that
every version's sums equal the first one's bit for bit.

Versions are git revisions (the file as committed there) or paths to kernel files; ``.``
is the working tree's file. Each must run against the working tree's package (the
modules it imports from). Kernels are compiled afresh in a temporary numba cache (tens of
seconds per version). Tables: 1M x 128 float32 (seed 0, as ``lookup.py``); ``mixed``: the
planner's table at 1/8 of float32's bytes (``lookup.build_planned``) or one of 8-bit rows
only; ``block-sparse``: sparsity 0.8, (1, 4) blocks, 8 and 4 bits (``--bits``: also 2), on each kernel path.
Ids: 4,096 bags of 40, Zipf (``common.zipf_indices``), uniform, and ``hot`` (uniform over
the first 2,000 rows: cache-resident rows, where the instructions per id decide).

Usage (from the repository root)::

    python bench/kernel_ab.py --kernel mixed HEAD .         # the committed walk vs yours
    python bench/kernel_ab.py --kernel block-sparse HEAD~2 HEAD --paths avx2 --rounds 60
    python bench/kernel_ab.py --kernel mixed . .            # A/A: the noise floor
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

KERNEL_FILES = {
    "mixed": "src/embpress/layouts/_mixed_kernels.py",
    "block-sparse": "src/embpress/layouts/_kernels.py",
}
DISTS = ("zipf", "uniform", "hot")
HOT_ROWS = 2000


def kernel_source(version: str, kernel: str) -> str:
    """The kernel file's text at ``version``: a path, ``.`` (the working tree) or a git revision."""
    rel = KERNEL_FILES[kernel]
    if version == ".":
        return (common.REPO / rel).read_text()
    if Path(version).is_file():
        return Path(version).read_text()
    done = subprocess.run(
        ["git", "show", f"{version}:{rel}"], cwd=common.REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"kernel_ab.py: version {version!r}: {done.stderr.strip()}")
    return done.stdout


def load_versions(versions: list[str], kernel: str, into: Path) -> list[tuple[str, ModuleType]]:
    """Each version's kernel file as a module of the ``embpress.layouts`` package."""
    import embpress.layouts  # noqa: F401  (the package the copies' relative imports resolve in)

    out = []
    for k, version in enumerate(versions):
        path = into / f"_kab_{k}.py"
        path.write_text(kernel_source(version, kernel))
        name = f"embpress.layouts._kab_{k}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SystemExit(f"kernel_ab.py: version {version!r}: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        out.append((f"{k}: {version}", module))
    return out


def cells(
    kernel: str, rows: int, dim: int, table: str, paths: list[str], bits: list[int]
) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(label, kernel function name, its table arguments) of each timed table."""
    import lookup
    import numpy as np
    import torch
    from torch import nn

    from embpress.layouts.lookup import KernelPolicy
    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    weight = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    if kernel == "mixed":
        if table == "planned":
            mixed = lookup.build_planned(weight, 4096 * 40).table
        else:
            mixed = MixedTable.build(weight, np.zeros(rows, np.int64), [Codec("rowwise", 8)])
        return [(f"mixed ({table})", "mixed_bag", tuple(mixed.kernel_table()))]
    emb = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    out = []
    for label, (module, _) in lookup.build_embpress(emb, 0.8, ("block-sparse",)).items():
        if not any(label.endswith(f" {b}-bit") for b in bits):
            continue
        for path in paths:
            args = tuple(module.table._kernel_table(KernelPolicy(path=path)))
            out.append((f"{label.removeprefix('embpress ')} [{path}]", "block_sparse_bag", args))
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import numpy as np

    count = args.bags * 40
    ids = {
        "zipf": common.zipf_indices(args.rows, count, seed=1),
        "uniform": common.uniform_indices(args.rows, count, seed=1),
        "hot": common.uniform_indices(min(HOT_ROWS, args.rows), count, seed=1),
    }
    offsets = np.arange(0, count + 1, 40, dtype=np.int64)
    weights = np.zeros(1, np.float32)
    with tempfile.TemporaryDirectory(prefix="embpress-kernel-ab-") as tmp:
        versions = load_versions(args.versions, args.kernel, Path(tmp))
        results = []
        for label, fn_name, table in cells(
            args.kernel, args.rows, args.dim, args.table, args.paths, args.bits
        ):
            for dist in args.dists:
                seconds: dict[str, list[float]] = {name: [] for name, _ in versions}
                outs: dict[str, Any] = {}
                for rnd in range(args.rounds + 1):  # round 0 compiles and warms up: not timed
                    for name, module in versions if rnd % 2 else versions[::-1]:
                        out = np.empty((args.bags, args.dim), np.float32)
                        t0 = time.perf_counter()
                        bad = getattr(module, fn_name)(
                            *table, ids[dist], offsets, weights, False, False, args.threads, out
                        )
                        if rnd:
                            seconds[name].append(time.perf_counter() - t0)
                        if bad:
                            raise SystemExit(f"kernel_ab.py: {name}: {bad} ids out of range")
                        outs[name] = out
                first = versions[0][0]
                for name, _ in versions:
                    per_id = [s / count * 1e9 for s in seconds[name]]
                    results.append(
                        {
                            "cell": label,
                            "dist": dist,
                            "version": name,
                            "ns_per_id": statistics.median(per_id),
                            "quartiles": statistics.quantiles(per_id, n=4) if len(per_id) > 1 else per_id * 3,
                            "same": bool(np.array_equal(outs[name], outs[first])),
                        }
                    )
                print(f"  {label}, {dist}: done", file=sys.stderr, flush=True)
    return results


def render(results: list[dict[str, Any]], cmd: str) -> str:
    rows = []
    base: dict[tuple[str, str], float] = {}
    for r in results:
        key = (r["cell"], r["dist"])
        base.setdefault(key, r["ns_per_id"])
        q1, _, q3 = r["quartiles"]
        rows.append(
            [
                r["cell"],
                r["dist"],
                r["version"],
                f"{r['ns_per_id']:.2f}",
                f"{q1:.2f}-{q3:.2f}",
                f"{r['ns_per_id'] / base[key]:.3f}",
                "yes" if r["same"] else "**NO**",
            ]
        )
    head = ["table", "ids", "version", "ns per id", "quartiles", "time / first", "sums as the first's"]
    return "\n".join(
        [
            f"Command: `{cmd}`",
            "",
            common.machine_markdown(),
            "",
            common.md_table(head, rows, align="lllrrrl"),
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", nargs="+", help="git revisions, kernel file paths or . (the working tree)")
    p.add_argument("--kernel", choices=sorted(KERNEL_FILES), required=True)
    p.add_argument("--table", choices=("planned", "rowwise8"), default="planned", help="mixed: which table")
    p.add_argument(
        "--paths", help="block-sparse: comma-separated kernel paths (default: every path this CPU runs)"
    )
    p.add_argument("--bits", default="8,4", help="block-sparse: comma-separated code widths of 8, 4, 2")
    p.add_argument("--dists", default=",".join(DISTS), help=f"comma-separated ids of {', '.join(DISTS)}")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--bags", type=int, default=4096, help="bags of 40 ids per call")
    p.add_argument("--threads", type=int, default=1, help="the kernels' own thread count (numba's)")
    p.add_argument("--rounds", type=int, default=40, help="timed calls per version and cell")
    args = p.parse_args(argv)
    from embpress.layouts.lookup import kernel_paths

    available = kernel_paths()
    args.paths = args.paths.split(",") if args.paths else list(available)
    widths = [b.strip() for b in args.bits.split(",")]
    if not widths or any(b not in ("8", "4", "2") for b in widths):
        p.error(f"--bits: comma-separated code widths of 8, 4 and 2, not {args.bits!r}")
    args.bits = [int(b) for b in widths]
    for path in args.paths:
        if path not in available:
            p.error(f"--paths: this CPU runs {', '.join(available)}, not {path!r}")
    args.dists = args.dists.split(",")
    for dist in args.dists:
        if dist not in DISTS:
            p.error(f"--dists: one of {', '.join(DISTS)}, not {dist!r}")
    if args.rounds < 1 or args.rows < 1 or args.bags < 1 or args.threads < 1:
        p.error("--rounds, --rows, --bags and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="embpress-kernel-ab-numba-") as cache:
        os.environ["NUMBA_CACHE_DIR"] = cache  # before numba is imported: every version compiles afresh
        args = parse_args(argv)
        common.quiet_torch_warnings()
        print(render(measure(args), common.command_line("bench/kernel_ab.py", argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
