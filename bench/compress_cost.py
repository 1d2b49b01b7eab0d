"""Time and peak memory to compress one embedding table: embpress vs torch's reference.

Each measurement runs in a fresh interpreter (``--child``): it imports everything,
compresses a tiny table with the same settings (warm-up: numba cache, first-call costs),
builds the random ``rows x dim`` float32 input table, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), then times one ``post_training_sparse_quantize`` call and reads
``VmHWM``. "Peak beyond input" = peak RSS during the call minus RSS just before it, i.e.
everything the call allocates (the output table included) on top of the input table.

Cold start (``cold_child``): the same compression (0.8, (1,4), sparsify-first, 8 bits)
timed in a fresh interpreter from before ``import embpress`` (or torch.ao's, for the
reference) through the first call, then a second call (warm); for embpress also the first
and a warm block-sparse lookup of the lookup benchmark's step. It runs once per kernel
path this CPU runs (``EMBPRESS_KERNEL`` set in the child) with numba's disk cache as it
is (``--quick``: the fastest path only), and (not with ``--quick``) once with an empty
cache (what the first process after installing pays).

Usage (from the repository root)::

    python bench/compress_cost.py                 # 100k, 1M, 4M rows (about 6 minutes on 2 cores)
    python bench/compress_cost.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAME = "compress_cost"
SCRIPT = "bench/compress_cost.py"
# Peak extra memory of the reference, in units of the float32 table (measured 8-10x at
# 100k x 128; it sorts a copy of the block norms repeated block-size times, int64 indices).
REF_MEMORY_FACTOR = 10.0
TARGET_ROWS = 1_000_000
TARGET_SPEEDUP = 20.0
COLD_REPEATS = 3  # fresh processes per embpress cold row (one load of a noisy machine can swing one)
COLD_WARM_CALLS = 3  # warm compressions after the first in each of them: their median is "warm"
DEFAULT_SETTING = "4 bits, no pruning"  # embpress compress's default, in the cold-start table


# ------------------------------------------------------------------------------ child side
def _model(weight: Any) -> Any:
    from torch import nn

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum")

    return Holder()


def _compress(cfg: dict[str, Any], model: Any) -> Any:
    block = tuple(cfg["block"])
    if cfg["impl"] == "ours":
        import embpress

        return embpress.post_training_sparse_quantize(
            model,
            embpress.DataNormSparsifier,
            cfg["sparsify_first"],
            quant=embpress.QuantConfig(bits=cfg["bits"]),
            sparsity_level=cfg["sparsity"],
            sparse_block_shape=block,
        )
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefSparsifier
    from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
        post_training_sparse_quantize as ref_ptsq,
    )

    ref_ptsq(
        model,
        RefSparsifier,
        sparsify_first=cfg["sparsify_first"],
        sparsity_level=cfg["sparsity"],
        sparse_block_shape=block,
    )
    return model


def _lookup_steps(bag: Any, rows: int, steps: int) -> list[float]:
    """Seconds of ``steps`` lookup steps of ``bag`` (4,096 bags × 40 uniform ids, sum)."""
    import torch

    count = 4096 * 40
    ids = torch.from_numpy(common.uniform_indices(rows, count, seed=1))
    offsets = torch.arange(0, count, 40)
    seconds = []
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            bag(ids, offsets)
            seconds.append(time.perf_counter() - t0)
    return seconds


MEMFLOOR_BYTES = 512 << 20  # the memory floor's write: as much as the float32 table


def cold_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """First and second compression (and, for embpress, lookup) in this fresh process."""
    import os
    import tempfile

    if cfg["impl"] == "floor":  # numba alone: its import, then a cached one-line kernel
        import torch  # imported first, untimed, as for the others

        t0 = time.perf_counter()
        import numba  # noqa: F401  (timed: the import)

        t1 = time.perf_counter()
        from _numba_floor import one

        one(1)
        return {"import": t1 - t0, "first": time.perf_counter() - t1}
    if cfg["impl"] == "memfloor":  # a fresh process's first write of new memory, then again
        import numpy as np
        import torch  # imported first, untimed, as for the others

        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            block = np.ones(MEMFLOOR_BYTES, dtype=np.uint8)
            seconds.append(time.perf_counter() - t0)
            del block
        return {"first": seconds[0], "again": seconds[1]}
    if cfg.get("path"):
        os.environ["EMBPRESS_KERNEL"] = cfg["path"]
    if cfg.get("empty_cache"):  # numba's cache and the kernels compiled ahead of time
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="embpress-cold-")
        os.environ["EMBPRESS_CACHE_DIR"] = tempfile.mkdtemp(prefix="embpress-cold-")
    t0 = time.perf_counter()
    import torch

    common.quiet_torch_warnings()
    torch_import = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(cfg["seed"])
    weight = torch.randn(cfg["rows"], cfg["dim"], generator=gen)
    warm_calls = COLD_WARM_CALLS if cfg["impl"] == "ours" else 1  # the reference's take 15 s each
    models = [_model(weight.clone()) for _ in range(1 + warm_calls)]
    t0 = time.perf_counter()
    if cfg["impl"] == "ours":
        import embpress  # noqa: F401  (timed: the import is part of the first call's cost)
    else:
        import torch.ao.pruning._experimental.data_sparsifier.quantization_utils
    lib_import = time.perf_counter() - t0
    faulting = [0.0]
    if cfg["impl"] == "ours":  # time in the OS's handing over of fresh pre-faulted buffers
        from embpress import _buffers

        mapped = _buffers._mapped

        def timed_mapped(nbytes: int, populate: bool) -> Any:
            start = time.perf_counter()
            try:
                return mapped(nbytes, populate)
            finally:
                faulting[0] += time.perf_counter() - start

        _buffers._mapped = timed_mapped  # type: ignore[assignment]
    seconds, fresh = [], []
    for model in models:
        faulting[0] = 0.0
        t0 = time.perf_counter()
        _compress(cfg, model)
        seconds.append(time.perf_counter() - t0)
        fresh.append(faulting[0])
    out: dict[str, Any] = {
        "torch_import": torch_import,
        "import": lib_import,
        "first": seconds[0],
        "warm": statistics.median(seconds[1:]),
    }
    if cfg["impl"] == "ours":
        out.update(fresh_first=fresh[0], fresh_warm=statistics.median(fresh[1:]))
    if cfg["impl"] == "ours":
        from embpress.layouts.lookup import kernel_path

        lookups = _lookup_steps(models[0].emb, cfg["rows"], 3)
        out.update(lookup_first=lookups[0], lookup_warm=min(lookups[1:]), path=kernel_path())
        out["numba"] = "numba" in sys.modules  # loaded: some kernel ran under numba
    return out


def serve_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """A server's start in this fresh process: the table loaded from its file, then the
    lookup step (4,096 bags × 40 uniform ids) three times. embpress: ``import embpress``
    and ``embpress.load`` into a skeleton on the meta device; float32: ``torch.load``
    (``weights_only=True``) of its state into ``nn.EmbeddingBag.from_pretrained``."""
    import os

    if cfg.get("path"):
        os.environ["EMBPRESS_KERNEL"] = cfg["path"]
    import torch
    from torch import nn

    common.quiet_torch_warnings()
    t0 = time.perf_counter()
    if cfg["impl"] == "serve":
        import embpress

        lib_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = _model(torch.empty(cfg["rows"], cfg["dim"]))
        embpress.load(model, cfg["file"])
        bag = model.emb
    else:
        lib_import = 0.0
        state = torch.load(cfg["file"], weights_only=True)
        bag = nn.EmbeddingBag.from_pretrained(state["weight"], mode="sum")
    load = time.perf_counter() - t0
    lookups = _lookup_steps(bag, cfg["rows"], 4)
    out = {"import": lib_import, "load": load, "lookup_first": lookups[0], "lookup_warm": min(lookups[1:])}
    if cfg["impl"] == "serve":
        from embpress.layouts.lookup import kernel_path

        out["path"] = kernel_path()
        out["numba"] = "numba" in sys.modules
    return out


def serve_files(cfg: dict[str, Any], where: Path) -> dict[str, str]:
    """The cold-start table saved for ``serve_child``: float32 (``torch.save``) and
    compressed with the cold-start settings (``embpress.save``)."""
    import torch

    import embpress

    gen = torch.Generator().manual_seed(cfg["seed"])
    weight = torch.randn(cfg["rows"], cfg["dim"], generator=gen)
    files = {"float": str(where / "float32.pt"), "serve": str(where / "table.safetensors")}
    torch.save({"weight": weight}, files["float"])
    model = _model(weight)
    _compress({**cfg, "impl": "ours"}, model)
    embpress.save(model, files["serve"])
    return files


def measure_cold(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The cold-start runs: embpress on each kernel path (cache as it is), embpress with an
    empty numba cache, the reference."""
    import compileall

    import embpress
    from embpress.layouts.lookup import kernel_paths

    # the package's bytecode, as `pip install` writes it: an editable install run with
    # PYTHONDONTWRITEBYTECODE would otherwise compile every module's source in each child
    compileall.compile_dir(str(Path(embpress.__file__).parent), quiet=1)
    base = {"rows": args.cold_rows, "dim": args.dim, "sparsity": args.sparsity, "block": [1, 4]}
    base.update(bits=8, sparsify_first=True, seed=0, cold=True)
    paths = kernel_paths()[:1] if args.quick else kernel_paths()  # --quick: a smoke test
    repeats = 1 if args.quick else COLD_REPEATS
    # round after round, each path then the reference, so that a slow spell of the machine
    # (30-50% between minutes) falls on every contender rather than on one path's runs
    # also embpress compress's default settings (4 bits, no pruning), on the CPU's own path
    default = {**base, "impl": "ours", "path": "", "empty_cache": False, "bits": 4, "sparsity": 0.0}
    default["setting"] = DEFAULT_SETTING
    cfgs = []
    for _ in range(repeats):
        cfgs += [{**base, "impl": "ours", "path": p, "empty_cache": False} for p in paths]
        cfgs.append(default)
        cfgs.append({**base, "impl": "ref", "path": "", "empty_cache": False})
    if not args.quick:  # a full compile: a minute on a small machine
        cfgs.append({**base, "impl": "ours", "path": "", "empty_cache": True})
    script = Path(__file__).resolve()
    results = []
    floor = {**base, "impl": "floor", "path": "", "empty_cache": False}
    for _ in range(2):  # the first run may compile the kernel into the cache
        r = common.run_child(script, floor, timeout=args.timeout)
    if "error" not in r:
        results.append({**floor, **r})
    memfloor = {**base, "impl": "memfloor", "path": "", "empty_cache": False}
    r = common.run_child(script, memfloor, timeout=args.timeout)
    if "error" not in r:
        results.append({**memfloor, **r})
    # the caches as a server finds them once any process has run (the *empty* row is the
    # first process after installing): one untimed process per setting fills them, so
    # that no timed run compiles what changed since the last run
    for cfg in cfgs[: len(paths) + 1]:
        common.run_child(script, cfg, timeout=args.timeout)
    runs: dict[tuple[str, str, bool, str], list[dict[str, Any]]] = {}
    for cfg in cfgs:
        r = common.run_child(script, cfg, timeout=args.timeout)
        label = f"cold {cfg['impl']} path={cfg['path'] or 'auto'} empty_cache={cfg['empty_cache']}"
        if "error" in r:
            print(f"{label}: FAILED {r['error']}", file=sys.stderr, flush=True)
            r = {"skipped": f"failed: {r['error']}"}
        else:
            print(
                f"{label}: import+first {r['import'] + r['first']:.2f} s, warm {r['warm']:.2f} s",
                file=sys.stderr,
            )
        key = (cfg["impl"], cfg["path"], cfg["empty_cache"], cfg.get("setting", ""))
        runs.setdefault(key, []).append({**cfg, **r})
    for group in runs.values():
        results.append(median_run(group))
    results += measure_serve(args, base, paths, repeats)
    return results


def measure_serve(
    args: argparse.Namespace, base: dict[str, Any], paths: list[str], repeats: int
) -> list[dict[str, Any]]:
    """Fresh processes that load the table from its file and look it up (``serve_child``):
    embpress on each kernel path, float32."""
    import tempfile

    script = Path(__file__).resolve()
    results = []
    with tempfile.TemporaryDirectory(prefix="embpress-serve-") as where:
        files = serve_files(base, Path(where))
        cfgs = [{**base, "impl": "serve", "path": p, "file": files["serve"]} for p in paths]
        cfgs.append({**base, "impl": "serve_float", "path": "", "file": files["float"]})
        for cfg in cfgs:
            runs = []
            for _ in range(repeats):
                r = common.run_child(script, cfg, timeout=args.timeout)
                if "error" in r:
                    print(f"serve {cfg['impl']} {cfg['path']}: FAILED {r['error']}", file=sys.stderr)
                    continue
                runs.append({**cfg, **r, "serve": True})
            if runs:  # the run with the median time to the first result
                runs.sort(key=lambda r: r["import"] + r["load"] + r["lookup_first"])
                results.append({**runs[len(runs) // 2], "runs": len(runs)})
            else:
                results.append({**cfg, "serve": True, "skipped": "failed"})
    return results


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated cold runs, the one whose extra (import + first - warm) is the median
    (the upper one of an even count), with the number of runs; a failed run if all failed."""
    done = [r for r in runs if "first" in r]
    if not done:
        return runs[0]
    cold = statistics.median(r["import"] + r["first"] for r in done)
    done.sort(key=lambda r: r["import"] + r["first"] - r["warm"])
    return {**done[len(done) // 2], "runs": len(done), "cold_median": cold}


def render_serve(serve: list[dict[str, Any]]) -> list[str]:
    """The table of first lookups after loading, and the cold-start target read on them."""
    rows_out = []
    for r in serve:
        who = "embpress" if r["impl"] == "serve" else "float32"
        name = [who, r.get("path") or "–", str(r.get("runs", 0))]
        name.append(("yes" if r["numba"] else "no") if "numba" in r else "–")
        if "load" not in r:
            rows_out.append([*name, r.get("skipped", "failed"), "", "", "", "", ""])
            continue
        ready = r["import"] + r["load"] + r["lookup_first"]
        rows_out.append(
            [
                *name,
                common.fmt_seconds(r["import"]) if r["impl"] == "serve" else "–",
                common.fmt_seconds(r["load"]),
                common.fmt_seconds(r["lookup_first"]),
                common.fmt_seconds(r["lookup_warm"]),
                common.fmt_seconds(ready),
                f"{r['import'] + r['lookup_first'] - r['lookup_warm']:+.2f} s",
            ]
        )
    lines = [
        "### First lookup after loading (a server's start)",
        "",
        "The same table, compressed as above and saved (`embpress.save`), in a fresh process "
        "with torch imported (untimed): *import* of embpress, *load* (`embpress.load` into a "
        "skeleton on the meta device; float32: `torch.load(weights_only=True)` of its state into "
        "`nn.EmbeddingBag.from_pretrained`), then the lookup step four times (*first*, and the "
        "fastest of the other three, *warm*). *ready* = import + load + first lookup; *extra* = "
        "import + first − warm lookup: what the process's first lookup costs beyond a warm one. "
        "*runs*: fresh processes; the one with the median *ready* is shown. *numba*: whether the "
        "process imported numba.",
        "",
        common.md_table(
            [
                "table",
                "path",
                "runs",
                "numba",
                "import",
                "load",
                "first lookup",
                "warm lookup",
                "ready",
                "extra",
            ],
            rows_out,
            "llrlrrrrrr",
        ),
        "",
        "**Targets** (issue 12: a first lookup at most 0.2 s over a warm one, import included):",
        "",
    ]
    for r in serve:
        if r["impl"] == "serve" and "load" in r:
            extra = r["import"] + r["lookup_first"] - r["lookup_warm"]
            verdict = common.pass_fail(extra <= 0.2)
            lines.append(f"- [{r['path']}] first lookup extra {extra:.2f} s: **{verdict}**")
    lines.append("")
    return lines


def render_cold(cold: list[dict[str, Any]]) -> list[str]:
    """The cold-start table and its targets."""
    serve = [r for r in cold if r.get("serve")]
    cold = [r for r in cold if not r.get("serve")]
    if not cold:
        return render_serve(serve) if serve else []
    rows_out = []
    floor = next((r for r in cold if r["impl"] == "floor"), None)
    memfloor = next((r for r in cold if r["impl"] == "memfloor"), None)
    cold = [r for r in cold if r["impl"] not in ("floor", "memfloor")]
    for r in cold:
        who = "embpress" if r["impl"] == "ours" else "reference"
        if r.get("setting"):
            who += f" ({r['setting']})"
        cache = "empty" if r["empty_cache"] else "as is"
        name = [
            who,
            r.get("path") or ("auto" if r["impl"] == "ours" else "–"),
            cache if r["impl"] == "ours" else "–",
        ]
        name.append(str(r.get("runs", 1)))
        name.append(("yes" if r["numba"] else "no") if "numba" in r else "–")
        if "first" not in r:
            rows_out.append([*name, r["skipped"], "", "", "", "", "", ""])
            continue
        cold_total = r["import"] + r["first"]
        lookup = ["–", "–"]
        if "lookup_first" in r:
            lookup = [common.fmt_seconds(r["lookup_first"]), common.fmt_seconds(r["lookup_warm"])]
        fresh = "–"
        if "fresh_first" in r:
            fresh = f"{common.fmt_seconds(r['fresh_first'])} / {common.fmt_seconds(r['fresh_warm'])}"
        rows_out.append(
            [
                *name,
                common.fmt_seconds(r["import"]),
                common.fmt_seconds(cold_total),
                common.fmt_seconds(r["warm"]),
                f"{cold_total - r['warm']:+.2f} s",
                fresh,
                *lookup,
            ]
        )
    rows = cold[0]["rows"]
    lines = [
        "### Cold start",
        "",
        f"{rows:,} x {cold[0]['dim']}, 0.8, (1,4), sparsify-first, 8 bits, each in a fresh process: "
        "*import* of embpress (torch.ao's module for the reference; torch itself is imported first, "
        f"untimed), *cold* = import + first compression, *warm* = the median of {COLD_WARM_CALLS} more "
        "compressions in the same process (one for the reference), *extra* = cold − warm; then the "
        "first and a warm lookup step (4,096 bags × 40 uniform ids). *fresh memory*: the time "
        "the first call, then a warm one (median), spent getting its large buffers from the OS, "
        "mapped and faulted in at once (`embpress._buffers`): the part of *extra* that a "
        "process's first touch of new memory costs, which varies with what the OS has at hand. "
        "*path*: `EMBPRESS_KERNEL` in the child; *kernel caches*: numba's on-disk cache and "
        "the kernels compiled ahead of time "
        "(`EMBPRESS_CACHE_DIR`) as earlier runs left them, after one untimed process of each "
        "setting (so that no timed run compiles), or both empty (the first process after "
        "installing). The package's Python bytecode is compiled before the runs, as `pip install` "
        "leaves it. *runs*: fresh processes of that row, taken round after round (each path, then "
        "the reference); the one with the median extra is shown, and the ratio to the reference "
        "divides the medians of their cold times. "
        "*numba*: whether the child imported numba (it does only to compile a kernel, or to run "
        f"one that has no compiled form). *embpress ({DEFAULT_SETTING})*: the same table with "
        "`embpress compress`'s default settings (a dense table, FBGEMM's clipping search per row), "
        "on the CPU's own path; not the targets' setting.",
        "",
        common.md_table(
            [
                "impl",
                "path",
                "kernel caches",
                "runs",
                "numba",
                "import",
                "cold",
                "warm",
                "extra",
                "fresh memory",
                "first lookup",
                "warm lookup",
            ],
            rows_out,
            "lllrlrrrrrrr",
        ),
        "",
    ]
    if floor is not None:
        lines += [
            f"numba's own floor, in a fresh process with torch imported: `import numba` "
            f"{common.fmt_seconds(floor['import'])}, then the first call of a one-line kernel "
            f"already cached on disk {common.fmt_seconds(floor['first'])} (numba sets up its "
            f"compiler target), {common.fmt_seconds(floor['import'] + floor['first'])} in all "
            "(`bench/_numba_floor.py`): any numba program pays it before its first kernel runs "
            "(embpress's compiled kernels do not load numba).",
            "",
        ]
    if memfloor is not None:
        lines += [
            f"A fresh process's first write of {MEMFLOOR_BYTES >> 20} MB of new memory (numpy, torch "
            f"imported) took {common.fmt_seconds(memfloor['first'])}, the same write again "
            f"{common.fmt_seconds(memfloor['again'])}: a first compression pays such page faults "
            "on every buffer it makes, the warm ones reuse memory the process has freed.",
            "",
        ]
    ref = next((r for r in cold if r["impl"] == "ref" and "first" in r), None)
    lines.append(
        "**Targets** (issue 12: cold extra at most 0.2 s over warm with the cache in place; "
        "cold against the reference's cold at least 25x):"
    )
    lines.append("")
    for r in cold:
        if r["impl"] != "ours" or "first" not in r or r["empty_cache"] or r.get("setting"):
            continue
        cold_total = r["import"] + r["first"]
        extra = cold_total - r["warm"]
        line = f"- [{r['path']}] cold extra {extra:.2f} s: **{common.pass_fail(extra <= 0.2)}**"
        if "fresh_first" in r:
            share = max(r["fresh_first"] - r["fresh_warm"], 0.0)  # (a warm call may take longer)
            line += f" ({share:.2f} s of it getting fresh memory)"
        lines.append(line)
        if ref is not None:
            speedup = ref.get("cold_median", ref["import"] + ref["first"])
            speedup /= r.get("cold_median", cold_total)
            verdict = common.pass_fail(speedup >= 25)
            lines.append(f"- [{r['path']}] cold vs reference cold {speedup:.1f}x: **{verdict}**")
    lines.append("")
    return lines + (render_serve(serve) if serve else [])


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One measurement (runs in a fresh process)."""
    if cfg.get("cold") and cfg["impl"] in ("serve", "serve_float"):
        return serve_child(cfg)
    if cfg.get("cold"):
        return cold_child(cfg)
    import torch

    common.quiet_torch_warnings()
    torch.manual_seed(cfg["seed"])
    rows, dim = cfg["rows"], cfg["dim"]
    warm = _model(torch.randn(min(rows, 4096), dim))
    _compress(cfg, warm)
    del warm
    gen = torch.Generator().manual_seed(cfg["seed"])
    weight = torch.randn(rows, dim, generator=gen)
    model = _model(weight)
    peak = common.PeakMemory()
    peak.start()
    t0 = time.perf_counter()
    _compress(cfg, model)
    seconds = time.perf_counter() - t0
    peak_bytes = peak.stop()
    out: dict[str, Any] = {"seconds": seconds, "peak": peak_bytes, "peak_exact": peak.exact}
    if cfg["impl"] == "ours":
        out["nbytes"] = int(model.emb.nbytes)
        out["layout"] = model.emb.layout
    else:
        out["nbytes"] = common.reference_table_bytes(model.emb)["memory"]
        out["layout"] = "dense int8 (torch.ao)"
    return out


# ------------------------------------------------------------------------------ parent side
def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every measurement to make, smallest tables first."""
    cfgs = []
    for rows in args.rows:
        widths = [w if w > 0 else args.dim for w in args.blocks]
        for impl, width, bits, order in itertools.product(("ours", "ref"), widths, args.bits, args.orders):
            if impl == "ref" and bits != 8:
                continue  # the reference has 8 bits only
            if args.quick and not _in_quick_grid(impl, width == widths[0], bits, order == "sf"):
                continue
            if order == "qf" and rows > args.all_orders_max_rows:
                continue  # time budget: quantize-first only up to --all-orders-max-rows
            cfgs.append(
                {
                    "impl": impl,
                    "rows": rows,
                    "dim": args.dim,
                    "sparsity": args.sparsity,
                    "block": [1, width],
                    "bits": bits,
                    "sparsify_first": order == "sf",
                    "seed": 0,
                }
            )
    return cfgs


def _in_quick_grid(impl: str, first_block: bool, bits: int, sf: bool) -> bool:
    """--quick: both orders only for the first block at 8 bits (embpress), sparsify-first otherwise."""
    if impl == "ref":
        return sf
    if bits == 8:
        return first_block or sf
    return first_block and sf


def repeats_for(cfg: dict[str, Any], args: argparse.Namespace) -> int:
    """More repeats where a run is short, and for the target comparison."""
    if _is_target(cfg):
        return max(args.repeats_large, args.target_repeats)
    return args.repeats if cfg["rows"] <= args.small_rows else args.repeats_large


def ref_skip_reason(cfg: dict[str, Any], args: argparse.Namespace) -> str | None:
    table = cfg["rows"] * cfg["dim"] * 4
    need = (REF_MEMORY_FACTOR + 1.5) * table
    avail = common.mem_available_bytes()
    if avail and need > 0.9 * avail:
        return (
            f"skipped: needs ~{need / 1e9:.0f} GB ({REF_MEMORY_FACTOR:.0f}x the {table / 1e9:.1f} GB "
            f"table on top of it), {avail / 1e9:.0f} GB available"
        )
    if cfg["rows"] > args.ref_max_rows:
        return f"skipped: above --ref-max-rows {args.ref_max_rows:,} (time budget)"
    return None


def key(cfg: dict[str, Any]) -> tuple[Any, ...]:
    return (cfg["impl"], cfg["rows"], cfg["block"][1], cfg["bits"], cfg["sparsify_first"])


def _is_target(cfg: dict[str, Any]) -> bool:
    """The target's setting (1M rows, (1,4), 8 bits, sparsify-first), either impl."""
    return (
        cfg["rows"] == TARGET_ROWS and cfg["block"] == [1, 4] and cfg["sparsify_first"] and cfg["bits"] == 8
    )


def _label(cfg: dict[str, Any]) -> str:
    return (
        f"{cfg['impl']:4s} rows={cfg['rows']:>8d} block=(1,{cfg['block'][1]}) bits={cfg['bits']} "
        f"{'sparsify-first' if cfg['sparsify_first'] else 'quantize-first'}"
    )


def _summarise(cfg: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The result row of ``cfg`` from its runs (fresh processes), or why it has none."""
    if "error" in runs[0]:
        print(f"{_label(cfg)}: FAILED {runs[0]['error']}", file=sys.stderr, flush=True)
        return {**cfg, "skipped": f"failed: {runs[0]['error']}"}
    times = [r["seconds"] for r in runs]
    res = {
        **cfg,
        "seconds": statistics.median(times),
        "all_seconds": times,  # in the order run
        "peak": max(r["peak"] for r in runs),
        "peak_exact": all(r["peak_exact"] for r in runs),
        "nbytes": runs[0]["nbytes"],
        "layout": runs[0]["layout"],
    }
    print(
        f"{_label(cfg)}: {common.fmt_seconds(res['seconds'])} (n={len(times)}), "
        f"peak beyond input {common.fmt_bytes(res['peak'])}",
        file=sys.stderr,
        flush=True,
    )
    return res


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting of the grid in fresh processes; the target's setting of embpress and
    of the reference taken in turns (embpress, reference, embpress, ...), so that the
    machine's slower minutes fall on both and their ratio is read pair by pair."""
    results = []
    script = Path(__file__).resolve()
    paired: list[dict[str, Any]] = []
    for cfg in grid(args):
        skip = ref_skip_reason(cfg, args) if cfg["impl"] == "ref" else None
        if skip:
            print(f"{_label(cfg)}: {skip}", file=sys.stderr, flush=True)
            results.append({**cfg, "skipped": skip})
            continue
        if _is_target(cfg):
            paired.append(cfg)
            continue
        runs = []
        for _ in range(repeats_for(cfg, args)):
            r = common.run_child(script, cfg, timeout=args.timeout)
            if "error" in r:
                runs = [r]
                break
            runs.append(r)
        results.append(_summarise(cfg, runs))
    if paired:
        taken: list[list[dict[str, Any]]] = [[] for _ in paired]
        for _ in range(max(repeats_for(cfg, args) for cfg in paired)):
            for cfg, runs in zip(paired, taken, strict=True):
                if not runs or "error" not in runs[-1]:
                    runs.append(common.run_child(script, cfg, timeout=args.timeout))
        for cfg, runs in zip(paired, taken, strict=True):
            results.append(_summarise(cfg, [r for r in runs if "error" not in r] or runs[-1:]))
    if args.cold_rows:
        results += measure_cold(args)
    return results


def _exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(rows): 1.0 = linear."""
    if len(points) < 2:
        return None
    xs = [math.log(r) for r, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def _order(sf: bool) -> str:
    return "sparsify-first" if sf else "quantize-first"


def _block(width: int, dim: int) -> str:
    return f"(1,{width})" + (" rows" if width == dim else "")


def render(results: list[dict[str, Any]], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    cold = [r for r in results if r.get("cold")]
    results = [r for r in results if not r.get("cold")]
    by_key = {key(r): r for r in results}
    lines = [
        "## Compression cost (time and peak memory)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Random normal float32 tables of {args.dim} columns, sparsity {args.sparsity}, DataNormSparsifier "
        "(L1), one `post_training_sparse_quantize` call each. Every measurement runs in a fresh process "
        "after a warm-up compression of a tiny table; *time* is the median over the repeats (n); *peak "
        "beyond input* is the peak RSS during the call minus the RSS just before it (the input table "
        "already allocated), so it includes the output table. *×table* divides it by the float32 "
        "table's bytes. The reference is torch.ao's `post_training_sparse_quantize` with its "
        "`DataNormSparsifier` (8 bits only).",
        "",
    ]
    if any(r > args.all_orders_max_rows for r in args.rows) and "qf" in args.orders:
        lines += [
            f"Quantize-first runs stop at {args.all_orders_max_rows:,} rows (time budget of the full "
            "run; `--all-orders-max-rows` changes it). The reference runs only where the memory it needs "
            f"(~{REF_MEMORY_FACTOR:.0f}x the table on top of it, measured) fits in the available memory "
            f"and up to `--ref-max-rows` {args.ref_max_rows:,}.",
            "",
        ]
    if not all(r.get("peak_exact", True) for r in results if "seconds" in r):
        lines += ["**Note:** this kernel refused to reset the peak-RSS mark; peaks are upper bounds.", ""]
    rows_out = []
    for r in results:
        case = [
            f"{r['rows']:,}",
            "embpress" if r["impl"] == "ours" else "reference",
            _block(r["block"][1], r["dim"]),
            r["bits"],
            _order(r["sparsify_first"]),
        ]
        if "seconds" not in r:
            rows_out.append([*case, r["skipped"], "", "", "", ""])
            continue
        table = r["rows"] * r["dim"] * 4
        rows_out.append(
            [
                *case,
                f"{common.fmt_seconds(r['seconds'])} (n={len(r['all_seconds'])})",
                common.fmt_bytes(r["peak"]),
                f"{r['peak'] / table:.2f}",
                common.fmt_bytes(r["nbytes"]),
                r["layout"],
            ]
        )
    lines += [
        common.md_table(
            [
                "rows",
                "impl",
                "block",
                "bits",
                "order",
                "time",
                "peak beyond input",
                "×table",
                "output",
                "layout",
            ],
            rows_out,
            "rllrlrrrrl",
        ),
        "",
        "### embpress against the reference (8 bits, same run)",
        "",
    ]
    cmp_rows = []
    for r in results:
        if r["impl"] != "ours" or r["bits"] != 8 or "seconds" not in r:
            continue
        ref = by_key.get(("ref", r["rows"], r["block"][1], 8, r["sparsify_first"]))
        if ref is None:
            continue
        if "seconds" not in ref:
            cmp_rows.append(
                [
                    f"{r['rows']:,}",
                    _block(r["block"][1], r["dim"]),
                    _order(r["sparsify_first"]),
                    common.fmt_seconds(r["seconds"]),
                    ref["skipped"],
                    "",
                    "",
                    common.fmt_bytes(r["peak"]),
                    "",
                    "",
                ]
            )
            continue
        cmp_rows.append(
            [
                f"{r['rows']:,}",
                _block(r["block"][1], r["dim"]),
                _order(r["sparsify_first"]),
                common.fmt_seconds(r["seconds"]),
                common.fmt_seconds(ref["seconds"]),
                f"{r['seconds'] / ref['seconds']:.3f}",
                f"**{ref['seconds'] / r['seconds']:.1f}x**",
                common.fmt_bytes(r["peak"]),
                common.fmt_bytes(ref["peak"]),
                f"{r['peak'] / ref['peak']:.3f}" if ref["peak"] else "–",
            ]
        )
    lines += [
        common.md_table(
            [
                "rows",
                "block",
                "order",
                "embpress time",
                "reference time",
                "time ours/ref",
                "speed-up",
                "embpress peak",
                "reference peak",
                "peak ours/ref",
            ],
            cmp_rows,
            "rllrrrrrrr",
        ),
        "",
    ]
    # growth with rows
    sizes = sorted({r["rows"] for r in results})
    growth_rows = []
    for k in sorted({key(r)[:1] + key(r)[2:] for r in results}):
        impl, width, bits, sf = k
        pts = [
            (rows, by_key[(impl, rows, width, bits, sf)]["seconds"])
            for rows in sizes
            if "seconds" in by_key.get((impl, rows, width, bits, sf), {})
        ]
        exp = _exponent(pts)
        cells = []
        for rows in sizes:
            hit = by_key.get((impl, rows, width, bits, sf), {})
            cells.append(common.fmt_seconds(hit["seconds"]) if "seconds" in hit else "–")
        per_row = [f"{t / n * 1e9:.0f}" for n, t in pts[-1:]]
        growth_rows.append(
            [
                "embpress" if impl == "ours" else "reference",
                _block(width, args.dim),
                bits,
                _order(sf),
                *cells,
                per_row[0] if per_row else "–",
                "–" if exp is None else f"{exp:.2f}",
            ]
        )
    lines += [
        "### How time grows with rows",
        "",
        "*Exponent*: slope of log(time) against log(rows) over the sizes measured (1.00 = linear). "
        "*ns/row*: time per row at the largest size measured.",
        "",
        common.md_table(
            ["impl", "block", "bits", "order", *[f"{n:,} rows" for n in sizes], "ns/row", "exponent"],
            growth_rows,
            "llrl" + "r" * (len(sizes) + 2),
        ),
        "",
    ]
    if plot is not None:
        lines += [f"![compression time against rows]({common.relpath(plot, args.md_root)})", ""]
    lines += [target_lines(results, args), ""]
    lines += render_cold(cold)
    return "\n".join(lines)


def target_lines(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """PASS/FAIL of the issue's target (at 1M rows; at the largest size in --quick)."""
    by_key = {key(r): r for r in results}
    sizes = sorted({r["rows"] for r in results})
    rows = TARGET_ROWS if TARGET_ROWS in sizes else sizes[-1]
    note = "" if rows == TARGET_ROWS else f" (measured at {rows:,} rows; the target is for 1,000,000)"
    ours = by_key.get(("ours", rows, 4, 8, True), {})
    ref = by_key.get(("ref", rows, 4, 8, True), {})
    out = [f"**Target** (0.8, (1,4), sparsify-first, 8 bits){note}:"]
    if "seconds" in ours and "seconds" in ref:
        pairs = list(zip(ours["all_seconds"], ref["all_seconds"], strict=False))
        if len(pairs) > 1:  # taken in turns: the median of the pairs' ratios
            speedup = statistics.median(b / a for a, b in pairs)
            how = f"the median of {len(pairs)} pairs of fresh processes taken in turns"
        else:
            speedup = ref["seconds"] / ours["seconds"]
            how = "one run each"
        out.append(
            f"- speed-up over the reference {speedup:.1f}x ({how}; target >= {TARGET_SPEEDUP:.0f}x): "
            f"**{common.pass_fail(speedup >= TARGET_SPEEDUP)}**"
        )
    else:
        out.append("- speed-up over the reference: not measured (reference or embpress run missing)")
    if "seconds" in ours:
        table = rows * args.dim * 4
        out.append(
            f"- embpress peak beyond input {common.fmt_bytes(ours['peak'])} vs the table "
            f"{common.fmt_bytes(table)}: **{common.pass_fail(ours['peak'] <= table)}**"
        )
    return "\n".join(out)


def plot_results(results: list[dict[str, Any]], path: Path, dim: int) -> Path | None:
    results = [r for r in results if not r.get("cold")]
    plt = common.setup_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    series: dict[tuple[Any, ...], list[tuple[int, float]]] = {}
    for r in results:
        if "seconds" in r:
            k = (r["impl"], r["block"][1], r["bits"], r["sparsify_first"])
            series.setdefault(k, []).append((r["rows"], r["seconds"]))
    if not series:
        plt.close(fig)
        return None
    for (impl, width, bits, sf), pts in sorted(series.items()):
        pts.sort()
        label = f"{'embpress' if impl == 'ours' else 'reference'} (1,{width}) {bits}b {'sf' if sf else 'qf'}"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o" if impl == "ours" else "s",
            linestyle="-" if impl == "ours" else "--",
            label=label,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"rows (x {dim} columns)")
    ax.set_ylabel("seconds")
    ax.set_title("post_training_sparse_quantize time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return common.save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny tables and a reduced grid (seconds)")
    p.add_argument("--rows", type=int, nargs="+", help="table sizes (default 100k 1M 4M; quick 5k 20k)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 0], help="block widths; 0 = whole rows")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--orders", nargs="+", default=["sf", "qf"], choices=["sf", "qf"])
    p.add_argument("--repeats", type=int, default=3, help="repeats at <= --small-rows rows")
    p.add_argument("--repeats-large", type=int, default=1, help="repeats above --small-rows rows")
    p.add_argument("--target-repeats", type=int, default=3, help="repeats of the 1M target comparison")
    p.add_argument("--small-rows", type=int, default=200_000)
    p.add_argument(
        "--all-orders-max-rows",
        type=int,
        default=4_000_000,
        help="above this many rows only sparsify-first is run (time budget)",
    )
    p.add_argument("--ref-max-rows", type=int, default=2_000_000, help="largest table run with the reference")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    p.add_argument(
        "--cold-rows",
        type=int,
        help="rows of the cold-start runs (default 1,000,000; quick 20,000; 0 skips them)",
    )
    common.add_output_args(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows is None:
        args.rows = [5_000, 20_000] if args.quick else [100_000, 1_000_000, 4_000_000]
    if args.cold_rows is None:
        args.cold_rows = 20_000 if args.quick else TARGET_ROWS
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.target_repeats = 1
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        common.child_report(child(json.loads(args.child)))
        return 0
    cmd = common.command_line(SCRIPT, argv)
    plot = functools.partial(plot_results, dim=args.dim)
    return common.run_section(NAME, cmd, args, measure, plot, render)


if __name__ == "__main__":
    raise SystemExit(main())
