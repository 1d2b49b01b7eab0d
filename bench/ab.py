"""Interleaved A/B timing of two revisions: is a change slower, beyond the machine's noise?

Two long-lived worker processes, one per source tree (``PYTHONPATH=<tree>/src``), take
turns cell by cell and round after round, the order flipped every round, so a slow phase
of a shared machine hits both alike. Each cell's figure is the median over rounds of
after/before (per-round medians of the timed steps), with its quartiles; an A/A run (the
same revision twice) shows the noise floor of that machine.

Cells: lookups (1M x 128, 4096 bags of 40 ids, Zipf and uniform, 1 and all threads;
float32, FBGEMM 8-bit and each embpress layout at 8 and 4 bits, block-sparse and pruned
rows at sparsity 0.8, and the planner's mixed table at 1/8 of float32's bytes, as in
``lookup.py``) and compression (``post_training_sparse_quantize`` of 1M x 128 at
sparsity 0.8, blocks (1,4) and (1,128), 8 and 4 bits, both orders). Workers use only the
public API, so any two revisions compare.

Usage (from the repository root)::

    python bench/ab.py 0808ff2                      # that revision vs the working tree
    python bench/ab.py HEAD~3 HEAD --what compress --rounds 7
    python bench/ab.py HEAD HEAD                    # A/A: the noise floor
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import lookup

ROWS, DIM, BAGS, POOLING, SPARSITY = 1_000_000, 128, 4096, 40, 0.8


# ------------------------------------------------------------------------------ worker
def _contenders(weight: Any) -> dict[str, Any]:
    import torch
    from torch import nn

    import embpress

    emb = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    w8 = torch.ops.quantized.embedding_bag_byte_prepack(weight)
    out: dict[str, Any] = {
        "float32": emb,
        "FBGEMM 8-bit": lambda i, o: torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            w8, i, o, False, 0, False, None, None, False
        ),
    }
    for label, width, layout in (
        ("dense", None, "dense"),
        ("block-sparse", 4, "block_sparse"),
        ("pruned-rows", DIM, "pruned_rows"),
    ):
        mask = None
        if width is not None:
            sp = embpress.DataNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, width))
            sp.add_data("t", weight)
            sp.step()
            mask = sp.get_mask("t")
        for bits in (8, 4):
            config = embpress.QuantConfig(bits=bits, range_search=False, layout=layout)
            out[f"embpress {label} {bits}-bit"] = embpress.QuantizedEmbeddingBag.from_float(
                emb, config, mask=mask, block_width=width or 1
            )
    out[lookup.PLANNED] = lookup.build_planned(weight, BAGS * POOLING)
    return out


def worker() -> None:
    """Answer timing requests (one JSON line in, a JSON list of seconds out)."""
    import torch
    from torch import nn

    import embpress

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(ROWS, DIM, generator=gen)
    fns = _contenders(weight)
    count = BAGS * POOLING
    offsets = torch.arange(0, count, POOLING, dtype=torch.int64)
    ids = {
        "zipf": torch.from_numpy(common.zipf_indices(ROWS, count, seed=1)),
        "uniform": torch.from_numpy(common.uniform_indices(ROWS, count, seed=1)),
    }
    all_threads = torch.get_num_threads()
    print(json.dumps({"ready": embpress.__file__}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        times = []
        if cmd["op"] == "lookup":
            torch.set_num_threads(cmd["threads"] or all_threads)
            fn, batch = fns[cmd["name"]], ids[cmd["dist"]]
            with torch.inference_mode():
                fn(batch, offsets)  # warm
                for _ in range(cmd["steps"]):
                    start = time.perf_counter()
                    fn(batch, offsets)
                    times.append(time.perf_counter() - start)
            torch.set_num_threads(all_threads)
        else:
            model = nn.Module()
            model.emb = nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum")
            start = time.perf_counter()
            embpress.post_training_sparse_quantize(
                model,
                embpress.DataNormSparsifier,
                cmd["sparsify_first"],
                quant=embpress.QuantConfig(bits=cmd["bits"]),
                sparsity_level=SPARSITY,
                sparse_block_shape=(1, cmd["width"]),
            )
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


# ------------------------------------------------------------------------------ driver
@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """The repository root for "." (the working tree), else a temporary worktree of ``rev``."""
    if rev == ".":
        yield common.REPO
        return
    with tempfile.TemporaryDirectory(prefix="embpress-ab-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(common.REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(path)], check=False
            )


def _cells(what: str, only: str | None = None) -> list[dict[str, Any]]:
    if what == "lookup":
        names = ["float32", "FBGEMM 8-bit"] + [
            f"embpress {k} {b}-bit" for k in ("dense", "block-sparse", "pruned-rows") for b in (8, 4)
        ]
        names = [n for n in [*names, lookup.PLANNED] if only is None or only in n]
        return [
            {"op": "lookup", "name": n, "threads": t, "dist": d, "steps": 9}
            for t in (1, 0)
            for d in ("zipf", "uniform")
            for n in names
        ]
    return [
        {"op": "compress", "width": w, "bits": b, "sparsify_first": sf}
        for w in (4, DIM)
        for b in (8, 4)
        for sf in (True, False)
    ]


def _label(cell: dict[str, Any]) -> str:
    if cell["op"] == "lookup":
        return f"{cell['name']}, {cell['threads'] or 'all'} thread(s), {cell['dist']}"
    order = "sparsify-first" if cell["sparsify_first"] else "quantize-first"
    return f"compress (1,{cell['width']}) {cell['bits']}-bit {order}"


def compare(
    before: Path, after: Path, what: str, rounds: int, only: str | None = None
) -> list[dict[str, Any]]:
    """Per cell: median before/after seconds and the median after/before ratio with quartiles."""
    procs = {}
    for tag, tree in (("before", before), ("after", after)):
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        procs[tag] = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        print(tag, json.loads(procs[tag].stdout.readline())["ready"], file=sys.stderr, flush=True)

    def ask(tag: str, cmd: dict[str, Any]) -> float:
        proc = procs[tag]
        proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        return statistics.median(json.loads(proc.stdout.readline()))  # type: ignore[union-attr]

    cells = _cells(what, only)
    seen: dict[str, dict[str, list[float]]] = {}
    for rnd in range(rounds):
        for i, cell in enumerate(cells):
            order = ("before", "after") if (rnd + i) % 2 == 0 else ("after", "before")
            got = {tag: ask(tag, cell) for tag in order}
            row = seen.setdefault(_label(cell), {"before": [], "after": [], "ratio": []})
            row["before"].append(got["before"])
            row["after"].append(got["after"])
            row["ratio"].append(got["after"] / got["before"])
        print(f"round {rnd + 1}/{rounds}", file=sys.stderr, flush=True)
    for proc in procs.values():
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
    out = []
    for label, row in seen.items():
        q = statistics.quantiles(row["ratio"], n=4) if rounds > 1 else [row["ratio"][0]] * 3
        out.append(
            {
                "cell": label,
                "before_s": statistics.median(row["before"]),
                "after_s": statistics.median(row["after"]),
                "ratio": statistics.median(row["ratio"]),
                "q1": q[0],
                "q3": q[2],
            }
        )
    return out


def render(results: list[dict[str, Any]], command: str, before: str, after: str) -> str:
    rows = [
        [
            r["cell"],
            common.fmt_seconds(r["before_s"]),
            common.fmt_seconds(r["after_s"]),
            f"{r['ratio']:.3f}",
            f"{r['q1']:.3f}-{r['q3']:.3f}",
        ]
        for r in results
    ]
    table = common.md_table(
        ["cell", f"before ({before})", f"after ({after})", "after/before", "quartiles"], rows
    )
    return f"Command: `{command}`\n\n{common.machine_markdown()}\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("before", help="git revision timed as 'before'")
    p.add_argument(
        "after", nargs="?", default=".", help="git revision timed as 'after' (default: the working tree)"
    )
    p.add_argument("--what", choices=("lookup", "compress", "both"), default="both")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--out", type=Path, default=None, help="write ab.md and ab.json there")
    p.add_argument("--only", default=None, help="lookups: time only the contenders whose name contains this")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    command = common.command_line("bench/ab.py", argv if argv is not None else sys.argv[1:])
    results = []
    with source_tree(args.before) as before, source_tree(args.after) as after:
        for what in ("lookup", "compress") if args.what == "both" else (args.what,):
            results += compare(before, after, what, args.rounds, args.only)
    text = render(results, command, args.before, args.after)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.md").write_text(text)
        (args.out / "ab.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        sys.exit(main())
