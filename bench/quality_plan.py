"""Quality against bytes: every uniform setting against the planner (``embpress.plan``), two trained models.

Models (both trained here, with fixed seeds):

- **MovieLens-100k DLRM**: the data loading, model and training of ``bench/quality_ml100k.py``
  (imported, not copied); data read from ``../shared/data/ml-100k`` (or ``--data``), never
  copied into the repository; if it is absent that part says SKIPPED and the script still
  exits 0. Quality: test AUC.
- **Word-level language model** on the docstrings and comments of this interpreter's
  standard library (``Lib/**/*.py``, no site-packages): source files split by a CRC of their
  path (one in ten to test), words ``[a-z]+``, vocabulary = training words seen at least
  twice (+ ``<unk>``, ``<s>``). Next-word model: the four previous words through a token table
  ``nn.Embedding(V, 64)``, concatenated, ``Linear(256, 64)`` + tanh, adaptive softmax
  (``nn.AdaptiveLogSoftmaxWithLoss``). One epoch over a fixed sample of training positions.
  Quality: test cross-entropy (nats per word; perplexity = exp) and top-1 accuracy. Only the
  token table is compressed.

For each model: the float32 model; every uniform setting of ``post_training_sparse_quantize``
(sparsity x block x bits x order, as ``quality_ml100k.py`` sweeps); the planner at budgets of
1/4, 1/8, 1/16, 1/32 and 1/64 of the float32 table bytes, once without usage and once with
usage recorded (``embpress.record_usage``) on the training split. Quality is measured on the
test split. Bytes are the ``nbytes`` of the compressed tables. Each planned model is also
compared with the best uniform setting at its budget on the same test examples: the standard
error of the difference (a bootstrap for AUC, per-position for cross-entropy) says whether the
test set can tell them apart.

Usage (from the repository root)::

    python bench/quality_plan.py                  # both models (a few minutes on 2 cores)
    python bench/quality_plan.py --quick --out out/bench-quick
"""

from __future__ import annotations

import argparse
import collections
import copy
import itertools
import math
import re
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import quality_ml100k as ml

NAME = "quality_plan"
SCRIPT = "bench/quality_plan.py"
TITLE = "Quality against bytes: the planner against every uniform setting"
FRACTIONS = (4, 8, 16, 32, 64)
SKIP_MESSAGE = ml.SKIP_MESSAGE
# issue 11 "Done when"
ML_TARGETS = {16: 0.003, 32: 0.01}  # MovieLens: AUC within this of float32 at 1/16 and 1/32
LM_SHARE = 1 / 3  # language model at 1/16: loss at most this share of uniform 2-bit's loss
CTX = 4
LM_DIM = 64
LM_HIDDEN = 64
LM_CUTOFFS = (200, 2000)


# ------------------------------------------------------------------------------ one model
@dataclass
class Task:
    """A trained model, how to measure it and the tables that are compressed.

    ``evaluate(model)`` returns metrics; ``metric`` names the one compared, ``higher`` says
    whether more is better. ``tables`` are attribute names of the embedding modules.
    ``outputs(model)`` returns the model's per-example test outputs and ``paired_se(a, b)``
    the standard error of the metric's difference between two models from such outputs
    (the same test examples, so most of the sampling noise cancels).
    """

    key: str
    title: str
    description: str
    model: Any
    evaluate: Callable[[Any], dict[str, float]]
    metric: str
    higher: bool
    tables: tuple[str, ...]
    usage: Any
    dim: int
    outputs: Callable[[Any], Any]
    paired_se: Callable[[Any, Any], float]
    info: dict[str, Any] = field(default_factory=dict)

    def table_bytes(self, model: Any) -> int:
        """Bytes of the compressed tables as the model holds them."""
        total = 0
        for name in self.tables:
            m = getattr(model, name)
            total += int(m.nbytes) if hasattr(m, "nbytes") else m.weight.numel() * m.weight.element_size()
        return total

    def select(self, model: Any) -> list[Any]:
        return [getattr(model, n) for n in self.tables]


def better(higher: bool, a: float, b: float) -> bool:
    """``a`` strictly better than ``b`` (``higher``: more is better)."""
    return a > b if higher else a < b


def loss_of(higher: bool, value: float, base: float) -> float:
    """How much worse than float32 ``value`` is (positive = worse)."""
    return base - value if higher else value - base


# ------------------------------------------------------------------------------ MovieLens
def movielens_task(args: argparse.Namespace) -> Task | str:
    """The trained DLRM of quality_ml100k.py, or the SKIPPED message when the data is absent."""
    import torch

    import embpress

    needed = [args.data / f"ml-100k.{ext}" for ext in ("inter", "user", "item")]
    if not all(p.is_file() for p in needed):
        return f"{SKIP_MESSAGE} at {args.data} (expected ml-100k.inter/.user/.item); pass --data PATH."
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train_set, test_set, sizes = ml.load(args.data, args.ml_subsample, args.seed)
    model = ml.make_model(sizes, ml_dim := 16)
    losses = ml.train(model, train_set, args.ml_epochs, 512, args.seed)
    train_s = time.perf_counter() - t0
    with torch.inference_mode(), embpress.record_usage(model) as usage:
        model(train_set)
    tables = ("user", "item", "occupation", "zip", "genre")
    seen = {t: usage.seen_fraction(t) for t in tables}
    rows = ", ".join(f"{t} {sizes[t]}" for t in tables)
    description = (
        f"DLRM of `bench/quality_ml100k.py` on MovieLens-100k (rating >= 4): embedding bags {rows} rows x "
        f"{ml_dim}; temporal split {len(train_set):,} oldest ratings train, {len(test_set):,} latest test; "
        f"Adam, {args.ml_epochs} epochs, seed {args.seed} (training {train_s:.0f} s, train loss per epoch "
        f"{', '.join(f'{x:.3f}' for x in losses)}). Usage: one forward pass over the training ratings; "
        "share of rows seen: " + ", ".join(f"{t} {seen[t]:.2f}" for t in tables) + ". Quality: test AUC."
    )

    def outputs(m: Any) -> Any:
        with torch.inference_mode():
            return m(test_set).double().numpy()

    def paired_se(a: Any, b: Any) -> float:
        return auc_difference_se(a, b, test_set.label.numpy(), args.seed)

    return Task(
        key="ml100k",
        title="MovieLens-100k DLRM",
        description=description,
        model=model,
        evaluate=lambda m: ml.evaluate(m, test_set),
        metric="auc",
        higher=True,
        tables=tables,
        usage=usage,
        dim=ml_dim,
        outputs=outputs,
        paired_se=paired_se,
        info={"train_seconds": train_s, "seen_fraction": seen},
    )


BOOTSTRAP = 400  # resamples of the test set behind an AUC difference's standard error


def auc_difference_se(a: Any, b: Any, labels: Any, seed: int) -> float:
    """Standard error of AUC(a) - AUC(b), two models' scores on the same test examples:
    the spread of that difference over ``BOOTSTRAP`` resamples of the examples (the same
    resample for both models)."""
    import numpy as np
    import torch

    gen = np.random.default_rng(seed)
    n = len(labels)
    diffs = []
    for _ in range(BOOTSTRAP):
        pick = torch.from_numpy(gen.integers(0, n, n))
        y = torch.from_numpy(labels)[pick]
        diffs.append(ml.auc(torch.from_numpy(a)[pick], y) - ml.auc(torch.from_numpy(b)[pick], y))
    return float(np.std(diffs, ddof=1))


def mean_difference_se(a: Any, b: Any) -> float:
    """Standard error of mean(a) - mean(b), per-example values of two models on the same
    test examples (paired)."""
    import numpy as np

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


# ------------------------------------------------------------------------------ language model
_DOC = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)
_COMMENT = re.compile(r"^\s*#+(.*)$", re.M)
_WORD = re.compile(r"[a-z]+")


def stdlib_documents(lib: Path, max_files: int | None) -> tuple[list[list[str]], list[list[str]], int]:
    """(train documents, test documents, files read): the words of each file's docstrings
    (triple-quoted strings) and full-line comments; a file goes to test when the CRC-32 of its
    path relative to ``lib`` is 0 mod 10."""
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.relative_to(lib).parts)
    if max_files is not None:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    train: list[list[str]] = []
    test: list[list[str]] = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        text = " ".join(a or b for a, b in _DOC.findall(src)) + " " + " ".join(_COMMENT.findall(src))
        words = _WORD.findall(text.lower())
        if words:
            crc = zlib.crc32(f.relative_to(lib).as_posix().encode())
            (test if crc % 10 == 0 else train).append(words)
    return train, test, len(files)


def make_lm(vocab: int, dim: int = LM_DIM, hidden: int = LM_HIDDEN) -> Any:
    import torch
    from torch import nn

    class NextWord(nn.Module):
        """Previous CTX words -> token table -> concat -> Linear + tanh -> adaptive softmax."""

        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, dim, sparse=True)
            nn.init.normal_(self.tok.weight, std=0.1)
            self.hidden = nn.Sequential(nn.Linear(CTX * dim, hidden), nn.Tanh())
            cutoffs = [c for c in LM_CUTOFFS if c < vocab - 1]
            self.out = nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, cutoffs=cutoffs, div_value=4.0)

        def features(self, ctx: torch.Tensor) -> torch.Tensor:
            return self.hidden(self.tok(ctx).flatten(1))

        def forward(self, ctx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """Mean negative log-likelihood of ``target`` after ``ctx``."""
            return self.out(self.features(ctx), target).loss

    return NextWord()


def _windows(docs: list[list[str]], index: dict[str, int]) -> tuple[Any, Any]:
    """(contexts [N, CTX], next words [N]); each document starts after CTX ``<s>`` ids."""
    import numpy as np
    import torch

    xs, ys = [], []
    for d in docs:
        ids = np.array([1] * CTX + [index.get(w, 0) for w in d], dtype=np.int64)
        n = len(ids) - CTX
        xs.append(ids[np.arange(n)[:, None] + np.arange(CTX)[None, :]])
        ys.append(ids[CTX:])
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def lm_task(args: argparse.Namespace) -> Task:
    """Train the next-word model; usage is recorded during its one training epoch."""
    import torch

    import embpress

    t0 = time.perf_counter()
    train_docs, test_docs, nfiles = stdlib_documents(args.lib, args.lm_files)
    counts = collections.Counter(w for d in train_docs for w in d)
    words = [w for w, c in counts.most_common(args.lm_vocab) if c >= 2]
    vocab = ["<unk>", "<s>", *words]
    index = {w: i for i, w in enumerate(vocab)}
    x_train, y_train = _windows(train_docs, index)
    x_test, y_test = _windows(test_docs, index)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y_train), generator=gen)[: args.lm_train]
    pick = torch.randperm(len(y_test), generator=gen)[: args.lm_test]
    x_test, y_test = x_test[pick], y_test[pick]
    read_s = time.perf_counter() - t0

    torch.manual_seed(args.seed)
    model = make_lm(len(vocab))
    dense = [p for n, p in model.named_parameters() if not n.startswith("tok.")]
    opt = torch.optim.Adam(dense, lr=5e-3)
    opt_tok = torch.optim.SparseAdam(list(model.tok.parameters()), lr=5e-3)
    batch = 1024
    t1 = time.perf_counter()
    losses = []
    model.train()
    with embpress.record_usage(model) as usage:  # the training split's lookups, as training makes them
        for s in range(0, len(order), batch):
            b = order[s : s + batch]
            opt.zero_grad()
            opt_tok.zero_grad()
            loss = model(x_train[b], y_train[b])
            loss.backward()
            opt.step()
            opt_tok.step()
            losses.append(float(loss.detach()))
    model.eval()
    train_s = time.perf_counter() - t1

    def evaluate(m: Any) -> dict[str, float]:
        with torch.inference_mode():
            total, hits = 0.0, 0
            for s in range(0, len(y_test), 4096):
                x, y = x_test[s : s + 4096], y_test[s : s + 4096]
                feats = m.hidden(m.tok(x).flatten(1))
                total += float(m.out(feats, y).loss) * len(y)
                hits += int((m.out.predict(feats) == y).sum())
        ce = total / len(y_test)
        return {"ce": ce, "ppl": math.exp(ce), "top1": hits / len(y_test)}

    def outputs(m: Any) -> Any:
        """Cross-entropy of each test position (nats)."""
        with torch.inference_mode():
            parts = []
            for s in range(0, len(y_test), 4096):
                x, y = x_test[s : s + 4096], y_test[s : s + 4096]
                parts.append(-m.out(m.hidden(m.tok(x).flatten(1)), y).output.double())
            return torch.cat(parts).numpy()

    unk = float((y_test == 0).double().mean())
    tail = sum(losses[-20:]) / max(1, len(losses[-20:]))
    train_words, test_words = sum(map(len, train_docs)), sum(map(len, test_docs))
    description = (
        f"Next-word model on the docstrings and full-line comments of Python {sys.version.split()[0]}'s "
        f"standard library ({nfiles} files under `{args.lib}`, no site-packages; one file in ten, by "
        f"CRC-32 of its path, is test): {train_words:,} training and {test_words:,} test words; "
        f"vocabulary {len(vocab):,} (training words seen twice or more, <unk>, <s>; {unk * 100:.1f}% "
        f"of test targets are <unk>). Model: {CTX} previous words -> token table "
        f"nn.Embedding({len(vocab)}, {LM_DIM}) -> concat -> Linear({CTX * LM_DIM}, {LM_HIDDEN}) + tanh "
        f"-> adaptive softmax (cutoffs {list(LM_CUTOFFS)}); Adam/SparseAdam lr 5e-3, batch {batch}, one "
        f"epoch over {len(order):,} training positions, seed {args.seed} (reading {read_s:.0f} s, "
        f"training {train_s:.0f} s; last batches' loss {tail:.2f}). Usage: recorded during that epoch. "
        f"Quality: cross-entropy (nats/word) on {len(y_test):,} test positions (perplexity = exp), "
        "top-1 accuracy; only the token table is compressed."
    )
    return Task(
        key="lm",
        title="Word-level language model (standard-library docstrings)",
        description=description,
        model=model,
        evaluate=evaluate,
        metric="ce",
        higher=False,
        tables=("tok",),
        usage=usage,
        dim=LM_DIM,
        outputs=outputs,
        paired_se=mean_difference_se,
        info={"vocab": len(vocab), "train_seconds": train_s, "read_seconds": read_s, "files": nfiles},
    )


# ------------------------------------------------------------------------------ measuring
OUTPUTS = "_outputs"  # a run's per-example test outputs, while the section measures


def uniform_sweep(task: Task, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting of post_training_sparse_quantize, each on a copy of the model."""
    import embpress

    runs = []
    for sparsity, block, bits, sf in itertools.product(args.sparsities, args.blocks, args.bits, args.orders):
        row: dict[str, Any] = {"sparsity": sparsity, "block": block, "bits": bits, "sparsify_first": sf}
        try:
            m = copy.deepcopy(task.model)
            embpress.post_training_sparse_quantize(
                m,
                embpress.DataNormSparsifier,
                sf,
                select_embeddings=task.select(m),
                quant=embpress.QuantConfig(bits=bits),
                sparsity_level=sparsity,
                sparse_block_shape=ml.block_shape(block, task.dim),
            )
            m.eval()
            keep_threads(args.threads)
            row.update(task.evaluate(m), bytes=task.table_bytes(m), error=None)
            row[OUTPUTS] = task.outputs(m)
        except Exception as exc:  # a failure is a result too
            row.update(bytes=0, error=f"{type(exc).__name__}: {exc}")
        runs.append(row)
    return runs


def keep_threads(threads: int) -> None:
    """Set torch's thread count back to ``threads``.

    numba's OpenMP threading layer (which embpress's parallel kernels start) sets the thread
    count of the OpenMP runtime that torch shares, so torch would run on more threads than it
    was given after every compression; on a busy machine that made evaluation and training
    up to ten times slower here.
    """
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _warm_up_planner(embpress: Any) -> None:
    """One plan and apply of a small table, so that the timed runs do not include
    compiling the planner's kernels (a fresh kernel cache compiles them on first use)."""
    if not hasattr(embpress, "plan"):
        return
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"e": nn.Embedding.from_pretrained(torch.randn(300, 16, generator=g))})
    usage = embpress.Usage({"e": torch.arange(300, dtype=torch.float64)})
    for u in (None, usage):
        embpress.plan(model, 300 * 16 * 4 // 16, usage=u).apply(copy.deepcopy(model), usage=u)


def planner_runs(task: Task, float_bytes: int, threads: int) -> list[dict[str, Any]]:
    """embpress.plan + apply at every budget, without and with usage."""
    import embpress

    _warm_up_planner(embpress)
    runs = []
    for frac, with_usage in itertools.product(FRACTIONS, (False, True)):
        budget = float_bytes // frac
        row: dict[str, Any] = {"fraction": frac, "budget": budget, "usage": with_usage}
        try:
            if not hasattr(embpress, "plan"):
                raise RuntimeError("embpress.plan is not available in this version")
            m = copy.deepcopy(task.model)
            usage = task.usage if with_usage else None
            t0 = time.perf_counter()
            p = embpress.plan(m, budget, usage=usage, select_embeddings=task.select(m))
            t1 = time.perf_counter()
            p.apply(m, usage=usage)
            t2 = time.perf_counter()
            m.eval()
            keep_threads(threads)
            row.update(
                task.evaluate(m),
                bytes=task.table_bytes(m),
                predicted_bytes=int(p.predicted_bytes),
                plan_seconds=t1 - t0,
                apply_seconds=t2 - t1,
                choice={t.name: t.summary() for t in p.tables},
                error=None,
            )
            row[OUTPUTS] = task.outputs(m)
        except Exception as exc:
            row.update(bytes=0, error=f"{type(exc).__name__}: {exc}")
        runs.append(row)
    return runs


def measure_task(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    base = task.evaluate(task.model)
    float_bytes = task.table_bytes(task.model)
    print(f"{task.key}: float32 {base} ({float_bytes} bytes)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    uniform = uniform_sweep(task, args)
    t1 = time.perf_counter()
    planner = planner_runs(task, float_bytes, args.threads)
    t2 = time.perf_counter()
    print(f"{task.key}: sweep {t1 - t0:.0f} s, planner {t2 - t1:.0f} s", file=sys.stderr, flush=True)
    model = {
        "key": task.key,
        "title": task.title,
        "description": task.description,
        "metric": task.metric,
        "higher": task.higher,
        "float": {**base, "bytes": float_bytes},
        "uniform": uniform,
        "planner": planner,
        "info": task.info,
        "sweep_seconds": t1 - t0,
        "planner_seconds": t2 - t1,
    }
    # each planned model against the best uniform setting at its budget, on the same test
    # examples: the standard error of that difference (the per-example outputs stay here)
    for r in planner:
        u = best_uniform(model, r["budget"])
        if OUTPUTS in r and u is not None and OUTPUTS in u:
            r["se_vs_uniform"] = task.paired_se(r[OUTPUTS], u[OUTPUTS])
    for r in (*uniform, *planner):
        r.pop(OUTPUTS, None)
    return model


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    common.quiet_torch_warnings()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"models": []}
    ml_task = movielens_task(args)
    if isinstance(ml_task, str):
        print(ml_task)
        out["skipped"] = ml_task
    else:
        out["models"].append(measure_task(ml_task, args))
    keep_threads(args.threads)
    out["models"].append(measure_task(lm_task(args), args))
    return out


# ------------------------------------------------------------------------------ judging
def best_uniform(model: dict[str, Any], budget: int) -> dict[str, Any] | None:
    """The best uniform setting whose bytes fit ``budget``."""
    fits = [r for r in model["uniform"] if not r["error"] and r["bytes"] <= budget]
    if not fits:
        return None
    key = model["metric"]
    return max(fits, key=lambda r: r[key]) if model["higher"] else min(fits, key=lambda r: r[key])


def _planner(model: dict[str, Any], frac: int, with_usage: bool) -> dict[str, Any] | None:
    for r in model["planner"]:
        if r["fraction"] == frac and r["usage"] == with_usage:
            return r
    return None


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and not r["error"]


def _shortfall(frac: int, margin: float, beats_float: float, from_float: float, se: float | None) -> str:
    """One budget where the planner fell short of the best uniform setting, how that compares
    with the standard error of the difference (``se``, from the same test examples), and
    where both stand against float32 (a uniform setting can score above the float model
    itself)."""
    text = f"1/{frac} (by {margin:.2g}"
    if se is not None and se > 0:
        text += f", {margin / se:.1f} standard errors of the difference ({se:.2g})"
    if beats_float > 0:
        side = "below" if from_float > 0 else "above"
        text += (
            f"; that uniform setting scores {beats_float:.2g} above float32 itself, "
            f"the planner {abs(from_float):.2g} {side} it"
        )
    return text + ")"


def targets(model: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, PASS/FAIL/None=n/a, detail) for one model, as issue 11 states them."""
    key, higher = model["metric"], model["higher"]
    base = model["float"][key]
    out: list[tuple[str, bool | None, str]] = []
    for with_usage in (True, False):
        tag = "with usage" if with_usage else "without usage"
        results: list[tuple[int, bool | None]] = []
        margins: dict[int, float] = {}
        beats_float: dict[int, float] = {}
        from_float: dict[int, float] = {}
        ses: dict[int, float | None] = {}
        over: list[int] = []  # the planner's bytes above the budget
        vacuous: list[int] = []  # no uniform setting fits the budget
        for frac in FRACTIONS:
            p = _planner(model, frac, with_usage)
            u = best_uniform(model, model["float"]["bytes"] // frac)
            if not _ok(p):
                results.append((frac, None))
                continue
            assert p is not None
            if p["bytes"] > p["budget"]:
                results.append((frac, False))
                over.append(frac)
                continue
            if u is None:
                results.append((frac, True))  # nothing uniform fits: the target holds, vacuously
                vacuous.append(frac)
                continue
            strict = frac >= 16
            ok = better(higher, p[key], u[key]) if strict else not better(higher, u[key], p[key])
            results.append((frac, ok))
            margins[frac] = loss_of(higher, p[key], u[key])  # > 0: the planner is worse
            # where the uniform setting beats float32 itself, the planner's shortfall is the
            # compressed model's luck against the float model, which says so
            beats_float[frac] = loss_of(higher, base, u[key])  # > 0: uniform above float32
            from_float[frac] = loss_of(higher, p[key], base)  # > 0: the planner below float32
            ses[frac] = p.get("se_vs_uniform")
        missing = [f for f, ok in results if ok is None]
        bad = [f for f, ok in results if ok is False]
        verdict = None if missing else not bad
        short = [f for f in bad if f not in over]
        shortfalls = [_shortfall(f, margins[f], beats_float[f], from_float[f], ses[f]) for f in short]
        detail = (
            "planner not run: " + ", ".join(f"1/{f}" for f in missing)
            if missing
            else "; ".join(
                part
                for part in (
                    "over the budget at " + ", ".join(f"1/{f}" for f in over) if over else "",
                    "short at " + ", ".join(shortfalls) if short else "",
                    "every budget" if not bad else "",
                    "no uniform setting fits " + ", ".join(f"1/{f}" for f in vacuous) if vacuous else "",
                )
                if part
            )
        )
        out.append(
            (f"planner ({tag}) >= best uniform at 1/4..1/64, strictly better at <= 1/16", verdict, detail)
        )
    if model["key"] == "ml100k":
        for frac, tol in ML_TARGETS.items():
            p = _planner(model, frac, True)
            text = f"planner (with usage): AUC at 1/{frac} within {tol} of float32"
            if not _ok(p):
                out.append((text, None, "planner not run"))
                continue
            assert p is not None
            drop = base - p[key]
            out.append((text, drop <= tol, f"{-drop:+.4f}"))
    else:
        two = [r for r in model["uniform"] if not r["error"] and r["bits"] == 2 and r["sparsity"] == 0.0]
        p = _planner(model, 16, True)
        if not two or not _ok(p):
            out.append(("planner (with usage): loss at 1/16 <= 1/3 of uniform 2-bit's", None, "not measured"))
        else:
            assert p is not None
            loss2 = loss_of(higher, two[0][key], base)
            lossp = loss_of(higher, p[key], base)
            out.append(
                (
                    "planner (with usage): loss at 1/16 <= 1/3 of uniform 2-bit's",
                    lossp <= LM_SHARE * loss2,
                    f"{lossp:+.4f} vs 2-bit {loss2:+.4f} nats",
                )
            )
    return out


# ------------------------------------------------------------------------------ rendering
def _setting(r: dict[str, Any]) -> str:
    order = "sf" if r["sparsify_first"] else "qf"
    return f"{r['bits']}-bit {r['block']} s={r['sparsity']:g} {order}"


def _fmt(model: dict[str, Any], r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if r.get("error"):
        return "error"
    key = model["metric"]
    base = model["float"][key]
    if key == "auc":
        return f"{r[key]:.4f} ({r[key] - base:+.4f})"
    return f"{r[key]:.3f} ({r[key] - base:+.3f}), ppl {r['ppl']:.0f}, top-1 {r['top1'] * 100:.1f}%"


def render_model(model: dict[str, Any]) -> list[str]:
    key = model["metric"]
    base = model["float"]
    what = "test AUC" if key == "auc" else "test cross-entropy (nats/word; lower is better)"
    if key == "auc":
        head = f"float32: test AUC {base['auc']:.4f}, tables {common.fmt_bytes(base['bytes'])}"
    else:
        head = (
            f"float32: test cross-entropy {base['ce']:.3f} nats/word (perplexity {base['ppl']:.0f}), "
            f"top-1 {base['top1'] * 100:.1f}%, token table {common.fmt_bytes(base['bytes'])}"
        )
    rows = []
    for frac in FRACTIONS:
        budget = base["bytes"] // frac
        u = best_uniform(model, budget)
        cells = [f"1/{frac}", common.fmt_bytes(budget)]
        cells += [_setting(u) if u else "none fits", _fmt(model, u) if u else "–"]
        for with_usage in (False, True):
            p = _planner(model, frac, with_usage)
            cells.append(_fmt(model, p))
            cells.append(common.fmt_bytes(p["bytes"]) if _ok(p) and p is not None else "–")
        rows.append(cells)
    lines = [
        f"### {model['title']}",
        "",
        model["description"],
        "",
        f"**{head}.** Uniform settings swept: {len(model['uniform'])}.",
        "",
        common.md_table(
            [
                "budget",
                "bytes",
                "best uniform that fits",
                f"its {what}",
                "planner, no usage",
                "bytes",
                "planner, usage",
                "bytes",
            ],
            rows,
            "lrlrrrrr",
        ),
        "",
        "Targets (issue 11):",
        "",
    ]
    for text, ok, detail in targets(model):
        lines.append(f"- {text}: **{common.pass_fail(ok)}** ({detail})")
    plans = [r for r in model["planner"] if _ok(r)]
    if plans:
        lines += [
            "",
            f"Planning {max(r['plan_seconds'] for r in plans):.2f} s at most, applying "
            f"{max(r['apply_seconds'] for r in plans):.2f} s at most per budget (kernels compiled "
            "beforehand, by one plan of a small table); "
            f"bytes after apply equal the plan's prediction: "
            f"{'yes' if all(r['bytes'] == r['predicted_bytes'] for r in plans) else 'NO'}.",
        ]
        chosen = [
            [f"1/{r['fraction']}", "usage" if r["usage"] else "none", t, c]
            for r in plans
            for t, c in r["choice"].items()
            if r["fraction"] in (16, 32)
        ]
        lines += [
            "",
            "<details><summary>What the planner chose at 1/16 and 1/32</summary>",
            "",
            common.md_table(["budget", "usage", "table", "choice"], chosen, "llll"),
            "",
            "</details>",
        ]
    failed = [r for r in model["planner"] if r["error"]] + [r for r in model["uniform"] if r["error"]]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['error']}`" for r in failed[:6]]
    return [*lines, ""]


def render(data: dict[str, Any], args: argparse.Namespace, cmd: str, plot: Path | None) -> str:
    lines = [
        f"## {TITLE}",
        "",
        f"Command: `{cmd}`",
        "",
        "Quality on the test split against the bytes of the compressed tables. Points: every uniform "
        "setting of `post_training_sparse_quantize` (DataNormSparsifier; sparsity "
        f"{', '.join(f'{s:g}' for s in args.sparsities)} x blocks {', '.join(args.blocks)} x "
        f"{', '.join(str(b) for b in args.bits)} bits x "
        f"{' and '.join('sparsify-first' if o else 'quantize-first' for o in args.orders)}). Lines: "
        "`embpress.plan(model, budget, usage=...)` then `plan.apply`, at 1/4 ... 1/64 of the float32 "
        "table bytes, without usage and with usage recorded by `embpress.record_usage` on the training "
        f"split. The best uniform setting is the best one whose bytes fit the budget. {args.threads} torch "
        "thread(s). Where the planner falls short of it, the shortfall is also given in standard errors of "
        "the difference between the two models on the same test examples (AUC: the spread over "
        f"{BOOTSTRAP} bootstrap resamples of the test set; cross-entropy: of the per-position "
        "difference): below about 2 the test set cannot tell the two apart.",
        "",
    ]
    if data.get("skipped"):
        lines += [f"**{data['skipped']}**", ""]
    for model in data["models"]:
        lines += render_model(model)
    if plot is not None:
        lines += [
            f"![quality against bytes, uniform settings and planner]({common.relpath(plot, args.md_root)})",
            "",
        ]
    return "\n".join(lines) + "\n"


def plot_quality(data: dict[str, Any], path: Path) -> Path | None:
    models = data["models"]
    if not models:
        return None
    plt = common.setup_matplotlib()
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.6), dpi=90, squeeze=False)
    markers = {"1x1": "o", "1x4": "s", "rows": "^"}
    colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:green"}
    for ax, model in zip(axes[0], models, strict=True):
        key = model["metric"]
        seen: set[str] = set()
        for r in model["uniform"]:
            if r["error"]:
                continue
            label = f"uniform {r['bits']}-bit {r['block']}"
            ax.scatter(
                r["bytes"] / 1e3,
                r[key],
                marker=markers.get(r["block"], "o"),
                facecolors=colors.get(r["bits"], "gray") if r["sparsify_first"] else "none",
                edgecolors=colors.get(r["bits"], "gray"),
                s=22,
                alpha=0.8,
                label=None if label in seen else label,
            )
            seen.add(label)
        for with_usage, style, color in ((False, "--", "tab:purple"), (True, "-", "tab:red")):
            pts = sorted(
                (r["bytes"] / 1e3, r[key]) for r in model["planner"] if r["usage"] == with_usage and _ok(r)
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    marker="D",
                    markersize=4,
                    label=f"planner, {'usage' if with_usage else 'no usage'}",
                )
        for frac in FRACTIONS:
            ax.axvline(model["float"]["bytes"] / frac / 1e3, color="gray", linewidth=0.5, alpha=0.5)
        ax.axhline(model["float"][key], color="black", linestyle=":", linewidth=1, label="float32")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.set_xlabel("kB of compressed tables (grey lines: 1/64 ... 1/4 of float32)")
        ax.set_ylabel("test AUC" if key == "auc" else "test cross-entropy, nats/word (lower is better)")
        ax.set_title(model["title"] + " (hollow: quantize-first)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        # the tail of heavily pruned settings would flatten the interesting part
        values = [r[key] for r in model["uniform"] + model["planner"] if _ok(r)]
        base = model["float"][key]
        if values and key == "auc":
            ax.set_ylim(bottom=max(base - 0.08, min(values)) - 0.005)
        elif values:
            ax.set_ylim(top=min(base + 0.4, max(values)) + 0.01)
    return common.save_figure(fig, path)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small data, short training, a smaller sweep")
    p.add_argument("--data", type=Path, default=ml.DEFAULT_DATA, help="folder with ml-100k.{inter,user,item}")
    p.add_argument(
        "--lib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="Python's Lib folder"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--ml-subsample", type=int, help="MovieLens: use this many ratings")
    p.add_argument("--ml-epochs", type=int)
    p.add_argument("--lm-files", type=int, help="language model: read about this many source files")
    p.add_argument("--lm-vocab", type=int, help="language model: at most this many words (+2)")
    p.add_argument("--lm-train", type=int, help="language model: training positions (one epoch)")
    p.add_argument("--lm-test", type=int, help="language model: test positions")
    p.add_argument("--sparsities", type=float, nargs="+")
    p.add_argument("--blocks", nargs="+", choices=ml.BLOCKS)
    p.add_argument("--bits", type=int, nargs="+", choices=ml.BITS)
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.ml_subsample = args.ml_subsample or 20_000
        args.ml_epochs = args.ml_epochs or 2
        args.lm_files = args.lm_files or 150
        args.lm_vocab = args.lm_vocab or 3000
        args.lm_train = args.lm_train or 40_000
        args.lm_test = args.lm_test or 2000
        args.sparsities = args.sparsities or [0.0, 0.8]
        args.blocks = args.blocks or ["rows"]
        args.bits = args.bits or [8, 2]
        args.orders = [True]
    else:
        args.orders = [True, False]
    args.ml_epochs = args.ml_epochs or 3
    args.lm_vocab = args.lm_vocab or 16_000
    args.lm_train = args.lm_train or 400_000
    args.lm_test = args.lm_test or 8000
    args.sparsities = args.sparsities or list(ml.SPARSITIES)
    args.blocks = args.blocks or list(ml.BLOCKS)
    args.bits = args.bits or list(ml.BITS)
    common.finish_output_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cmd = common.command_line(SCRIPT, argv)
    return common.run_section(NAME, cmd, args, measure, plot_quality, render)


if __name__ == "__main__":
    raise SystemExit(main())
