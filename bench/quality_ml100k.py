"""Model quality after compression: a small DLRM on MovieLens-100k, before and after.

Data: MovieLens-100k in RecBole's atomic-file layout, read from ``../shared/data/ml-100k``
relative to the repository root (or ``--data``); never copied into the repository. If it
is absent the script says so and exits 0.

Task: predict ``rating >= 4`` from user, item, occupation, zip code and genres (sparse, one
``nn.EmbeddingBag`` each; genres as a multi-hot sum bag) plus age, gender and release
year (dense). Split by time: the latest 20% of ratings are the test set. The model is a
DLRM (bottom MLP for the dense features, pairwise dot products of all feature vectors,
top MLP), trained with a fixed seed for a few epochs (well under a minute on 2 cores).

Then every table of the trained model is compressed with ``post_training_sparse_quantize``
at each sparsity x block shape x bits x order (embpress) and at 8 bits in both orders
(the reference, torch.ao), and test AUC (rank-based, ties averaged) and log loss are
measured, with the total bytes of the tables.

Usage (from the repository root)::

    python bench/quality_ml100k.py                 # full sweep (about 15 s)
    python bench/quality_ml100k.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

NAME = "quality_ml100k"
SCRIPT = "bench/quality_ml100k.py"
DEFAULT_DATA = common.REPO.parent / "shared" / "data" / "ml-100k"
SKIP_MESSAGE = "SKIPPED: MovieLens-100k not found"
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
BLOCKS = ("1x1", "1x4", "rows")
BITS = (8, 4, 2)


# ------------------------------------------------------------------------------ data
@dataclass
class Data:
    """Tensors of one split; ``genres`` is ``[n, max genres]`` padded with -1."""

    user: Any
    item: Any
    occupation: Any
    zip: Any
    genres: Any
    dense: Any
    label: Any

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, sel: Any) -> Data:
        """The examples at ``sel`` (a LongTensor of positions)."""
        return Data(
            self.user[sel],
            self.item[sel],
            self.occupation[sel],
            self.zip[sel],
            self.genres[sel],
            self.dense[sel],
            self.label[sel],
        )

    def genre_bags(self) -> tuple[Any, Any]:
        """(flat genre ids, offsets) of one bag per example."""
        import torch

        kept = self.genres >= 0
        lengths = kept.sum(1)
        return self.genres[kept], torch.cumsum(lengths, 0) - lengths


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":", 1)[0] for h in next(reader)]
        return [dict(zip(header, row, strict=False)) for row in reader]


def load(data_dir: Path, subsample: int | None, seed: int) -> tuple[Data, Data, dict[str, int]]:
    """(train, test, vocabulary sizes) from the three atomic files."""
    import numpy as np
    import torch

    users = _read(data_dir / "ml-100k.user")
    items = _read(data_dir / "ml-100k.item")
    inter = _read(data_dir / "ml-100k.inter")

    def vocab(values: list[str]) -> dict[str, int]:
        return {v: i for i, v in enumerate(sorted(set(values)))}

    user_ix = vocab([u["user_id"] for u in users])
    item_ix = vocab([i["item_id"] for i in items])
    occ_ix = vocab([u["occupation"] for u in users])
    zip_ix = vocab([u["zip_code"] for u in users])
    genre_ix = vocab([g for i in items for g in i.get("class", "").split()] or ["unknown"])
    ages = np.array([float(u["age"]) for u in users])
    age_mean, age_std = ages.mean(), ages.std() or 1.0
    years = [float(i["release_year"]) for i in items if i.get("release_year", "").strip().isdigit()]
    year_mean, year_std = float(np.mean(years)), float(np.std(years)) or 1.0
    user_feat = {
        u["user_id"]: (
            occ_ix[u["occupation"]],
            zip_ix[u["zip_code"]],
            (float(u["age"]) - age_mean) / age_std,
            1.0 if u["gender"] == "M" else 0.0,
        )
        for u in users
    }
    item_feat = {}
    for i in items:
        y = i.get("release_year", "").strip()
        year = (float(y) - year_mean) / year_std if y.isdigit() else 0.0
        genres = [genre_ix[g] for g in i.get("class", "").split()] or [genre_ix.get("unknown", 0)]
        item_feat[i["item_id"]] = (year, genres)

    inter = [r for r in inter if r["user_id"] in user_feat and r["item_id"] in item_feat]
    inter.sort(key=lambda r: (float(r["timestamp"]), r["user_id"], r["item_id"]))
    if subsample is not None and subsample < len(inter):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(inter), size=subsample, replace=False))
        inter = [inter[k] for k in keep]

    n = len(inter)
    user = torch.tensor([user_ix[r["user_id"]] for r in inter])
    item = torch.tensor([item_ix[r["item_id"]] for r in inter])
    occ = torch.tensor([user_feat[r["user_id"]][0] for r in inter])
    zips = torch.tensor([user_feat[r["user_id"]][1] for r in inter])
    dense = torch.tensor(
        [[user_feat[r["user_id"]][2], user_feat[r["user_id"]][3], item_feat[r["item_id"]][0]] for r in inter],
        dtype=torch.float32,
    )
    genre_lists = [item_feat[r["item_id"]][1] for r in inter]
    width = max(len(g) for g in genre_lists)
    genres = torch.tensor([g + [-1] * (width - len(g)) for g in genre_lists])
    label = torch.tensor([1.0 if float(r["rating"]) >= 4 else 0.0 for r in inter])
    full = Data(user, item, occ, zips, genres, dense, label)
    cut = round(n * 0.8)
    train = full.take(torch.arange(0, cut))
    test = full.take(torch.arange(cut, n))
    sizes = {
        "user": len(user_ix),
        "item": len(item_ix),
        "occupation": len(occ_ix),
        "zip": len(zip_ix),
        "genre": len(genre_ix),
    }
    return train, test, sizes


# ------------------------------------------------------------------------------ model
def make_model(sizes: dict[str, int], dim: int) -> Any:
    import torch
    from torch import nn

    class DLRM(nn.Module):
        """Embedding bags + bottom MLP, pairwise dot-product interaction, top MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.user = nn.EmbeddingBag(sizes["user"], dim, mode="sum")
            self.item = nn.EmbeddingBag(sizes["item"], dim, mode="sum")
            self.occupation = nn.EmbeddingBag(sizes["occupation"], dim, mode="sum")
            self.zip = nn.EmbeddingBag(sizes["zip"], dim, mode="sum")
            self.genre = nn.EmbeddingBag(sizes["genre"], dim, mode="sum")
            for emb in (self.user, self.item, self.occupation, self.zip, self.genre):
                nn.init.normal_(emb.weight, std=0.1)
            self.bottom = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, dim), nn.ReLU())
            n = 6
            self.pairs = torch.triu_indices(n, n, offset=1)
            self.top = nn.Sequential(
                nn.Linear(dim + n * (n - 1) // 2, 64),
                nn.ReLU(),
                nn.Linear(64, 32),
                nn.ReLU(),
                nn.Linear(32, 1),
            )

        def forward(self, d: Data) -> Any:
            single = torch.arange(len(d))
            genre_ids, genre_offsets = d.genre_bags()
            feats = [
                self.bottom(d.dense),
                self.user(d.user, single),
                self.item(d.item, single),
                self.occupation(d.occupation, single),
                self.zip(d.zip, single),
                self.genre(genre_ids, genre_offsets),
            ]
            z = torch.stack(feats, dim=1)  # [B, 6, dim]
            inter = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
            return self.top(torch.cat([feats[0], inter], dim=1)).squeeze(1)

    return DLRM()


def train(model: Any, data: Data, epochs: int, batch: int, seed: int) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        total = 0.0
        for s in range(0, len(data), batch):
            part = data.take(perm[s : s + batch])
            opt.zero_grad()
            loss = loss_fn(model(part), part.label)
            loss.backward()
            opt.step()
            total += loss.item() * len(part)
        losses.append(total / len(data))
    model.eval()
    return losses


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties given their average rank."""
    import torch

    scores = scores.double()
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = avg_rank[inverse]
    pos = labels.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: Any, data: Data) -> dict[str, float]:
    import torch

    with torch.inference_mode():
        logits = model(data)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.label)
    return {"auc": auc(logits, data.label), "logloss": float(loss)}


def table_bytes(model: Any) -> int:
    """Bytes of the five tables as the model holds them (float32, embpress or reference)."""
    import torch

    total = 0
    for name in ("user", "item", "occupation", "zip", "genre"):
        m = getattr(model, name)
        if hasattr(m, "nbytes"):
            total += int(m.nbytes)
        elif isinstance(m, torch.nn.EmbeddingBag):
            total += m.weight.numel() * 4
        else:
            total += common.reference_table_bytes(m)["memory"]
    return total


def block_shape(block: str, dim: int) -> tuple[int, int]:
    return {"1x1": (1, 1), "1x4": (1, 4), "rows": (1, dim)}[block]


def compress(model: Any, impl: str, sparsity: float, block: str, bits: int, sf: bool, dim: int) -> Any:
    import embpress

    m = copy.deepcopy(model)
    if impl == "ours":
        embpress.post_training_sparse_quantize(
            m,
            embpress.DataNormSparsifier,
            sf,
            quant=embpress.QuantConfig(bits=bits),
            sparsity_level=sparsity,
            sparse_block_shape=block_shape(block, dim),
        )
    else:
        from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as RefSparsifier
        from torch.ao.pruning._experimental.data_sparsifier.quantization_utils import (
            post_training_sparse_quantize as ref_ptsq,
        )

        ref_ptsq(
            m,
            RefSparsifier,
            sparsify_first=sf,
            sparsity_level=sparsity,
            sparse_block_shape=block_shape(block, dim),
        )
    m.eval()
    return m


# ------------------------------------------------------------------------------ run
def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    common.quiet_torch_warnings()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_set, test_set, sizes = load(args.data, args.subsample, args.seed)
    model = make_model(sizes, args.dim)
    losses = train(model, train_set, args.epochs, args.batch, args.seed)
    train_s = time.perf_counter() - t0
    base = evaluate(model, test_set)
    base_bytes = table_bytes(model)
    print(f"float32: AUC {base['auc']:.4f} logloss {base['logloss']:.4f} ({train_s:.1f} s)", file=sys.stderr)
    runs = []
    grid = list(itertools.product(("ours",), args.sparsities, args.blocks, args.bits, (True, False)))
    grid += list(itertools.product(("ref",), args.sparsities, args.blocks, (8,), (True, False)))
    for impl, sparsity, block, bits, sf in grid:
        try:
            m = compress(model, impl, sparsity, block, bits, sf, args.dim)
            ev = evaluate(m, test_set)
            nbytes = table_bytes(m)
            err = None
        except Exception as exc:  # a failure is a result too
            ev, nbytes, err = (
                {"auc": float("nan"), "logloss": float("nan")},
                0,
                f"{type(exc).__name__}: {exc}",
            )
        runs.append(
            {
                "impl": impl,
                "sparsity": sparsity,
                "block": block,
                "bits": bits,
                "sparsify_first": sf,
                **ev,
                "bytes": nbytes,
                "error": err,
            }
        )
    return {
        "sizes": sizes,
        "train_examples": len(train_set),
        "test_examples": len(test_set),
        "positive_rate_test": float(test_set.label.mean()),
        "epoch_losses": losses,
        "train_seconds": train_s,
        "float": {**base, "bytes": base_bytes},
        "runs": runs,
    }


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    base = data["float"]
    sizes = data["sizes"]
    lines = [
        "## Model quality: DLRM on MovieLens-100k",
        "",
        f"Command: `{cmd}`",
        "",
        f"Predict rating >= 4 ({data['positive_rate_test'] * 100:.0f}% of test ratings) from user "
        f"({sizes['user']} rows), item ({sizes['item']}), occupation ({sizes['occupation']}), zip code "
        f"({sizes['zip']}) and genres ({sizes['genre']}, multi-hot sum bag) embedding bags of dimension "
        f"{args.dim}, plus age, gender and release year (bottom MLP); pairwise dot-product interaction, "
        f"top MLP, {args.threads} torch thread(s). Temporal split: {data['train_examples']:,} oldest "
        f"ratings train, the latest "
        f"{data['test_examples']:,} test. Adam (lr 2e-3, weight decay 1e-4), {args.epochs} epochs, "
        f"batch {args.batch}, seed {args.seed} "
        f"(training {data['train_seconds']:.0f} s; train loss per epoch "
        f"{', '.join(f'{x:.3f}' for x in data['epoch_losses'])}). Every table compressed with "
        "`post_training_sparse_quantize` (DataNormSparsifier, L1); *bytes* = all five tables. "
        "The reference (torch.ao) has 8 bits only. Every bag sums: torch.ao's quantized EmbeddingBag "
        "ignores `mode` and always sums (its forward passes mode 0), so a mean bag would not compare.",
        "",
        f"**float32 model: test AUC {base['auc']:.4f}, log loss {base['logloss']:.4f}, "
        f"tables {common.fmt_bytes(base['bytes'])}.**",
        "",
    ]
    runs = data["runs"]
    failures = [r for r in runs if r["error"]]
    idx = {(r["impl"], r["sparsity"], r["block"], r["bits"], r["sparsify_first"]): r for r in runs}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        if r["error"]:
            return "error"
        return f"{r['auc']:.4f}"

    for sf in (True, False):
        rows_out = []
        for block in args.blocks:
            for s in args.sparsities:
                cells: list[Any] = [block, f"{s:g}"]
                for bits in args.bits:
                    cells.append(cell(idx.get(("ours", s, block, bits, sf))))
                ref = idx.get(("ref", s, block, 8, sf))
                ours8 = idx.get(("ours", s, block, 8, sf))
                cells.append(cell(ref))
                if ours8 and ref and not ours8["error"] and not ref["error"]:
                    cells.append(f"{ours8['auc'] - ref['auc']:+.4f}")
                    cells.append(f"{ours8['bytes'] / ref['bytes']:.3f}")
                else:
                    cells += ["–", "–"]
                b8 = ours8["bytes"] if ours8 else None
                cells.append(common.fmt_bytes(b8))
                rows_out.append(cells)
        lines += [
            f"### Test AUC, {'sparsify-first' if sf else 'quantize-first'}",
            "",
            common.md_table(
                [
                    "block",
                    "sparsity",
                    *[f"embpress {b}-bit" for b in args.bits],
                    "reference 8-bit",
                    "AUC ours−ref (8-bit)",
                    "bytes ours/ref (8-bit)",
                    "embpress 8-bit bytes",
                ],
                rows_out,
                "ll" + "r" * (len(args.bits) + 4),
            ),
            "",
        ]
    detail = [
        [
            "embpress" if r["impl"] == "ours" else "reference",
            "sf" if r["sparsify_first"] else "qf",
            r["block"],
            f"{r['sparsity']:g}",
            r["bits"],
            "error" if r["error"] else f"{r['auc']:.4f}",
            "error" if r["error"] else f"{r['logloss']:.4f}",
            common.fmt_bytes(r["bytes"]) if r["bytes"] else "–",
            f"{r['bytes'] / base['bytes']:.3f}" if r["bytes"] else "–",
        ]
        for r in runs
    ]
    lines += [
        "<details><summary>Every configuration: AUC, log loss, bytes</summary>",
        "",
        common.md_table(
            ["impl", "order", "block", "sparsity", "bits", "AUC", "log loss", "bytes", "×float32"],
            detail,
            "lllrrrrrr",
        ),
        "",
        "</details>",
        "",
    ]
    if failures:
        lines += ["Failures:", ""]
        lines += [
            f"- {r['impl']} {r['block']} s={r['sparsity']} {r['bits']}-bit "
            f"{'sf' if r['sparsify_first'] else 'qf'}: `{r['error']}`"
            for r in failures
        ]
        lines.append("")
    if plot is not None:
        lines += [f"![test AUC against table bytes]({common.relpath(plot, args.md_root)})", ""]
    return "\n".join(lines) + "\n"


def plot_quality(data: dict[str, Any], path: Path) -> Path:
    plt = common.setup_matplotlib()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=90)
    markers = {"1x1": "o", "1x4": "s", "rows": "^"}
    colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:green"}
    seen = set()
    for r in data["runs"]:
        if r["error"] or not r["sparsify_first"]:
            continue
        impl = r["impl"]
        label = f"{'embpress' if impl == 'ours' else 'reference'} {r['bits']}-bit {r['block']}"
        ax.scatter(
            r["bytes"] / 1e3,
            r["auc"],
            marker=markers[r["block"]],
            facecolors=colors[r["bits"]] if impl == "ours" else "none",
            edgecolors="tab:red" if impl == "ref" else colors[r["bits"]],
            s=28,
            label=None if label in seen else label,
        )
        seen.add(label)
    ax.axhline(data["float"]["auc"], color="black", linestyle="--", linewidth=1, label="float32 model")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.set_xlabel("kB of embedding tables")
    ax.set_ylabel("test AUC")
    ax.set_title("MovieLens-100k DLRM, sparsify-first")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return common.save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20k ratings, 2 epochs, a smaller sweep")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with ml-100k.{inter,user,item}")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny)")
    p.add_argument("--subsample", type=int, help="use this many ratings (chosen at random, time order kept)")
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--blocks", nargs="+", choices=BLOCKS)
    p.add_argument("--bits", type=int, nargs="+", choices=BITS)
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.subsample = args.subsample or 20_000
        args.epochs = args.epochs or 2
        args.sparsities = args.sparsities or [0.0, 0.8, 0.95]
        args.blocks = args.blocks or ["1x4", "rows"]
        args.bits = args.bits or [8, 4]
    args.epochs = args.epochs or 3
    args.sparsities = args.sparsities or list(SPARSITIES)
    args.blocks = args.blocks or list(BLOCKS)
    args.bits = args.bits or list(BITS)
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line(SCRIPT, argv)
    needed = [args.data / f"ml-100k.{ext}" for ext in ("inter", "user", "item")]
    if not all(p.is_file() for p in needed):
        msg = f"{SKIP_MESSAGE} at {args.data} (expected ml-100k.inter/.user/.item); pass --data PATH."
        print(msg)
        md = f"## Model quality: DLRM on MovieLens-100k\n\nCommand: `{cmd}`\n\n**{msg}**\n"
        common.write_section(args.out, NAME, md, {"command": cmd, "skipped": msg})
        return 0
    return common.run_section(NAME, cmd, args, measure, plot_quality, render)


if __name__ == "__main__":
    raise SystemExit(main())
