"""Bytes of a compressed table in memory and on disk against sparsity, block shape and bits.

For each block shape and sparsity the DataNormSparsifier mask of a random normal
``rows x dim`` table is computed once and the table is encoded at 8, 4 and 2 bits with
``QuantizedEmbeddingBag.from_float(..., mask=mask, block_width=w)`` (the encode path that
``post_training_sparse_quantize`` takes in sparsify-first order; one configuration is
cross-checked against a real ``post_training_sparse_quantize`` call). The clipping-range
search is off: it changes values, not bytes. In memory = ``module.nbytes``; on disk = the
size of the file ``embpress.save`` writes (safetensors: 8-byte length + JSON header + data).

Baselines: float32 (rows x dim x 4), the reference (torch.ao's quantized EmbeddingBag: a
dense quint8 table with a float scale and zero point per row, whatever the sparsity) and
torch's FBGEMM row-wise prepacked tables (``embedding_bag_{byte,4bit,2bit}_prepack``).

Usage (from the repository root)::

    python bench/size.py                 # 1M x 128 (about 1 minute)
    python bench/size.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import functools
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAME = "size"
SCRIPT = "bench/size.py"
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99)
BITS = (8, 4, 2)
# Targets of the issue, for 1M rows (bytes per row, so that --quick can scale them).
TARGET_ROWS = 1_000_000
TARGET_BLOCK4_8BIT = 40e6 / TARGET_ROWS
TARGET_ROWS_8BIT = 30e6 / TARGET_ROWS
HALF_TOLERANCE = 1.10  # "4-bit about half": at most 10% above half the 8-bit target
HEADER_LIMIT = 64 * 1024  # what counts as a fixed header
_PREPACK = {8: "byte", 4: "4bit", 2: "2bit"}


def _holder(module: Any) -> Any:
    from torch import nn

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = module

    return Holder()


def _file_parts(path: Path) -> tuple[int, int]:
    """(file size, header bytes) of a safetensors file."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size, 8 + n


def _block_label(width: int, dim: int) -> str:
    return f"(1,{width})" + (" whole rows" if width == dim else "")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    import embpress

    common.quiet_torch_warnings()
    rows, dim = args.rows, args.dim
    weight = torch.randn(rows, dim, generator=torch.Generator().manual_seed(0))
    emb = nn.EmbeddingBag.from_pretrained(weight, mode="sum")
    float_bytes = rows * dim * 4
    base: dict[str, Any] = {"float32": float_bytes}
    ref = _reference(emb)
    base["reference"] = ref
    base["fbgemm"] = {
        8: int(torch.ops.quantized.embedding_bag_byte_prepack(weight).numel()),
        4: int(torch.ops.quantized.embedding_bag_4bit_prepack(weight).numel()),
        2: int(torch.ops.quantized.embedding_bag_2bit_prepack(weight).numel()),
    }
    results = []
    widths = [1, 4, dim]
    with tempfile.TemporaryDirectory(prefix="embpress-size-") as tmp:
        path = Path(tmp) / "table.safetensors"
        for width in widths:
            for sparsity in args.sparsities:
                sp = embpress.DataNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, width))
                sp.add_data("t", weight)
                sp.step()
                mask = sp.get_mask("t")
                for bits in BITS:
                    config = embpress.QuantConfig(bits=bits, range_search=False)
                    module = embpress.QuantizedEmbeddingBag.from_float(
                        emb, config, mask=mask, block_width=width
                    )
                    embpress.save(_holder(module), path)
                    disk, header = _file_parts(path)
                    results.append(
                        {
                            "width": width,
                            "sparsity": sparsity,
                            "bits": bits,
                            "layout": module.layout,
                            "exact_sparsity": module.sparsity,
                            "memory": int(module.nbytes),
                            "disk": disk,
                            "header": header,
                        }
                    )
                    print(
                        f"(1,{width}) s={sparsity} {bits}b {module.layout}: {common.fmt_bytes(module.nbytes)}"
                        f" / file {common.fmt_bytes(disk)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    del module
                del sp, mask
    check = _cross_check(weight, results)
    return {"rows": rows, "dim": dim, "baselines": base, "results": results, "cross_check": check}


def _reference(emb: Any) -> dict[str, Any]:
    """Bytes of the module the reference's quantization step (prepare/convert) makes."""
    import copy

    import torch
    from torch import nn

    holder = nn.Module()
    holder.emb = copy.deepcopy(emb)
    holder.emb.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    torch.ao.quantization.prepare(holder, inplace=True)
    torch.ao.quantization.convert(holder, inplace=True)
    out = common.reference_table_bytes(holder.emb)
    out["type"] = type(holder.emb).__module__ + "." + type(holder.emb).__name__
    return out


def _cross_check(weight: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """nbytes of a real post_training_sparse_quantize call = the measured 0.8 (1,4) 8-bit entry."""
    from torch import nn

    import embpress

    hit = next((r for r in results if r["width"] == 4 and r["sparsity"] == 0.8 and r["bits"] == 8), None)
    if hit is None:
        return {}
    holder = _holder(nn.EmbeddingBag.from_pretrained(weight, mode="sum"))
    embpress.post_training_sparse_quantize(
        holder,
        embpress.DataNormSparsifier,
        True,
        quant=embpress.QuantConfig(bits=8),
        sparsity_level=0.8,
        sparse_block_shape=(1, 4),
    )
    return {
        "ptsq_nbytes": int(holder.emb.nbytes),
        "measured": hit["memory"],
        "equal": holder.emb.nbytes == hit["memory"],
    }


def targets(data: dict[str, Any]) -> list[tuple[str, bool]]:
    rows = data["rows"]
    dim = data["dim"]
    res = {(r["width"], r["sparsity"], r["bits"]): r for r in data["results"]}
    out: list[tuple[str, bool]] = []
    scale = "" if rows == TARGET_ROWS else f" (target scaled to {rows:,} rows)"
    for width, per_row, label in (
        (4, TARGET_BLOCK4_8BIT, "(1,4)"),
        (dim, TARGET_ROWS_8BIT, "whole rows"),
    ):
        limit = per_row * rows
        r8, r4 = res.get((width, 0.8, 8)), res.get((width, 0.8, 4))
        if r8:
            out.append(
                (
                    f"0.8 {label} 8-bit in memory {common.fmt_bytes(r8['memory'])} <= "
                    f"{common.fmt_bytes(limit)}{scale}",
                    r8["memory"] <= limit,
                )
            )
        if r4:
            half = limit / 2 * HALF_TOLERANCE
            ratio = r4["memory"] / r8["memory"] if r8 else float("nan")
            out.append(
                (
                    f"0.8 {label} 4-bit {common.fmt_bytes(r4['memory'])} about half of the 8-bit target "
                    f"(<= {common.fmt_bytes(half)} = half + 10%; 4-bit/8-bit measured = {ratio:.2f})",
                    r4["memory"] <= half,
                )
            )
    worst = max(
        data["results"],
        key=lambda r: (r["disk"] - r["header"] - r["memory"]) / max(1, r["memory"]),
    )
    max_header = max(r["header"] for r in data["results"])
    ok = all(
        r["disk"] <= r["memory"] * 1.01 + r["header"] and r["header"] <= HEADER_LIMIT for r in data["results"]
    )
    out.append(
        (
            f"every file <= 1.01 x in-memory bytes + its header (headers <= {max_header} B, limit "
            f"{HEADER_LIMIT} B; worst data overhead "
            f"{(worst['disk'] - worst['header'] - worst['memory']) / max(1, worst['memory']) * 100:.3f}%)",
            ok,
        )
    )
    return out


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    rows, dim = data["rows"], data["dim"]
    base = data["baselines"]
    ref = base["reference"]
    fb = base["fbgemm"]
    f32 = base["float32"]
    lines = [
        "## Size in memory and on disk",
        "",
        f"Command: `{cmd}`",
        "",
        f"A random normal {rows:,} x {dim} float32 table. For each block shape and sparsity the "
        "DataNormSparsifier mask is computed once and the table encoded at 8, 4 and 2 bits in the layout "
        "`QuantConfig(layout='auto')` picks (the smallest); clipping-range search off (it changes values, "
        "not bytes). *Memory* = `module.nbytes` (every buffer: codes, scales, bitmaps, index maps); "
        "*disk* = size of the `embpress.save` file. Baselines measured in the same run: ",
        "",
        common.md_table(
            ["table", "in memory", "on disk", "×float32"],
            [
                ["float32 (rows × dim × 4)", common.fmt_bytes(f32), "–", "1.000"],
                [
                    "reference: torch.ao quantized EmbeddingBag (dense quint8, any sparsity)",
                    common.fmt_bytes(ref["memory"]),
                    common.fmt_bytes(ref["disk"]),
                    f"{ref['memory'] / f32:.3f}",
                ],
                *[
                    [
                        f"FBGEMM {b}-bit row-wise prepacked (`embedding_bag_{_PREPACK[b]}_prepack`)",
                        common.fmt_bytes(fb[b]),
                        "–",
                        f"{fb[b] / f32:.3f}",
                    ]
                    for b in BITS
                ],
            ],
            "lrrr",
        ),
        "",
        "The reference's bytes are counted from `module.weight()`: rows × dim one-byte codes plus a "
        "float32 scale and zero point per row (= the rows × (dim + 8) packed buffer its lookup reads); "
        "its disk size is `torch.save(state_dict)`. It stores every entry whatever the sparsity "
        "(pruned entries become quantized zeros), so one figure serves every row below.",
        "",
        "In memory, by block shape, sparsity and bits (layout in brackets: D dense, R pruned rows, "
        "B block-sparse); *vs ref* = ours / reference, *vs FBGEMM* = ours / FBGEMM prepacked table of "
        "the same bits:",
        "",
    ]
    abbrev = {"dense": "D", "pruned_rows": "R", "block_sparse": "B"}
    res = {(r["width"], r["sparsity"], r["bits"]): r for r in data["results"]}
    table_rows = []
    for width in sorted({r["width"] for r in data["results"]}):
        for s in args.sparsities:
            cells: list[Any] = [_block_label(width, dim), f"{s:g}"]
            for b in BITS:
                r = res[(width, s, b)]
                cells.append(f"{common.fmt_bytes(r['memory'])} [{abbrev.get(r['layout'], r['layout'])}]")
            r8, r4 = res[(width, s, 8)], res[(width, s, 4)]
            cells += [
                f"{r8['memory'] / f32:.3f}",
                f"{r8['memory'] / ref['memory']:.3f}",
                f"{r8['memory'] / fb[8]:.3f}",
                f"{r4['memory'] / fb[4]:.3f}",
            ]
            table_rows.append(cells)
    lines += [
        common.md_table(
            [
                "block",
                "sparsity",
                "8-bit",
                "4-bit",
                "2-bit",
                "8-bit ×float32",
                "8-bit vs ref",
                "8-bit vs FBGEMM",
                "4-bit vs FBGEMM",
            ],
            table_rows,
            "llrrrrrrr",
        ),
        "",
    ]
    if plot is not None:
        lines += [f"![bytes against sparsity]({common.relpath(plot, args.md_root)})", ""]
    disk_rows = [
        [
            _block_label(r["width"], dim),
            f"{r['sparsity']:g}",
            r["bits"],
            r["layout"],
            f"{r['exact_sparsity']:.4f}",
            f"{r['memory']:,}",
            f"{r['disk']:,}",
            f"{r['header']:,}",
            f"{(r['disk'] - r['header'] - r['memory']) / max(1, r['memory']) * 100:.3f}%",
        ]
        for r in data["results"]
    ]
    lines += [
        "<details><summary>Every configuration: bytes in memory and on disk</summary>",
        "",
        common.md_table(
            [
                "block",
                "sparsity",
                "bits",
                "layout",
                "exact sparsity",
                "memory (B)",
                "disk (B)",
                "header (B)",
                "data − memory",
            ],
            disk_rows,
            "llrlrrrrr",
        ),
        "",
        "</details>",
        "",
    ]
    cc = data.get("cross_check") or {}
    if cc:
        lines += [
            f"Cross-check: `post_training_sparse_quantize` (0.8, (1,4), 8 bits) gives nbytes "
            f"{cc['ptsq_nbytes']:,}, the table above {cc['measured']:,}: "
            f"**{'equal' if cc['equal'] else 'DIFFERENT'}**.",
            "",
        ]
    lines += ["**Targets:**", ""]
    lines += [f"- {text}: **{common.pass_fail(ok)}**" for text, ok in targets(data)]
    return "\n".join(lines) + "\n"


def plot_sizes(data: dict[str, Any], path: Path, sparsities: list[float]) -> Path:
    plt = common.setup_matplotlib()
    widths = sorted({r["width"] for r in data["results"]})
    dim = data["dim"]
    base = data["baselines"]
    fig, axes = plt.subplots(1, len(widths), figsize=(4.0 * len(widths), 3.8), dpi=90, sharey=True)
    res = {(r["width"], r["sparsity"], r["bits"]): r for r in data["results"]}
    colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:green"}
    for ax, width in zip(axes, widths, strict=True):
        for b in BITS:
            ys = [res[(width, s, b)]["memory"] / 1e6 for s in sparsities]
            ax.plot(sparsities, ys, marker="o", color=colors[b], label=f"embpress {b}-bit")
            ax.axhline(base["fbgemm"][b] / 1e6, color=colors[b], linestyle=":", linewidth=1)
        ax.axhline(base["float32"] / 1e6, color="black", linestyle="-", linewidth=1, label="float32")
        ax.axhline(base["reference"]["memory"] / 1e6, color="tab:red", linestyle="--", label="reference int8")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"block {_block_label(width, dim)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MB in memory")
    axes[0].plot([], [], color="gray", linestyle=":", label="FBGEMM prepacked (same color = bits)")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{data['rows']:,} x {dim} table", fontsize=10)
    return common.save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="an 8k-row table")
    p.add_argument("--rows", type=int, help="rows (default 1,000,000; quick 8,000)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    common.add_output_args(p)
    args = p.parse_args(argv)
    args.rows = args.rows or (8_000 if args.quick else 1_000_000)
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line(SCRIPT, argv)
    plot = functools.partial(plot_sizes, sparsities=args.sparsities)
    return common.run_section(NAME, cmd, args, measure, plot, render)


if __name__ == "__main__":
    raise SystemExit(main())
