"""Time to plan one embedding table for a byte budget, and to apply the plan, against
``post_training_sparse_quantize`` making a table of the same bytes.

The table is ``rows x dim`` float32, trained-like (per-row scales, heavy-tailed values); the
budget is the bytes of uniform 2-bit rows (what ``post_training_sparse_quantize`` with
``QuantConfig(bits=2)`` and no pruning stores), so both make a table of the same size.
Planning is split into the per-row errors of every codec (``quant.codecs.row_errors``) and
the allocation; with usage, Zipf-skewed counts over the rows are used. Everything is
warmed up on a small table first (numba's compile and disk cache), then timed once.

Usage (from the repository root)::

    python bench/plan_cost.py                    # 1M x 128 (about a minute on 2 cores)
    python bench/plan_cost.py --rows 100000      # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAME = "plan_cost"
SCRIPT = "bench/plan_cost.py"
PLAN_TARGET_S = 5.0  # the limit for planning a 1M x 128 table on 2 cores
APPLY_TARGET_RATIO = 2.0  # applying within 2x of post_training_sparse_quantize's time


def _table(rows: int, dim: int, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 2 + 0.05
    return (torch.randn(rows, dim, generator=g) ** 3 * scale * 0.1).contiguous()


def _model(weight: Any) -> Any:
    from torch import nn

    model = nn.Module()
    model.emb = nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum")
    return model


def _usage(rows: int) -> Any:
    import numpy as np
    import torch

    import embpress

    ids = common.zipf_indices(rows, 4 * rows, seed=1)
    counts = np.bincount(ids, minlength=rows).astype(np.float64)
    return embpress.Usage({"emb": torch.from_numpy(counts)})


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cpu_timed(fn: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result): on a busy machine the CPU
    seconds divided by the threads say what a quiet one would take."""
    c0 = time.process_time()
    wall, out = _timed(fn)
    return wall, time.process_time() - c0, out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import embpress
    import embpress.planner as planner
    from embpress import DataNormSparsifier, QuantConfig, post_training_sparse_quantize
    from embpress.layouts.mixed import MixedTable
    from embpress.quant.codecs import Codec

    warm_rows = 70_000  # above the planner's one-thread limit: its parallel kernels load too
    small = _table(warm_rows, args.dim, seed=3)
    warm_budget = MixedTable.predicted_size(warm_rows, args.dim, [warm_rows], [Codec.parse("rowwise2")])
    embpress.plan(_model(small), warm_budget).apply(_model(small))
    post_training_sparse_quantize(
        _model(small), DataNormSparsifier, quant=QuantConfig(bits=2), sparsity_level=0.0
    )

    weight = _table(args.rows, args.dim)
    results: dict[str, Any] = {"rows": args.rows, "dim": args.dim, "threads": torch.get_num_threads()}

    ref_model = _model(weight)
    ref_s, ref_cpu, _ = _cpu_timed(
        lambda m=ref_model: post_training_sparse_quantize(
            m, DataNormSparsifier, quant=QuantConfig(bits=2), sparsity_level=0.0
        )
    )
    results["pstq_2bit_s"] = ref_s
    results["pstq_2bit_cpu_s"] = ref_cpu
    results["pstq_2bit_bytes"] = budget = ref_model.emb.nbytes  # the planner gets the same bytes
    results["budget_bytes"] = budget
    del ref_model

    costs_time: list[float] = []
    original = planner._table_costs

    def timed_costs(*a: Any) -> Any:
        t, out = _timed(lambda: original(*a))
        costs_time.append(t)
        return out

    planner._table_costs = timed_costs  # split planning into row errors and allocation
    try:
        for label, usage in (("uniform", None), ("usage", _usage(args.rows))):
            model = _model(weight)
            costs_time.clear()
            plan_s, plan_cpu, plan = _cpu_timed(
                lambda model=model, usage=usage: embpress.plan(model, budget, usage=usage)
            )
            apply_s, apply_cpu, _ = _cpu_timed(
                lambda model=model, plan=plan, usage=usage: plan.apply(model, usage)
            )
            results[label] = {
                "plan_s": plan_s,
                "plan_cpu_s": plan_cpu,
                "apply_cpu_s": apply_cpu,
                "row_errors_s": sum(costs_time),
                "allocation_s": plan_s - sum(costs_time),
                "apply_s": apply_s,
                "predicted_bytes": plan.predicted_bytes,
                "nbytes": model.emb.nbytes,
                "choice": plan.tables[0].summary(),
                "rel_error": plan.tables[0].predicted_error / plan.tables[0].reference_error,
            }
            del model
    finally:
        planner._table_costs = original
    return results


def render(data: dict[str, Any], cmd: str, machine: str, load_note: str) -> str:
    rows = []
    for label in ("uniform", "usage"):
        r = data[label]
        rows.append(
            [
                "planner" + (", with usage" if label == "usage" else ""),
                common.fmt_seconds(r["plan_s"]),
                common.fmt_seconds(r["plan_cpu_s"]),
                common.fmt_seconds(r["row_errors_s"]),
                common.fmt_seconds(r["allocation_s"]),
                common.fmt_seconds(r["apply_s"]),
                common.fmt_seconds(r["apply_cpu_s"]),
                f"{r['apply_s'] / data['pstq_2bit_s']:.2f}x",
                common.fmt_bytes(r["nbytes"]),
                "yes" if r["nbytes"] == r["predicted_bytes"] <= data["budget_bytes"] else "NO",
                r["choice"],
            ]
        )
    rows.append(
        [
            "post_training_sparse_quantize, 2-bit, no pruning",
            "–",
            "–",
            "–",
            "–",
            common.fmt_seconds(data["pstq_2bit_s"]),
            common.fmt_seconds(data["pstq_2bit_cpu_s"]),
            "1.00x",
            common.fmt_bytes(data["pstq_2bit_bytes"]),
            "–",
            "rowwise2 100%",
        ]
    )
    table = common.md_table(
        [
            "",
            "plan",
            "plan, CPU s",
            "row errors",
            "allocation",
            "apply / compress",
            "apply, CPU s",
            "vs pstq",
            "bytes",
            "= predicted, <= budget",
            "choice",
        ],
        rows,
        "lrrrrrrrrcl",
    )
    worst_plan = max(data[k]["plan_s"] for k in ("uniform", "usage"))
    worst_apply = max(data[k]["apply_s"] for k in ("uniform", "usage")) / data["pstq_2bit_s"]
    quiet = max(data[k]["plan_cpu_s"] for k in ("uniform", "usage")) / data["threads"]
    verdict = (
        f"Planning {data['rows']:,} x {data['dim']}: {common.fmt_seconds(worst_plan)} "
        f"(target {PLAN_TARGET_S:.0f} s: **{common.pass_fail(worst_plan <= PLAN_TARGET_S)}**); applying: "
        f"{worst_apply:.2f}x post_training_sparse_quantize's time for the same bytes "
        f"(target {APPLY_TARGET_RATIO:.0f}x: **{common.pass_fail(worst_apply <= APPLY_TARGET_RATIO)}**). "
        f"Planning used {common.fmt_seconds(quiet * data['threads'])} of CPU: on a quiet machine with "
        f"{data['threads']} cores it takes between {common.fmt_seconds(quiet)} (all of it split over "
        f"the cores) and {common.fmt_seconds(quiet * data['threads'])} (none of it)."
    )
    return "\n\n".join(
        [
            "## Planning cost",
            f"Command: `{cmd}`",
            f"A {data['rows']:,} x {data['dim']} float32 table, budget "
            f"{common.fmt_bytes(data['budget_bytes'])}.",
            machine + f"\n- torch threads: {data['threads']}",
            table,
            verdict,
            load_note,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="a 100,000-row table (a smoke test)")
    common.add_output_args(p)
    args = p.parse_args(argv)
    common.finish_output_args(args)
    if args.quick:
        args.rows = 100_000
    cmd = common.command_line(SCRIPT, sys.argv[1:] if argv is None else argv)
    load = common.OtherLoad()
    t0 = time.perf_counter()
    data = measure(args)
    md = render(data, cmd, common.machine_markdown(), load.note())
    md += f"\n_Run time: {time.perf_counter() - t0:.0f} s._\n"
    common.write_section(args.out, NAME, md, {"command": cmd, **data})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
