"""``embpress demo``: what pruning + low-bit quantization of embedding tables costs a click model.

A small DLRM-style model (one ``nn.EmbeddingBag`` per categorical feature, a bottom MLP
for the dense features, interaction by concatenation, a top MLP, sigmoid output) learns
synthetic click data: ids drawn with a Zipf-like skew (a few hot ids, a long tail, as in
real logs) and labels from a hidden logistic model over true per-id latent vectors and
the dense features. Each (sparsity, bits) setting compresses a copy of the trained model
with :func:`embpress.post_training_sparse_quantize` and is scored on held-out data by
AUC and log loss. Everything is seeded, so a run is reproducible.

Part of the ``cli`` extra: rich (the tables) and matplotlib (the plot) are imported only
when used, so ``import embpress.demo`` works without them.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .api import post_training_sparse_quantize
from .quant import QuantConfig
from .report import compression_report
from .sparsify import DataNormSparsifier

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ClickModel",
    "DemoResult",
    "DemoRow",
    "DemoSettings",
    "binary_auc",
    "log_loss",
    "make_data",
    "print_results",
    "run_demo",
]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the data, the model, the training and the sweep."""

    table_rows: tuple[int, ...] = (20_000, 10_000, 5_000, 2_000)
    table_dims: tuple[int, ...] = (32, 32, 16, 16)
    bag_lengths: tuple[int, ...] = (1, 3, 1, 2)
    num_dense: int = 4
    latent_dim: int = 4
    zipf_exponent: float = 1.05
    samples: int = 50_000
    test_fraction: float = 0.2
    epochs: int = 2
    batch_size: int = 256
    learning_rate: float = 0.005
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9)
    bits: tuple[int, ...] = (8, 4, 2)
    block: tuple[int, int] = (1, 4)


QUICK = DemoSettings(
    table_rows=(4_000, 2_000, 1_000, 500),
    table_dims=(16, 16, 8, 8),
    samples=12_000,
    epochs=2,
    sparsities=(0.0, 0.8),
    bits=(8, 2),
)


@dataclass
class Batch:
    """Dense features [N, num_dense], one [N, bag length] id tensor per table, labels [N]."""

    dense: torch.Tensor
    ids: list[torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: torch.Tensor | slice) -> Batch:
        """The samples at ``index``."""
        return Batch(self.dense[index], [t[index] for t in self.ids], self.labels[index])


def make_data(settings: DemoSettings, seed: int) -> tuple[Batch, Batch]:
    """(train, test): Zipf-skewed ids, labels from a planted logistic model."""
    g = torch.Generator().manual_seed(seed)
    n = settings.samples
    dense = torch.randn(n, settings.num_dense, generator=g)
    ids, logit = [], 0.8 * dense @ torch.randn(settings.num_dense, generator=g)
    pooled = []
    for rows, length in zip(settings.table_rows, settings.bag_lengths, strict=True):
        # popularity rank r has weight 1 / (r + 1)^s; ranks are shuffled over the ids
        weights = (torch.arange(rows, dtype=torch.float64) + 1.0) ** -settings.zipf_exponent
        popularity = weights[torch.argsort(torch.rand(rows, generator=g))]
        drawn = torch.multinomial(popularity, n * length, replacement=True, generator=g).view(n, length)
        latent = torch.randn(rows, settings.latent_dim, generator=g)
        z = latent[drawn].mean(1)
        pooled.append(z)
        logit = logit + z @ (torch.randn(settings.latent_dim, generator=g) / math.sqrt(settings.latent_dim))
        ids.append(drawn)
    logit = logit + 0.5 * (pooled[0] * pooled[1]).sum(1)  # an interaction the top MLP must learn
    labels = torch.bernoulli(torch.sigmoid(logit - 0.5), generator=g)
    data = Batch(dense, ids, labels)
    order = torch.randperm(n, generator=g)
    cut = int(n * (1 - settings.test_fraction))
    return data.take(order[:cut]), data.take(order[cut:])


class ClickModel(nn.Module):
    """DLRM-style: bag tables + bottom MLP, concatenated, top MLP, sigmoid."""

    def __init__(self, settings: DemoSettings) -> None:
        super().__init__()
        bags = [
            nn.EmbeddingBag(rows, dim, mode="mean")
            for rows, dim in zip(settings.table_rows, settings.table_dims, strict=True)
        ]
        for bag in bags:  # small init: rows that never train keep a small norm
            nn.init.normal_(bag.weight, std=0.01)
        self.tables = nn.ModuleList(bags)
        self.float_table_bytes = sum(bag.weight.numel() * 4 for bag in bags)
        self.bottom = nn.Sequential(nn.Linear(settings.num_dense, 16), nn.ReLU())
        self.top = nn.Sequential(nn.Linear(16 + sum(settings.table_dims), 64), nn.ReLU(), nn.Linear(64, 1))

    def logits(self, dense: torch.Tensor, ids: list[torch.Tensor]) -> torch.Tensor:
        """Pre-sigmoid scores [N]."""
        parts = [self.bottom(dense), *(table(t) for table, t in zip(self.tables, ids, strict=True))]
        out: torch.Tensor = self.top(torch.cat(parts, dim=1)).squeeze(1)
        return out

    def forward(self, dense: torch.Tensor, ids: list[torch.Tensor]) -> torch.Tensor:
        """Click probability [N]."""
        return torch.sigmoid(self.logits(dense, ids))


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by ranks (Mann-Whitney U), tied scores sharing their average rank."""
    scores = scores.detach().double().flatten()
    positive = labels.detach().flatten() > 0.5
    pos = int(positive.sum())
    neg = positive.numel() - pos
    if pos == 0 or neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of each score
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of the predicted probabilities (computed from logits)."""
    return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def train(model: ClickModel, data: Batch, settings: DemoSettings, seed: int) -> float:
    """Adam for ``settings.epochs`` epochs; returns the last epoch's mean training loss."""
    g = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    model.train()
    mean = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=g)
        total = 0.0
        for start in range(0, len(data), settings.batch_size):
            batch = data.take(order[start : start + settings.batch_size])
            loss = F.binary_cross_entropy_with_logits(model.logits(batch.dense, batch.ids), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        mean = total / len(data)
    model.eval()
    return mean


@torch.no_grad()
def evaluate(model: nn.Module, data: Batch) -> tuple[float, float]:
    """(AUC, log loss) on ``data``."""
    logits = model.logits(data.dense, data.ids)  # type: ignore[operator]
    return binary_auc(logits, data.labels), log_loss(logits, data.labels)


@dataclass(frozen=True)
class DemoRow:
    """One setting of the sweep (``sparsity``/``bits`` None: the float32 model)."""

    sparsity: float | None
    bits: int | None
    table_bytes: int
    ratio: float
    auc: float
    log_loss: float


@dataclass
class DemoResult:
    """The sweep, the float32 baseline and where the plot went."""

    baseline: DemoRow
    rows: list[DemoRow]
    plot: Path
    settings: DemoSettings
    train_loss: float
    train_seconds: float
    seconds: float = 0.0
    table_shapes: list[tuple[int, int]] = field(default_factory=list)


def _plot(result: DemoResult, path: Path) -> None:
    """AUC against total table bytes (log x), one line per bit width, float32 as a star."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for bits in result.settings.bits:
        rows = sorted((r for r in result.rows if r.bits == bits), key=lambda r: r.table_bytes)
        ax.plot([r.table_bytes for r in rows], [r.auc for r in rows], marker="o", label=f"{bits}-bit")
        for r in rows:
            ax.annotate(
                f"{r.sparsity:g}",
                (r.table_bytes, r.auc),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    base = result.baseline
    ax.plot([base.table_bytes], [base.auc], marker="*", markersize=14, linestyle="none", label="float32")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of all embedding tables (log scale)")
    ax.set_ylabel("held-out AUC")
    ax.set_title("AUC vs embedding table bytes (point labels: sparsity; block 1x4)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def run_demo(
    out_dir: str | Path = "out/demo",
    *,
    seed: int = 0,
    quick: bool = False,
    console: Console | None = None,
    settings: DemoSettings | None = None,
) -> DemoResult:
    """Train, sweep sparsity x bits, plot to ``out_dir/tradeoff.png``; progress on ``console``.

    Runs on one torch thread: the model's ops are too small to gain from more, and on a
    busy machine a multi-threaded pool can stall for tens of seconds. Needs matplotlib
    (ImportError, checked before training).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(
            "the demo plots with matplotlib, which is not installed: pip install 'embpress[cli]'"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # before training: a path that cannot hold the plot fails now
    if not os.access(out, os.W_OK):
        raise PermissionError(errno.EACCES, "permission denied", str(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, seed, settings or (QUICK if quick else DemoSettings()), console)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir: Path, seed: int, settings: DemoSettings, console: Console | None) -> DemoResult:
    start = time.perf_counter()

    def log(message: str) -> None:
        if console is not None:
            console.print(message)

    torch.manual_seed(seed)
    train_data, test_data = make_data(settings, seed)
    model = ClickModel(settings)
    log(
        f"training on {len(train_data)} synthetic clicks ({len(settings.table_rows)} tables, "
        f"{settings.epochs} epochs)..."
    )
    t0 = time.perf_counter()
    train_loss = train(model, train_data, settings, seed)
    train_seconds = time.perf_counter() - t0
    float_bytes = model.float_table_bytes
    auc, loss = evaluate(model, test_data)
    baseline = DemoRow(None, None, float_bytes, 1.0, auc, loss)
    log(f"trained in {train_seconds:.1f} s: train loss {train_loss:.4f}, held-out AUC {auc:.4f}")
    rows = []
    for sparsity in settings.sparsities:
        for bits in settings.bits:
            compressed = copy.deepcopy(model)
            post_training_sparse_quantize(
                compressed,
                DataNormSparsifier,
                True,
                quant=QuantConfig(bits=bits),
                sparsity_level=sparsity,
                sparse_block_shape=settings.block,
            )
            nbytes = sum(r.nbytes for r in compression_report(compressed))
            auc, loss = evaluate(compressed, test_data)
            rows.append(DemoRow(sparsity, bits, nbytes, nbytes / float_bytes, auc, loss))
            log(f"sparsity {sparsity:g}, {bits} bits: AUC {auc:.4f}")
    result = DemoResult(
        baseline=baseline,
        rows=rows,
        plot=out_dir / "tradeoff.png",
        settings=settings,
        train_loss=train_loss,
        train_seconds=train_seconds,
        table_shapes=list(zip(settings.table_rows, settings.table_dims, strict=True)),
    )
    _plot(result, result.plot)
    result.seconds = time.perf_counter() - start
    return result


def print_results(result: DemoResult, console: Console) -> None:
    """The sweep as a rich table (float32 first), then where the plot is."""
    from rich.table import Table

    shapes = ", ".join(f"{r}x{d}" for r, d in result.table_shapes)
    console.print(
        f"DLRM-style click model, tables {shapes} (rows x dim); block 1x4, sparsify-first; "
        f"trained {result.train_seconds:.1f} s to train loss {result.train_loss:.4f}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table()
    for head in ("sparsity", "bits", "table bytes", "ratio to float32", "AUC", "log loss"):
        table.add_column(head, justify="right", no_wrap=True)
    base = result.baseline
    table.add_row(
        "float32", "32", f"{base.table_bytes:,}", "1.0000", f"{base.auc:.4f}", f"{base.log_loss:.4f}"
    )
    for r in result.rows:
        table.add_row(
            f"{r.sparsity:g}",
            str(r.bits),
            f"{r.table_bytes:,}",
            f"{r.ratio:.4f}",
            f"{r.auc:.4f}",
            f"{r.log_loss:.4f}",
        )
    console.print(table)
    console.print(f"plot: {result.plot} (done in {result.seconds:.1f} s)", highlight=False, soft_wrap=True)
