"""Usage-recording overhead: a model's forward with and without ``embpress.record_usage``.

Two workloads, each timed both ways in the same run, alternating (with, without, with, ...)
so that drift of the machine hits both alike; time = median of the timed calls after warm-up:

- the MovieLens-100k DLRM of ``bench/quality_ml100k.py`` (five embedding bags, MLPs and
  pairwise interaction; its weights do not change the cost, so it is not trained here) on a
  training batch (512 ratings) and on the whole test split; needs the data at
  ``../shared/data/ml-100k`` (or ``--data``), otherwise that part says SKIPPED;
- a 1M x 128 float32 ``nn.EmbeddingBag`` (sum) on 4096 bags of 40 Zipf-distributed ids,
  with and without ``per_sample_weights``.

Usage (from the repository root)::

    python bench/usage_overhead.py                 # about half a minute
    python bench/usage_overhead.py --quick --out out/bench-quick
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
import quality_ml100k as ml

NAME = "usage_overhead"
SCRIPT = "bench/usage_overhead.py"
TITLE = "Usage recording overhead"
CALLS_PER_BLOCK = 5


def paired_timing(model: Any, call: Callable[[], Any], rounds: int, min_time: float) -> dict[str, Any]:
    """Median seconds per call without and with recording, and of entering + leaving a block.

    Recording is used as a user would: one ``record_usage`` block around many calls (here
    ``CALLS_PER_BLOCK``), adding to one ``Usage``. Each round times that many plain calls,
    then that many inside one block, each call on its own; entering and leaving the block is
    timed apart (its cost does not grow with the calls).
    """
    import torch

    import embpress

    plain: list[float] = []
    recorded: list[float] = []
    blocks: list[float] = []
    with torch.inference_mode():
        call()
        with embpress.record_usage(model) as usage:
            call()
        lookups = round(sum(float(c.sum()) for c in usage.counts.values()))
        t_start = time.perf_counter()
        while len(plain) < rounds or time.perf_counter() - t_start < min_time:
            for _ in range(CALLS_PER_BLOCK):
                t0 = time.perf_counter()
                call()
                plain.append(time.perf_counter() - t0)
            t_enter = time.perf_counter()
            with embpress.record_usage(model, usage):
                t_in = time.perf_counter()
                for _ in range(CALLS_PER_BLOCK):
                    t0 = time.perf_counter()
                    call()
                    recorded.append(time.perf_counter() - t0)
                t_out = time.perf_counter()
            blocks.append((t_in - t_enter) + (time.perf_counter() - t_out))
            if len(plain) >= 2000:
                break
    return {
        "plain": statistics.median(plain),
        "recorded": statistics.median(recorded),
        "block": statistics.median(blocks),
        "lookups": lookups,
        "calls": len(plain),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    common.quiet_torch_warnings()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    skipped = None
    timing = (args.rounds, args.min_time)

    needed = [args.data / f"ml-100k.{ext}" for ext in ("inter", "user", "item")]
    if all(p.is_file() for p in needed):
        train_set, test_set, sizes = ml.load(args.data, args.subsample, args.seed)
        model = ml.make_model(sizes, 16).eval()
        batch = train_set.take(torch.arange(0, min(512, len(train_set))))
        for what, data in (("DLRM, one training batch", batch), ("DLRM, whole test split", test_set)):

            def forward(d: Any = data) -> Any:
                return model(d)

            rows.append({"workload": what, "examples": len(data), **paired_timing(model, forward, *timing)})
    else:
        skipped = f"{ml.SKIP_MESSAGE} at {args.data}: the DLRM rows are left out."
        print(skipped)

    weight = torch.randn(args.rows, args.dim)
    holder = nn.Module()
    holder.bag = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    count = args.bags * args.pooling
    ids = torch.from_numpy(common.zipf_indices(args.rows, count, seed=args.seed))
    offsets = torch.arange(0, count, args.pooling)
    psw = torch.from_numpy(np.random.default_rng(args.seed).random(count).astype(np.float32))
    label = f"EmbeddingBag {args.rows:,} x {args.dim}, {args.bags} bags x {args.pooling} ids"
    for what, call in (
        (label, lambda: holder.bag(ids, offsets)),
        (label + ", per_sample_weights", lambda: holder.bag(ids, offsets, per_sample_weights=psw)),
    ):
        timed = paired_timing(holder, call, *timing)
        rows.append({"workload": what, "examples": args.bags, **timed, "lookups": count})
    return {"rows": rows, "skipped": skipped, "threads": torch.get_num_threads()}


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    body = [
        [
            r["workload"],
            f"{r['examples']:,}",
            f"{r['lookups']:,}",
            common.fmt_seconds(r["plain"]),
            common.fmt_seconds(r["recorded"]),
            common.fmt_ratio(r["recorded"] / r["plain"]),
            f"{(r['recorded'] - r['plain']) / max(1, r['lookups']) * 1e9:.1f} ns",
            common.fmt_seconds(r["block"]),
        ]
        for r in data["rows"]
    ]
    lines = [
        f"## {TITLE}",
        "",
        f"Command: `{cmd}`",
        "",
        "Forward time of a model without and with `embpress.record_usage`, median of the timed calls. "
        f"Rounds alternate {CALLS_PER_BLOCK} plain calls and {CALLS_PER_BLOCK} calls inside one "
        "`with embpress.record_usage(model, usage):` block (one `Usage` for the whole run, as a user "
        "records many batches); *enter + leave* is the block's own cost, paid once per block. "
        f"{data['threads']} torch thread(s), under `torch.inference_mode()`. The DLRM is the MovieLens-100k "
        "model of `bench/quality_ml100k.py` (untrained weights: they do not change the cost); the bag's ids "
        "are Zipf-distributed (exponent 1.05). *Lookups* = ids looked up per call.",
        "",
    ]
    if data.get("skipped"):
        lines += [f"**{data['skipped']}**", ""]
    lines += [
        common.md_table(
            [
                "workload",
                "examples / bags",
                "lookups",
                "forward",
                "forward + recording",
                "ratio",
                "extra per lookup",
                "enter + leave",
            ],
            body,
            "lrrrrrrr",
        ),
        "",
    ]
    return "\n".join(lines) + "\n"


def no_plot(data: dict[str, Any], path: Path) -> None:
    """This section has no figure."""
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 100k-row bag, 512 bags, few rounds")
    p.add_argument("--data", type=Path, default=ml.DEFAULT_DATA, help="folder with ml-100k.{inter,user,item}")
    p.add_argument("--subsample", type=int, help="MovieLens: use this many ratings")
    p.add_argument("--rows", type=int, help="bag rows (default 1M; quick 100k)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--bags", type=int, help="bags per call (default 4096; quick 512)")
    p.add_argument("--pooling", type=int, default=40)
    p.add_argument("--rounds", type=int, help="timed calls each way (at least)")
    p.add_argument("--min-time", type=float, help="keep timing until this many seconds passed, per workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    common.add_output_args(p)
    args = p.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.bags = args.bags or (512 if args.quick else 4096)
    args.rounds = args.rounds or (5 if args.quick else 30)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 3.0)
    if args.quick:
        args.subsample = args.subsample or 20_000
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line(SCRIPT, argv)
    return common.run_section(NAME, cmd, args, measure, no_plot, render)


if __name__ == "__main__":
    raise SystemExit(main())
