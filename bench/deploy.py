"""Op boundary: what the embpress custom ops add to a lookup, and the fixed cost of a small batch.

The lookups are torch custom ops (``torch.ops.embpress.embedding_bag``) so that compiled
and exported graphs can hold them. This section measures, in the same run and on the same
ids, three ways to run the same lookup:

- *direct*: ``embpress.ops.embedding_bag_impl(table, ...)``, the checks and fused kernel
  as the modules ran them before the ops existed (no boundary at all);
- *op*: ``torch.ops.embpress.embedding_bag.default(...)``, what a ``torch.compile`` or
  ``torch.export`` graph calls (dispatcher, Python kernel, table view, the same lookup);
- *module*: ``QuantizedEmbeddingBag.__call__`` in eager mode, which runs the kernel
  directly when nothing traces the call (and the op otherwise).

Large batches: the lookup benchmark's step (``bench/lookup.py``: a rows x dim table,
``bags`` bags of ``pooling`` zipf or uniform ids, sum mode), every embpress contender,
one thread and all. The variants run interleaved (round after round, alternating their
order) and the ratio is the median of the per-round ratios, which cancels slow drifts of
the machine. Small batches (32 bags of 10 ids): microseconds per call against float32
``nn.EmbeddingBag`` on the same table, plus a ``torch.export``-ed program of the module.

Usage (from the repository root)::

    python bench/deploy.py                 # 1M x 128, 4096 bags x 40 (about 2 minutes)
    python bench/deploy.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import lookup

NAME = "deploy"
SCRIPT = "bench/deploy.py"
LIMIT = 1.03  # the op boundary may add at most 3% to the lookup step
SMALL_BAGS, SMALL_POOLING = 32, 10
LARGE_HEADERS = ["contender", "threads", "ids", "direct", "op", "op/direct (quartiles)", "op share"]
LARGE_HEADERS += ["module", "module/direct (quartiles)", "module share"]
SMALL_HEADERS = ["contender", "threads", "direct", "op", "op − direct", "op − direct, grad mode"]
SMALL_HEADERS += ["module", "exported", "module − float32", "module / float32"]


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int, steps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, one figure per round; the functions take turns
    within a round, ``steps`` calls each, the order rotating from round to round (so that
    none always follows the same one)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per: dict[str, list[float]] = {name: [] for name in fns}
    items = list(fns.items())
    for r in range(rounds):
        k = r % len(items)
        for name, fn in items[k:] + items[:k]:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            per[name].append((time.perf_counter() - t0) / steps)
    return per


def paired_ratio(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile over rounds of num/den (the same round's figures)."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return median, q1, q3


def ratio_fields(kind: str, ratio: tuple[float, float, float]) -> dict[str, float]:
    return {f"{kind}_ratio": ratio[0], f"{kind}_q1": ratio[1], f"{kind}_q3": ratio[2]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    from embpress import ops

    common.quiet_torch_warnings()
    weight = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0))
    emb = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    contenders = {name: module for name, (module, _) in lookup.build_embpress(emb, args.sparsity).items()}
    count = args.bags * args.pooling
    offsets = torch.arange(0, count, args.pooling, dtype=torch.int64)
    dists = {
        "zipf": torch.from_numpy(common.zipf_indices(args.rows, count, seed=1)),
        "uniform": torch.from_numpy(common.uniform_indices(args.rows, count, seed=1)),
    }
    small_ids = torch.from_numpy(common.uniform_indices(args.rows, SMALL_BAGS * SMALL_POOLING, seed=2))
    small_offsets = torch.arange(0, SMALL_BAGS * SMALL_POOLING, SMALL_POOLING, dtype=torch.int64)
    op = torch.ops.embpress.embedding_bag.default

    def variants(module: Any, ids: Any, offs: Any) -> dict[str, Callable[[], Any]]:
        table = module.table
        op_args = (
            table.op_tensors(),
            *table.op_fields(),
            ids,
            offs,
            None,
            ops.SUM,
            False,
            None,
            None,
            2.0,
        )
        return {
            "direct": lambda: ops.embedding_bag_impl(table, ids, offs, None, ops.SUM, False, None, None, 2.0),
            "op": lambda: op(*op_args),
            "module": lambda: module(ids, offs),
        }

    exported = {
        name: torch.export.export(module, (small_ids, small_offsets)).module()
        for name, module in contenders.items()
    }
    all_threads = torch.get_num_threads()
    large: list[dict[str, Any]] = []
    small: list[dict[str, Any]] = []
    with torch.inference_mode():
        for name, module in contenders.items():  # the three ways agree before they are timed
            for ids, offs in [(dists["uniform"], offsets), (small_ids, small_offsets)]:
                outs = [fn() for fn in variants(module, ids, offs).values()]
                if not all(torch.equal(outs[0], o) for o in outs[1:]):
                    raise RuntimeError(f"{name}: direct, op and module outputs differ")
        for t in sorted({1, all_threads}):
            torch.set_num_threads(t)
            for dist, ids in dists.items():
                for name, module in contenders.items():
                    fns = variants(module, ids, offsets)
                    fns["again"] = variants(module, ids, offsets)["direct"]  # A/A control: the noise
                    per = interleaved(fns, args.rounds, args.steps, args.warmup)
                    large.append(
                        {
                            "name": name,
                            "threads": t,
                            "dist": dist,
                            **{f"{k}_s": statistics.median(v) for k, v in per.items()},
                            **ratio_fields("op", paired_ratio(per["op"], per["direct"])),
                            **ratio_fields("module", paired_ratio(per["module"], per["direct"])),
                            **ratio_fields("again", paired_ratio(per["again"], per["direct"])),
                        }
                    )
                    row = large[-1]
                    print(
                        f"threads={t} {dist:7s} {name:28s} direct {row['direct_s'] * 1e3:7.3f} ms  "
                        f"op/direct {row['op_ratio']:.4f}  module/direct {row['module_ratio']:.4f}",
                        file=sys.stderr,
                        flush=True,
                    )
            fns = {"float32": lambda: emb(small_ids, small_offsets)}
            for name, module in contenders.items():
                for kind, fn in variants(module, small_ids, small_offsets).items():
                    fns[f"{name}|{kind}"] = fn
                fns[f"{name}|exported"] = lambda p=exported[name]: p(small_ids, small_offsets)
            per = interleaved(fns, args.rounds, args.small_steps, args.warmup)
            for key, values in per.items():
                name, _, kind = key.partition("|")
                row = {"name": name, "kind": kind or "float32", "threads": t, "s": statistics.median(values)}
                small.append(row)
        torch.set_num_threads(all_threads)
    # the op outside inference mode (grad mode on, nothing requiring a gradient): what a
    # compiled graph or an exported program called without torch.inference_mode pays,
    # its autograd kernel included; against the direct call in the same run
    for t in sorted({1, all_threads}):
        torch.set_num_threads(t)
        fns = {}
        for name, module in contenders.items():
            ways = variants(module, small_ids, small_offsets)
            fns.update({f"{name}|{kind}, grad mode": ways[kind] for kind in ("direct", "op")})
        per = interleaved(fns, args.rounds, args.small_steps, args.warmup)
        for key, values in per.items():
            name, _, kind = key.partition("|")
            small.append({"name": name, "kind": kind, "threads": t, "s": statistics.median(values)})
    torch.set_num_threads(all_threads)
    return {
        "rows": args.rows,
        "dim": args.dim,
        "bags": args.bags,
        "pooling": args.pooling,
        "all_threads": all_threads,
        "large": large,
        "small": small,
    }


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    us = 1e6
    large, small = data["large"], data["small"]
    threads = sorted({r["threads"] for r in large})
    names = list(dict.fromkeys(r["name"] for r in large))
    calls = {(r["name"], r["kind"], r["threads"]): r["s"] for r in small}

    def fixed(kind: str, name: str) -> float:
        """Seconds ``kind`` adds to the direct call: measured on small batches and one thread
        (a precise difference there; the boundary is single-threaded Python whatever the
        kernel's thread count, and a small multi-threaded call adds thread wake-up noise)."""
        return calls[(name, kind, 1)] - calls[(name, "direct", 1)]

    lines = [
        "## Op boundary (torch custom ops)",
        "",
        f"Command: `{cmd}`",
        "",
        "The lookups are torch custom ops (`torch.ops.embpress.embedding_bag` / `embedding`) so that "
        "`torch.compile(fullgraph=True)` and `torch.export` graphs hold them. Three ways to run the "
        "same lookup, timed in the same run on the same ids: *direct* = "
        "`embpress.ops.embedding_bag_impl(table, ...)`, the checks and fused kernel with no boundary "
        "(how the modules ran before the ops); *op* = `torch.ops.embpress.embedding_bag.default(...)`, "
        "what a compiled or exported graph calls (dispatcher, Python kernel, the same lookup); *module* "
        "= `QuantizedEmbeddingBag.__call__` in eager mode, which runs the kernel directly when nothing "
        "traces the call; *again*, the direct call once more, is an A/A control of the method. The "
        "variants take turns, round after round, in rotating order "
        f"({args.rounds} rounds of {args.steps} steps each after {args.warmup} warm-up calls); a ratio is "
        "the median of the per-round ratios, with their quartiles. The boundary is a fixed cost per "
        "call, the same for 320 ids as for 163,840 (it converts arguments, not data), so it is also "
        "measured where it is precise, on small batches on one thread (second table: op − direct, "
        "module − direct), and *share* divides that fixed cost by the step's direct time. The "
        "step ratios come out higher than those shares: a large lookup leaves the caches full of its "
        "ids and rows, and the Python and dispatcher code that runs before the next kernel then runs "
        "cold (timed by hand: the op's code before its kernel ran about 2.5 times slower after 16 MB "
        "had been written in between than in a loop of small calls, and a do-nothing op with one "
        "tensor argument showed the same). That is a cost of any op whose kernel is Python, which a "
        "C++ kernel would not pay.",
        "",
        f"### The lookup step ({data['rows']:,} x {data['dim']} table, {data['bags']:,} bags × "
        f"{data['pooling']} ids, sum)",
        "",
    ]
    rows_out = []
    for t in threads:
        for dist in ("zipf", "uniform"):
            for r in (r for r in large if r["threads"] == t and r["dist"] == dist):
                rows_out.append(
                    [
                        r["name"],
                        t,
                        dist,
                        common.fmt_seconds(r["direct_s"]),
                        common.fmt_seconds(r["op_s"]),
                        f"{r['op_ratio']:.3f} ({r['op_q1']:.3f}–{r['op_q3']:.3f})",
                        f"{fixed('op', r['name']) / r['direct_s']:.2%}",
                        common.fmt_seconds(r["module_s"]),
                        f"{r['module_ratio']:.3f} ({r['module_q1']:.3f}–{r['module_q3']:.3f})",
                        f"{fixed('module', r['name']) / r['direct_s']:.2%}",
                    ]
                )
    lines += [
        common.md_table(LARGE_HEADERS, rows_out, "lrlrrrrrrr"),
        "",
        f"### Small batches ({SMALL_BAGS} bags × {SMALL_POOLING} ids): time per call",
        "",
        "Medians over the rounds. The calls run in `torch.inference_mode()`, which skips autograd, "
        "except those of *op − direct, grad mode*, timed in another run outside it (grad mode on, "
        "nothing requiring a gradient): what a compiled graph or an exported program called without "
        "`inference_mode` pays, the op's autograd kernel included. *exported* = "
        "`torch.export.export(module, args).module()` called like the module (the program's own "
        "Python wrapper included). *module − float32* is the fixed cost embpress adds to "
        "`nn.EmbeddingBag`'s call on the same table.",
        "",
    ]
    small_rows = []
    for t in threads:
        f32 = calls[("float32", "float32", t)]
        small_rows.append(["float32 nn.EmbeddingBag", t, common.fmt_seconds(f32), *[""] * 7])
        for name in names:
            kinds = ("direct", "op", "module", "exported", "direct, grad mode", "op, grad mode")
            got = {kind: calls[(name, kind, t)] for kind in kinds}
            small_rows.append(
                [
                    name,
                    t,
                    common.fmt_seconds(got["direct"]),
                    common.fmt_seconds(got["op"]),
                    f"{(got['op'] - got['direct']) * us:+.1f} µs",
                    f"{(got['op, grad mode'] - got['direct, grad mode']) * us:+.1f} µs",
                    common.fmt_seconds(got["module"]),
                    common.fmt_seconds(got["exported"]),
                    f"{(got['module'] - f32) * us:+.1f} µs",
                    f"{got['module'] / f32:.2f}x",
                ]
            )
    lines += [
        common.md_table(SMALL_HEADERS, small_rows, "lrrrrrrrrr"),
        "",
        f"**Targets** (the boundary adds at most {LIMIT - 1:.0%} to the lookup step, measured on the "
        "step: the median over contenders, thread counts and ids of the per-cell ratios, and the "
        "worst cell; *module* is what eager callers pay, *op* what compiled and exported graphs pay):",
        "",
    ]
    control = statistics.median(r["again_ratio"] for r in large)
    for kind in ("module", "op"):
        ratios = [r[f"{kind}_ratio"] for r in large]
        median = statistics.median(ratios)
        shares = [(fixed(kind, r["name"]) / r["direct_s"], r) for r in large]
        share, at = max(shares, key=lambda x: x[0])
        costs = [fixed(kind, n) * us for n in names]
        lines.append(
            f"- {kind}/direct: median {median:.3f} over the {len(ratios)} cells (worst cell "
            f"{max(ratios):.3f}; the A/A control's median {control:.3f}, worst "
            f"{max(r['again_ratio'] for r in large):.3f}). Its fixed cost per call, "
            f"{min(costs):.0f}–{max(costs):.0f} µs, "
            f"is at most {share:.2%} of a step ({at['name']}, {at['threads']} thread(s), {at['dist']}): "
            f"**{common.pass_fail(median <= LIMIT)}**"
        )
        worst = max(large, key=lambda r: r[f"{kind}_ratio"])
        lines.append(
            f"- {kind}/direct in the worst cell ({worst['name']}, {worst['threads']} thread(s), "
            f"{worst['dist']}): {worst[f'{kind}_ratio']:.3f}, against the A/A control's worst "
            f"{max(r['again_ratio'] for r in large):.3f}: "
            f"**{common.pass_fail(worst[f'{kind}_ratio'] <= LIMIT)}**"
        )
    return "\n".join(lines) + "\n"


def no_plot(data: dict[str, Any], path: Path) -> None:
    """This section has tables only."""
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 20k-row table, 512 bags, few rounds")
    p.add_argument("--rows", type=int, help="rows (default 1,000,000; quick 20,000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--bags", type=int, help="bags per step (default 4096; quick 512)")
    p.add_argument("--pooling", type=int, default=40, help="ids per bag")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, help="rounds of turns (default 31; quick 5)")
    p.add_argument("--steps", type=int, help="lookup steps per turn (default 5; quick 2)")
    p.add_argument("--small-steps", type=int, help="small-batch calls per turn (default 300; quick 50)")
    common.add_output_args(p)
    args = p.parse_args(argv)
    args.rows = args.rows or (20_000 if args.quick else 1_000_000)
    args.bags = args.bags or (512 if args.quick else 4096)
    args.rounds = args.rounds or (5 if args.quick else 31)
    args.steps = args.steps or (2 if args.quick else 5)
    args.small_steps = args.small_steps or (50 if args.quick else 300)
    if args.quick:
        args.warmup = min(args.warmup, 2)
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line(SCRIPT, argv)
    return common.run_section(NAME, cmd, args, measure, no_plot, render)


if __name__ == "__main__":
    raise SystemExit(main())
