"""plan: choose, for every row of a model's embedding tables, how to store it within a byte budget.

``embpress.plan(model, budget_bytes=...)`` weighs every codec of ``quant.codecs`` (pruned,
uniform row-wise, per-row levels, per-column codebooks) for every row, and picks the
assignment that minimises the expected output error within the budget; ``plan.apply(model)``
stores each table as a ``mixed`` layout table (``layouts.mixed.MixedTable``, up to four
codecs per table) in ``QuantizedEmbedding(Bag)`` modules.

Objective. A lookup of table t returns row r with probability ``p_t[r]``; the planner
minimises ``sum_t sum_r p_t[r] * |row_r - decoded_r|^2``, the expected squared error per
lookup summed over tables. With usage (``embpress.record_usage``), ``p_t`` follows the
square roots of the counts (``USAGE_POWER``: calibration counts overstate the skew of the
traffic a model meets later; measured on held-out data, BENCHMARKS.md), normalised and
mixed with a prior share ``unseen_weight`` spread evenly over all rows (rows that
calibration never saw are still looked up on new data). Without usage the data-free proxy
is the rows' squared norms (trained tables give the rows that matter the larger norms),
mixed the same way.

Allocation. For a multiplier ``lam`` each row takes the codec minimising
``error + lam * bytes``; ``lam`` is found by bisection so that all selected tables together
fit the budget (fixed bytes, such as the id map and shared codebooks, counted exactly by
``MixedTable.predicted_size``; the first, coarse search leaves the shared codebooks out,
whose bytes would make the size jump). A table keeps at most four codecs, pruning always
among them: the one whose removal costs least, net of its shared bytes, is dropped until
four are left and every codebook pays for itself. The bisection spans every scale of the
rows' errors (tables whose values differ by 1e5 differ by 1e10 and more in error). The bytes
it leaves are then spent greedily (largest error drop per byte first), on moves into any
codec of the table's set that adds no shared bytes. The plan's predicted bytes are exactly the
``nbytes`` of the tables ``apply`` builds. With ``max_error=`` instead of a budget it is the
same search from the other side: the fewest bytes whose predicted error stays within it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._aot import KernelRef
from ._parallel import parallel_call
from .api import Target, checked_weight, find_embeddings, is_plain_embedding, quantized_module, swap_modules
from .io import strict_json, temp_file_for
from .layouts.mixed import MixedTable
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag
from .quant import QuantConfig
from .quant.codecs import CODECS, Codec, encode_rows
from .report import human_bytes, printable
from .usage import Usage, UsageError

# numba kernels, loaded (with numba) on first use (see ``_aot``)
best_moves = KernelRef("embpress._plan_kernels", "best_moves")
choose_rows = KernelRef("embpress._plan_kernels", "choose_rows")
choose_rows_serial = KernelRef("embpress._plan_kernels", "choose_rows_serial")
count_codes = KernelRef("embpress._plan_kernels", "count_codes")
drop_cost = KernelRef("embpress._plan_kernels", "drop_cost")
drop_cost_serial = KernelRef("embpress._plan_kernels", "drop_cost_serial")
smallest_positive = KernelRef("embpress._plan_kernels", "smallest_positive")
table_error = KernelRef("embpress._plan_kernels", "table_error")
take_greedy = KernelRef("embpress._plan_kernels", "take_greedy")

__all__ = ["DEFAULT_UNSEEN_WEIGHT", "MAX_CODECS", "Plan", "PlanError", "TablePlan", "plan", "row_weights"]

FORMAT_NAME = "embpress-plan"
FORMAT_VERSION = 1
MAX_CODECS = 4
# Share of each table's lookup probability spread evenly over all its rows when usage is given.
# On MovieLens-100k (usage of the training split, AUC on the test split, 1/16 to 1/64 of the
# float32 bytes) 0 to 0.1 score alike and 0.3 worse; a little keeps unseen rows from zero weight.
DEFAULT_UNSEEN_WEIGHT = 0.03
# the remedy a plan's refusal of NaN/Inf names (a plan has no setting that zeroes them)
PLAN_NONFINITE = "a plan needs finite tables: fix the table first (uniform settings can zero them instead)"
_ASSIGNMENT_ENCODING = "base64-2bit-le"  # four ids per byte, the first in the low bits
_PRUNED = Codec("pruned", 0)
_BISECT_STEPS = 64
_BISECT_RATIO = 1.05  # stop once lam is known this closely; the greedy fill does the rest
_FILL_PASSES = 8
_RESTART_ROWS = 1 << 17  # planning this many rows again costs little
_RESTART_FACTORS = (1.5, 2.5, 4.0, 8.0)
_PARALLEL_ROWS = 1 << 16  # below this a table's kernels run on one thread (a launch costs more)
# the smallest multiplier tried first, relative to one that prunes every row (below it only
# when it fits: _lam_floor)
_BISECT_RANGE = 1e-12


class PlanError(ValueError):
    """A plan that cannot be made, read or applied (budget, usage, file or model mismatch)."""


# ------------------------------------------------------------------------------ row weights
# p_t[r] follows counts ** USAGE_POWER: on the trained models of BENCHMARKS.md, 0.5 did
# better on held-out data than 1 (the plain expected error of the calibration traffic)
USAGE_POWER = 0.5


def row_weights(
    rows: int,
    counts: torch.Tensor | np.ndarray | None,
    unseen_weight: float,
    norms: np.ndarray | None = None,
) -> np.ndarray:
    """Lookup probability per row (float64, sums to 1).

    ``(1 - unseen_weight) * s / s.sum() + unseen_weight / rows`` with ``s`` the counts to
    the power ``USAGE_POWER``, or without ``counts`` the rows' squared ``norms`` (when
    given); uniform when neither is given or all of ``s`` is 0.
    """
    if rows <= 0:
        raise PlanError(f"rows must be positive, got {rows}")
    uniform = np.full(rows, 1.0 / rows)
    if counts is None:
        if norms is None:
            return uniform
        s = np.ascontiguousarray(norms, dtype=np.float64)
        if s.shape != (rows,) or not np.isfinite(s).all() or (s < 0).any():
            raise PlanError(f"norms must be {rows} finite values >= 0")
    else:
        c = counts.detach().cpu().double().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
        c = np.ascontiguousarray(c, dtype=np.float64)
        if c.ndim != 1 or c.shape[0] != rows:
            raise PlanError(f"counts must be 1-D with {rows} entries, got shape {tuple(c.shape)}")
        if not np.isfinite(c).all():
            raise PlanError("counts hold NaN or Inf")
        if (c < 0).any():
            raise PlanError("counts are negative")
        s = c**USAGE_POWER
    total = float(s.sum())
    if not math.isfinite(total) or total <= 0.0:
        return uniform
    return (1.0 - unseen_weight) * (s / total) + unseen_weight / rows


def squared_norms(weight: torch.Tensor) -> np.ndarray:
    """float64 squared L2 norm of each row of a float table (the data-free row weights):
    for a float32 table the pruned codec's errors, one pass with float64 sums and no
    float64 copy of the table (which cost a sixth of a plan)."""
    w = weight.detach().cpu()
    if w.dtype == torch.float32:
        return encode_rows(w.contiguous().numpy(), None, _PRUNED)[0]
    w = w.to(torch.float64)
    return (w * w).sum(1).numpy()


# ------------------------------------------------------------------------------ one table's plan
@dataclass(frozen=True, eq=False)
class TablePlan:
    """How one table is stored: its codecs, each row's codec (``assignment[r]`` indexes
    ``codecs``), and what that predicts. ``reference_error`` is the predicted error of
    pruning every row, so ``predicted_error / reference_error`` is the relative error."""

    name: str
    rows: int
    dim: int
    codecs: tuple[Codec, ...]
    assignment: np.ndarray  # uint8 [rows]
    predicted_bytes: int
    predicted_error: float
    reference_error: float

    @property
    def class_rows(self) -> tuple[int, ...]:
        """Rows per codec, in the order of ``codecs``."""
        counts = np.bincount(self.assignment, minlength=len(self.codecs))
        return tuple(int(n) for n in counts)

    @property
    def float_nbytes(self) -> int:
        """Bytes of the table as float32."""
        return self.rows * self.dim * 4

    def summary(self) -> str:
        """The choice in words, richest codec first: ``rowwise8 12% / colbook2 80% / pruned 8%``."""
        order = sorted(
            zip(self.codecs, self.class_rows, strict=True), key=lambda cn: -cn[0].row_bytes(self.dim)
        )
        return " / ".join(f"{c.name} {_percent(n / self.rows)}" for c, n in order if n)

    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`Plan.save` writes for this table."""
        return {
            "name": self.name,
            "rows": self.rows,
            "dim": self.dim,
            "codecs": [c.name for c in self.codecs],
            "class_rows": list(self.class_rows),
            "assignment": {"encoding": _ASSIGNMENT_ENCODING, "data": _pack_ids(self.assignment)},
            "predicted_bytes": self.predicted_bytes,
            "predicted_error": self.predicted_error,
            "reference_error": self.reference_error,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> TablePlan:
        """A table read back from :meth:`to_json`'s object; every field checked (PlanError)."""
        if not isinstance(obj, dict):
            raise PlanError(f"{where}: must be an object")
        expected = {
            "name", "rows", "dim", "codecs", "class_rows", "assignment",
            "predicted_bytes", "predicted_error", "reference_error",
        }  # fmt: skip
        _exact_keys(obj, expected, where)
        name = obj["name"]
        if not isinstance(name, str) or not name:
            raise PlanError(f"{where}.name: must be a non-empty string")
        where = f"{where} ({name!r})"
        rows = _positive_int(obj["rows"], f"{where}.rows")
        dim = _positive_int(obj["dim"], f"{where}.dim")
        names = obj["codecs"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_CODECS:
            raise PlanError(f"{where}.codecs: must be a list of 1 to {MAX_CODECS} codec names")
        codecs: list[Codec] = []
        for n in names:
            if not isinstance(n, str):
                raise PlanError(f"{where}.codecs: {n!r} is not a codec name")
            try:
                codecs.append(Codec.parse(n))
            except ValueError as err:
                raise PlanError(f"{where}.codecs: {err}") from None
        if len({c.name for c in codecs}) != len(codecs):
            raise PlanError(f"{where}.codecs: a codec is named twice")
        enc = obj["assignment"]
        if not isinstance(enc, dict):
            raise PlanError(f"{where}.assignment: must be an object")
        _exact_keys(enc, {"encoding", "data"}, f"{where}.assignment")
        if enc["encoding"] != _ASSIGNMENT_ENCODING:
            raise PlanError(f"{where}.assignment.encoding: expected {_ASSIGNMENT_ENCODING!r}")
        assignment = _unpack_ids(enc["data"], rows, f"{where}.assignment.data")
        if int(assignment.max()) >= len(codecs):
            raise PlanError(f"{where}.assignment.data: a row names codec {int(assignment.max())}, "
                            f"the table has {len(codecs)}")  # fmt: skip
        class_rows = obj["class_rows"]
        counts = [int(n) for n in np.bincount(assignment, minlength=len(codecs))]
        if not isinstance(class_rows, list) or not all(_is_int(n) for n in class_rows):
            raise PlanError(f"{where}.class_rows: must be a list of integers, got {class_rows!r}")
        if class_rows != counts:
            raise PlanError(f"{where}.class_rows: {class_rows!r} does not match the assignment ({counts})")
        predicted = _positive_int(obj["predicted_bytes"], f"{where}.predicted_bytes", zero=True)
        size = MixedTable.predicted_size(rows, dim, counts, codecs)
        if predicted != size:
            raise PlanError(
                f"{where}.predicted_bytes: {predicted} does not match the assignment ({size} bytes)"
            )
        error = _nonnegative_float(obj["predicted_error"], f"{where}.predicted_error")
        reference = _nonnegative_float(obj["reference_error"], f"{where}.reference_error")
        return cls(name, rows, dim, tuple(codecs), assignment, predicted, error, reference)


# ------------------------------------------------------------------------------ the plan
@dataclass(frozen=True, eq=False)
class Plan:
    """A storage choice for every row of some embedding tables; see :func:`plan`.

    ``str(plan)`` is a table; :meth:`save` / :meth:`load` write and read it as JSON (so a
    plan made once can be applied in CI); :meth:`apply` compresses a model with it.
    """

    tables: tuple[TablePlan, ...]
    budget_bytes: int | None
    max_error: float | None
    unseen_weight: float
    with_usage: bool

    @property
    def predicted_bytes(self) -> int:
        """Bytes of all planned tables after :meth:`apply` (exact)."""
        return sum(t.predicted_bytes for t in self.tables)

    @property
    def predicted_error(self) -> float:
        """Expected squared error per lookup, summed over the tables."""
        return sum(t.predicted_error for t in self.tables)

    @property
    def float_nbytes(self) -> int:
        """Bytes of the planned tables as float32."""
        return sum(t.float_nbytes for t in self.tables)

    def __getitem__(self, name: str) -> TablePlan:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def __repr__(self) -> str:
        return (
            f"Plan({len(self.tables)} tables, {self.predicted_bytes} bytes, "
            f"predicted error {self.predicted_error:.4g})"
        )

    def __str__(self) -> str:
        head = ["table", "rows x dim", "choice", "bytes", "ratio", "pred. error", "rel. sq. error"]
        body = [
            [
                printable(t.name),
                f"{t.rows} x {t.dim}",
                t.summary(),
                human_bytes(t.predicted_bytes),
                f"{t.predicted_bytes / t.float_nbytes:.4f}",
                f"{t.predicted_error:.4g}",
                _relative(t.predicted_error, t.reference_error),
            ]
            for t in self.tables
        ]
        reference = sum(t.reference_error for t in self.tables)
        total = [
            "total",
            "",
            "",
            human_bytes(self.predicted_bytes),
            f"{self.predicted_bytes / self.float_nbytes:.4f}" if self.float_nbytes else "-",
            f"{self.predicted_error:.4g}",
            _relative(self.predicted_error, reference),
        ]
        widths = [max(len(r[i]) for r in [head, *body, total]) for i in range(len(head))]
        right = {1, 3, 4, 5, 6}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        if self.budget_bytes is not None:
            goal = f"budget {human_bytes(self.budget_bytes)} ({self.budget_bytes} bytes)"
        else:
            goal = f"max error {self.max_error:.4g}"
        weights = (
            f"usage-weighted rows (unseen share {self.unseen_weight:g})"
            if self.with_usage
            else "rows weighted by squared norm (no usage)"
        )
        title = (
            f"plan: {len(self.tables)} table(s), {human_bytes(self.predicted_bytes)} "
            f"({self.predicted_bytes} bytes) of float32 {human_bytes(self.float_nbytes)}; {goal}; {weights}"
        )
        return "\n".join([title, line(head), rule, *(line(r) for r in body), rule, line(total)])

    # -------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The JSON object :meth:`save` writes."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "budget_bytes": self.budget_bytes,
            "max_error": self.max_error,
            "unseen_weight": self.unseen_weight,
            "with_usage": self.with_usage,
            "predicted_bytes": self.predicted_bytes,
            "tables": [t.to_json() for t in self.tables],
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "plan") -> Plan:
        """A plan from :meth:`to_json`'s object; every field is checked (PlanError names it)."""
        if not isinstance(obj, dict):
            raise PlanError(f"{where}: not a plan (expected a JSON object)")
        if obj.get("format") != FORMAT_NAME:
            raise PlanError(f"{where}: not an embpress plan (no 'format': {FORMAT_NAME!r})")
        version = obj.get("format_version")
        if not _is_int(version) or version != FORMAT_VERSION:
            raise PlanError(
                f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        expected = {
            "format", "format_version", "budget_bytes", "max_error", "unseen_weight",
            "with_usage", "predicted_bytes", "tables",
        }  # fmt: skip
        _exact_keys(obj, expected, where)
        budget = obj["budget_bytes"]
        if budget is not None:
            budget = _positive_int(budget, f"{where}.budget_bytes")
        max_error = obj["max_error"]
        if max_error is not None:
            max_error = _nonnegative_float(max_error, f"{where}.max_error")
        if (budget is None) == (max_error is None):
            raise PlanError(f"{where}: exactly one of budget_bytes and max_error must be set")
        unseen = _nonnegative_float(obj["unseen_weight"], f"{where}.unseen_weight")
        if unseen > 1.0:
            raise PlanError(f"{where}.unseen_weight: must be in [0, 1], got {unseen}")
        with_usage = obj["with_usage"]
        if not isinstance(with_usage, bool):
            raise PlanError(f"{where}.with_usage: must be true or false")
        raw = obj["tables"]
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where}.tables: must be a non-empty list")
        tables = tuple(TablePlan.from_json(t, f"{where}.tables[{i}]") for i, t in enumerate(raw))
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise PlanError(f"{where}.tables: a table is named twice")
        out = cls(tables, budget, max_error, unseen, with_usage)
        total = _positive_int(obj["predicted_bytes"], f"{where}.predicted_bytes", zero=True)
        if total != out.predicted_bytes:
            raise PlanError(
                f"{where}.predicted_bytes: {total} is not the tables' sum ({out.predicted_bytes})"
            )
        if budget is not None and out.predicted_bytes > budget:
            raise PlanError(f"{where}.predicted_bytes: {out.predicted_bytes} is over the budget ({budget})")
        if max_error is not None and out.predicted_error > max_error * (1 + 1e-9):
            raise PlanError(f"{where}: predicted error {out.predicted_error:.6g} is over max_error")
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (atomically: a temporary file, then a rename)."""
        target = Path(path)
        tmp = Path(temp_file_for(target))  # (refuses a directory or a device in its place)
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`; every field is checked (PlanError names it)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file")
        if not p.is_file():
            raise PlanError(f"{p}: not a regular file")
        try:
            obj = strict_json(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise PlanError(f"{p}: not a JSON file") from None
        except ValueError as err:
            if "appears twice" in str(err) or "nested deeper" in str(err):
                raise PlanError(f"{p}: not a plan ({err})") from None
            raise PlanError(f"{p}: not a plan (it holds a number too long to read)") from None
        return cls.from_json(obj, f"{p}: plan")

    # -------------------------------------------------------------- applying
    def apply(self, model: nn.Module, usage: Usage | None = None) -> nn.Module:
        """Compress the planned tables of ``model`` in place; return ``model``.

        Each planned table becomes a ``QuantizedEmbedding(Bag)`` holding a ``mixed`` table
        of exactly ``predicted_bytes``; other modules are left alone. The model must have
        every planned table with its shape (checked before anything is built), and nothing
        changes unless every table is built. ``usage`` weights the rows when the shared
        per-column codebooks are fitted, as at planning: a plan made with usage needs the
        same usage, one made without takes none (PlanError otherwise), and each table must
        hold the values it was planned for (a retrained model of the same shapes is
        refused: both checked against the table's ``reference_error``), so the tables and
        their errors are the planned ones.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if usage is not None and not isinstance(usage, Usage):
            raise TypeError(f"usage must be an embpress.Usage, got {type(usage).__name__}")
        if self.with_usage and usage is None:
            raise PlanError(
                "the plan was made with usage: pass the usage it was made with (its shared "
                "codebooks are fitted with the rows' usage weights)"
            )
        if not self.with_usage and usage is not None:
            raise PlanError(
                "the plan was made without usage: apply it without usage (its shared codebooks "
                "are fitted with the rows' squared-norm weights)"
            )
        targets = {t.name: t for t in find_embeddings(model)}
        for tp in self.tables:
            target = targets.get(tp.name)
            if target is None:
                held = dict(model.named_modules()).get(tp.name)
                if isinstance(held, (QuantizedEmbedding, QuantizedEmbeddingBag)):
                    raise PlanError(
                        f"the plan names table {tp.name!r}, which the model holds compressed already "
                        "(apply a plan to the float model)"
                    )
                have = ", ".join(list(targets)[:5]) or "none"
                raise PlanError(
                    f"the plan names table {tp.name!r}, which the model does not have (it has: {have})"
                )
            shape = tuple(target.module.weight.shape)
            if shape != (tp.rows, tp.dim):
                raise PlanError(
                    f"table {tp.name!r}: the plan is for {tp.rows} x {tp.dim}, the model's table is "
                    f"{shape[0]} x {shape[1]}"
                )
        if usage is not None:
            _check_usage(usage, model, [targets[tp.name] for tp in self.tables])
        replacements: dict[str, nn.Module] = {}
        for tp in self.tables:
            target = targets[tp.name]
            weight = checked_weight(target, QuantConfig(), remedy=PLAN_NONFINITE)
            counts = _counts_of(usage, target)
            # the weights the codebooks were fitted with at planning
            norms = squared_norms(weight)
            weights = row_weights(tp.rows, counts, self.unseen_weight, norms if counts is None else None)
            _check_reference(tp, norms, weights, self.with_usage)
            try:
                table = MixedTable.build(weight, tp.assignment, tp.codecs, weights)
            except ValueError as err:
                raise PlanError(f"table {tp.name!r}: {err}") from err
            if table.nbytes != tp.predicted_bytes:
                raise RuntimeError(
                    f"table {tp.name!r}: built {table.nbytes} bytes, the plan predicted {tp.predicted_bytes}"
                )
            new = quantized_module(target, table)
            new.error = _table_error(weight, table)
            replacements[tp.name] = new
        swap_modules(model, [targets[tp.name] for tp in self.tables], replacements)
        return model


def _weighted_errors(values: np.ndarray, codec: Codec, weights: np.ndarray) -> np.ndarray:
    """Each row's squared error under ``codec`` times its weight (``row_errors`` without its
    checks again); inf where the codec cannot hold the row (float16 parameters)."""
    return _weighted(encode_rows(values, None, codec, None, weights)[0], weights)


def _weighted(err: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``err * weights`` (a new array), inf where ``err`` is (also where the weight is 0)."""
    out = err * weights
    out[~np.isfinite(err)] = np.inf
    return out


def _check_reference(tp: TablePlan, norms: np.ndarray, weights: np.ndarray, with_usage: bool) -> None:
    """Refuse a table (or usage) other than the plan's: the weighted squared norm of the
    table (``norms``: its rows' squared norms, the pruned codec's errors, summed as
    planning sums them), a cheap fingerprint of both, must be the plan's
    ``reference_error``. A plan's rows and codes were chosen for those values: applied to
    others (a retrained model of the same shapes) its predicted error would not hold."""
    got = float(_weighted(norms, weights).sum())
    if math.isclose(got, tp.reference_error, rel_tol=1e-9, abs_tol=0.0):
        return
    if with_usage:
        raise PlanError(
            f"table {tp.name!r}: the usage given is not the one the plan was made with (or the "
            f"table's values differ): its usage-weighted squared norm is {got:.9g}, the plan's "
            f"{tp.reference_error:.9g}; pass the usage the plan was made with"
        )
    raise PlanError(
        f"table {tp.name!r}: its values are not the ones the plan was made for (weighted "
        f"squared norm {got:.9g}, the plan's {tp.reference_error:.9g}): the plan's rows and "
        "codes were chosen for those values; make a plan for this model"
    )


# ------------------------------------------------------------------------------ planning
@dataclass
class _Costs:
    """One table's planning state: weighted error per (row, codec) and the current choice."""

    name: str
    rows: int
    dim: int
    codecs: list[Codec]
    row_bytes: np.ndarray  # int64 [C]
    err: np.ndarray  # float64 [C, rows]: probability-weighted squared error
    allowed: np.ndarray  # bool [C]
    choice: np.ndarray  # int64 [rows]
    reference: float
    rough: bool = False  # size() leaves out shared codebooks (the first, coarse search)

    def counts(self) -> np.ndarray:
        return np.asarray(count_codes(self.choice, len(self.codecs)))

    def size(self, counts: np.ndarray | None = None) -> int:
        counts = self.counts() if counts is None else counts
        used = np.flatnonzero(counts)
        if self.rough:
            return _all_pruned_size(self) + int(counts @ self.row_bytes)
        if used.shape[0] > MAX_CODECS:  # before the codecs are limited: the same sum, estimated
            shared = sum(self.codecs[i].shared_bytes(self.dim) for i in used)
            return _all_pruned_size(self) + int(counts @ self.row_bytes) + shared
        return int(
            MixedTable.predicted_size(
                self.rows, self.dim, [int(counts[i]) for i in used], [self.codecs[i] for i in used]
            )
        )

    def error(self) -> float:
        return float(self.err[self.choice, np.arange(self.rows)].sum())

    def choose(self, lam: float) -> float:
        chosen = np.empty(self.rows, dtype=np.float64)
        allowed = np.flatnonzero(self.allowed)
        order = allowed[np.argsort(self.row_bytes[allowed], kind="stable")]
        penalty = lam * self.row_bytes[order].astype(np.float64)
        if self.rows < _PARALLEL_ROWS:
            choose_rows_serial(self.err, order, penalty, self.choice, chosen)
        else:
            parallel_call(choose_rows, self.err, order, penalty, self.choice, chosen)
        return float(chosen.sum())


def plan(
    model: nn.Module,
    budget_bytes: int | None = None,
    *,
    usage: Usage | None = None,
    select_embeddings: list[nn.Module] | None = None,
    max_error: float | None = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    codecs: Sequence[Codec | str] | None = None,
) -> Plan:
    """The storage plan with the least expected output error within ``budget_bytes``.

    Args:
        model: any nn.Module; its nn.Embedding / nn.EmbeddingBag tables are planned (found
            as :func:`embpress.post_training_sparse_quantize` finds them).
        budget_bytes: bytes all selected tables may take together (their ``nbytes`` after
            :meth:`Plan.apply` is at most this, and exactly the plan's predicted bytes).
        usage: lookups per row (:func:`embpress.record_usage`); it must cover every
            selected table with its row count. Without it a row weighs its squared norm.
        select_embeddings: plan only these modules (the budget covers them alone).
        max_error: instead of a budget, the fewest bytes whose predicted error (summed
            over tables) is at most this.
        unseen_weight: with usage, the share of lookups assumed to fall evenly on all rows.
        codecs: the codecs to choose from (default: every codec of ``quant.codecs``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_plain_embedding(model):
        raise ValueError("model is itself an embedding: wrap it in a module to plan it")
    budget, goal_error = _check_goal(budget_bytes, max_error)
    if isinstance(unseen_weight, bool) or not isinstance(unseen_weight, (int, float)):
        raise TypeError(f"unseen_weight must be a number, got {type(unseen_weight).__name__}")
    if not 0 <= unseen_weight <= 1:  # (False for NaN; a huge int compares without a float)
        raise ValueError(f"unseen_weight must be in [0, 1], got {unseen_weight}")
    if usage is not None and not isinstance(usage, Usage):
        raise TypeError(f"usage must be an embpress.Usage, got {type(usage).__name__}")
    candidates = _candidate_codecs(codecs)
    targets = find_embeddings(model, select_embeddings)
    if select_embeddings is not None:
        targets = _whole_tables(model, targets)
    if not targets:
        if select_embeddings == []:
            raise PlanError("select_embeddings is empty: no table to plan")
        raise PlanError("the model has no nn.Embedding / nn.EmbeddingBag table to plan")
    if usage is not None:
        _check_usage(usage, model, targets)
    costs = [_table_costs(t, candidates, _counts_of(usage, t), float(unseen_weight)) for t in targets]
    if budget is not None:
        smallest = sum(_all_pruned_size(c) for c in costs)
        if budget < smallest:
            raise PlanError(
                f"the budget, {budget} bytes ({human_bytes(budget)}), is below the smallest possible "
                f"size of these tables, {smallest} bytes ({human_bytes(smallest)}: every row pruned)"
            )
        _plan_budget(costs, budget)
    else:
        assert goal_error is not None
        _plan_error(costs, goal_error)
        reached = sum(c.error() for c in costs)
        if reached > goal_error * (1 + 1e-9):  # never seen: the kept codecs could not reach it
            raise PlanError(f"no plan found within max_error {goal_error:.6g} (best {reached:.6g})")
    return Plan(
        tables=tuple(_finish(c) for c in costs),
        budget_bytes=budget,
        max_error=goal_error,
        unseen_weight=float(unseen_weight),
        with_usage=usage is not None,
    )


def _check_goal(budget_bytes: Any, max_error: Any) -> tuple[int | None, float | None]:
    if (budget_bytes is None) == (max_error is None):
        raise ValueError("give exactly one of budget_bytes and max_error")
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise TypeError(f"budget_bytes must be an int, got {type(budget_bytes).__name__}")
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        if budget_bytes > _MAX_INT:
            raise ValueError(f"budget_bytes must be at most 2**63 - 1, got {budget_bytes}")
        return int(budget_bytes), None
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float, np.floating)):
        raise TypeError(f"max_error must be a number, got {type(max_error).__name__}")
    if not 0 <= max_error <= sys.float_info.max:  # (False for NaN and inf; a huge int too)
        raise ValueError(f"max_error must be a finite number >= 0, got {max_error}")
    return None, float(max_error)


def _candidate_codecs(codecs: Sequence[Codec | str] | None) -> list[Codec]:
    if codecs is None:
        out = list(CODECS)
    else:
        if isinstance(codecs, str) or not isinstance(codecs, Sequence) or not codecs:
            raise TypeError("codecs must be a non-empty list of codecs or codec names")
        out = []
        for c in codecs:
            if isinstance(c, str):
                c = Codec.parse(c)
            elif not isinstance(c, Codec):
                raise TypeError(f"codecs must hold Codec objects or names, got {type(c).__name__}")
            out.append(c)
    unique = list({c.name: c for c in out}.values())
    if not any(c.kind == "pruned" for c in unique):
        unique.append(Codec.parse("pruned"))  # a table can always be made smaller by pruning
    return unique


def _counts_of(usage: Usage | None, target: Target) -> torch.Tensor | None:
    """The lookups per row of a table: the sum of the counts under its paths (a module
    shared at several places, modules sharing one weight)."""
    if usage is None:
        return None
    return functools.reduce(torch.add, (usage.counts[n] for n in target.names if n in usage.counts))


def _whole_tables(model: nn.Module, selected: list[Target]) -> list[Target]:
    """The selected tables as ``apply`` finds them: a module whose weight other modules
    share (tied encoder and decoder token tables) is one table with them, named by the
    first and counted over all, so the plan applies to the model it was made from."""
    with warnings.catch_warnings():  # what the whole model's search warns of is not selected
        warnings.simplefilter("ignore")
        groups = {name: t for t in find_embeddings(model) for name in t.names}
    whole = {id(groups[t.name]): groups[t.name] for t in selected if t.name in groups}
    return list(whole.values())


def _check_usage(usage: Usage, model: nn.Module, targets: Sequence[Target]) -> None:
    """Usage must name only the model's tables, with their row counts, and count every
    target under one of its paths at least."""
    usage.check(model, [])
    for t in targets:
        if not any(n in usage.counts for n in t.names):
            raise UsageError(f"usage has no counts for table {t.name!r}")
    for name in (n for t in targets for n in t.names if n in usage.counts):
        counts = usage.counts[name]
        if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
            raise PlanError(f"usage for table {name!r}: counts must be a 1-D tensor")
        if not bool(torch.isfinite(counts).all()):
            raise PlanError(f"usage for table {name!r}: counts hold NaN or Inf")
        if bool((counts < 0).any()):
            raise PlanError(f"usage for table {name!r}: counts are negative")


def _table_costs(target: Target, codecs: list[Codec], counts: torch.Tensor | None, unseen: float) -> _Costs:
    weight = checked_weight(target, QuantConfig(), remedy=PLAN_NONFINITE)  # float32, CPU, contiguous, finite
    rows, dim = weight.shape
    # each row's squared norm: the pruned codec's errors, and the data-free row weights
    norms = squared_norms(weight)
    w = row_weights(rows, counts, unseen, norms if counts is None else None)
    values = weight.numpy()
    err = np.empty((len(codecs), rows), dtype=np.float64)
    for i, codec in enumerate(codecs):
        err[i] = _weighted(norms, w) if codec.kind == "pruned" else _weighted_errors(values, codec, w)
    pruned = next(i for i, c in enumerate(codecs) if c.kind == "pruned")
    return _Costs(
        name=target.name,
        rows=rows,
        dim=dim,
        codecs=codecs,
        row_bytes=np.array([c.row_bytes(dim) for c in codecs], dtype=np.int64),
        err=err,
        allowed=np.ones(len(codecs), dtype=np.bool_),
        choice=np.full(rows, pruned, dtype=np.int64),
        reference=float(err[pruned].sum()),
    )


def _pruned_index(c: _Costs) -> int:
    return next(i for i, k in enumerate(c.codecs) if k.kind == "pruned")


def _all_pruned_size(c: _Costs) -> int:
    return int(MixedTable.predicted_size(c.rows, c.dim, [c.rows], [c.codecs[_pruned_index(c)]]))


def _evaluate(costs: list[_Costs], lam: float) -> tuple[int, float]:
    """(total bytes, total error) with every row at its best codec for ``lam``."""
    error = sum(c.choose(lam) for c in costs)
    return sum(c.size() for c in costs), error


def _lam_max(costs: list[_Costs]) -> float:
    """A multiplier at which every row is pruned (pruning saves >= 1 byte for <= its error)."""
    return max(float(c.err[_pruned_index(c)].max(initial=0.0)) for c in costs) * 2.0 + 1e-300


def _lam_floor(costs: list[_Costs], lo: float) -> float:
    """A multiplier below ``lo`` at which every row's choice is within the smallest positive
    error of the problem of its best allowed codec (``err + lam * bytes`` is minimised, so
    a row gives up at most ``lam * max bytes``); ``lo`` when there is none below it. The
    fixed range below the pruning multiplier misses tables whose errors are 1e12 smaller."""
    smallest = min(smallest_positive(c.err, c.allowed) for c in costs)
    widest = max(int(c.row_bytes.max(initial=0)) for c in costs)
    if not math.isfinite(smallest) or widest <= 0:
        return lo
    return min(lo, max(smallest / widest / 2, sys.float_info.min))


def _geomean(lo: float, hi: float) -> float:
    product = lo * hi
    if product >= sys.float_info.min:
        return math.sqrt(product)
    return math.sqrt(lo) * math.sqrt(hi)  # the product would underflow


def _bisect(costs: list[_Costs], fits: Any, ratio: float = _BISECT_RATIO, around: float = 0.0) -> float:
    """The smallest multiplier whose choice ``fits(bytes, error)`` (assumed monotone in it:
    more bytes, less error as the multiplier falls), to within ``ratio``; rows are left at
    that choice. ``around``: a guess, searched near first. The search starts between the
    pruning multiplier and ``_BISECT_RANGE`` times it, and goes below only if that fits."""
    if fits(*_evaluate(costs, 0.0)):
        return 0.0
    top = _lam_max(costs)
    lo, hi = top * _BISECT_RANGE, top
    lo_fails = False
    if around > 0:
        base = lo if around >= lo else _lam_floor(costs, lo)
        near_lo, near_hi = max(around / 4, base), min(around * 4, hi)
        if fits(*_evaluate(costs, near_hi)):
            hi = near_hi
            if fits(*_evaluate(costs, near_lo)):
                hi = near_lo
            else:
                lo, lo_fails = near_lo, True
    if not lo_fails:
        if lo >= hi:
            lo = _lam_floor(costs, hi)
        if fits(*_evaluate(costs, lo)):
            floor = _lam_floor(costs, lo)
            if floor >= lo:
                return lo
            lo, hi = floor, lo
            if fits(*_evaluate(costs, lo)):
                return lo
    for _ in range(_BISECT_STEPS):
        if hi <= lo * ratio:
            break
        mid = _geomean(lo, hi)
        if fits(*_evaluate(costs, mid)):
            hi = mid
        else:
            lo = mid
    _evaluate(costs, hi)
    return hi


def _bisect_largest(costs: list[_Costs], max_error: float) -> float:
    """The largest multiplier whose choice has error <= ``max_error`` (fewest bytes), or 0.0;
    rows are left at that choice."""
    hi = _lam_max(costs)
    if _evaluate(costs, hi)[1] <= max_error:
        return hi
    lo = hi * _BISECT_RANGE
    if _evaluate(costs, lo)[1] > max_error:
        floor = _lam_floor(costs, lo)
        if floor >= lo or _evaluate(costs, floor)[1] > max_error:
            _evaluate(costs, 0.0)
            return 0.0
        lo, hi = floor, lo
    for _ in range(_BISECT_STEPS):
        if hi <= lo * _BISECT_RATIO:
            break
        mid = _geomean(lo, hi)
        if _evaluate(costs, mid)[1] <= max_error:
            lo = mid
        else:
            hi = mid
    _evaluate(costs, lo)
    return lo


def _limit_codecs(costs: list[_Costs], lam: float) -> None:
    """At ``lam``, narrow each table's codecs to at most MAX_CODECS (pruning always among
    them): drop, one at a time, the codec whose rows lose least by moving to their next
    choice, net of its shared bytes (unused codecs first, those furthest from use first),
    until MAX_CODECS are left and every shared codebook pays for itself."""
    for c in costs:
        pruned = _pruned_index(c)
        shared = np.array([k.shared_bytes(c.dim) for k in c.codecs], dtype=np.float64)
        c.choose(lam)
        while True:
            counts = c.counts()
            delta = np.empty(c.rows, dtype=np.float64)
            kernel = drop_cost_serial if c.rows < _PARALLEL_ROWS else drop_cost
            parallel_call(kernel, c.err, c.row_bytes, c.allowed, lam, c.choice, delta)
            moved = np.bincount(c.choice, weights=np.minimum(delta, 1e300), minlength=len(c.codecs))
            loss = moved.astype(np.float64) - lam * shared
            sample = slice(None, None, max(1, c.rows // 65536))  # rows enough to rank unused codecs
            best = c.err[c.choice[sample], np.arange(c.rows)[sample]] + lam * c.row_bytes[c.choice[sample]]
            regret = np.zeros(len(c.codecs))
            for i in np.flatnonzero(c.allowed & (counts == 0)):
                gap = c.err[i, sample] + lam * c.row_bytes[i] - best
                regret[i] = -float(np.mean(np.minimum(gap, 1e300)))
            loss[~c.allowed] = np.inf
            loss[pruned] = np.inf
            order = np.lexsort((regret, loss))  # by loss, then unused ones furthest from use
            worst = int(order[0])
            if c.allowed.sum() <= MAX_CODECS and loss[worst] >= 0:
                break
            if not np.isfinite(loss[worst]):
                break
            c.allowed[worst] = False
            c.choose(lam)


def _ensure_pruned(costs: list[_Costs]) -> None:
    """Give every table pruning as a way down, swapping out its least used codec if it has
    MAX_CODECS already (so the smallest size stays reachable)."""
    for c in costs:
        p = _pruned_index(c)
        if c.allowed[p]:
            continue
        if c.allowed.sum() >= MAX_CODECS:
            counts = np.where(c.allowed, c.counts(), np.iinfo(np.int64).max)
            c.allowed[int(np.argmin(counts))] = False
        c.allowed[p] = True


def _moves(costs: list[_Costs], upward: bool) -> list[tuple[_Costs, np.ndarray, np.ndarray, np.ndarray]]:
    """Per table: rows with a move, their target codec, ratio and byte change (within the
    table's allowed codecs, at most MAX_CODECS: any it uses, and those it does not use whose
    class shares no bytes, so its fixed bytes do not grow; a table all in one codec can
    still move)."""
    out = []
    for c in costs:
        shares = np.array([k.shared_bytes(c.dim) > 0 for k in c.codecs], dtype=np.bool_)
        usable = c.allowed & ((c.counts() > 0) | ~shares)
        target = np.empty(c.rows, dtype=np.int8)
        ratio = np.empty(c.rows, dtype=np.float64)
        parallel_call(best_moves, c.err, c.row_bytes, usable, c.choice, upward, target, ratio)
        rows = np.flatnonzero(target >= 0)
        out.append((c, rows, target[rows], ratio[rows]))
    return out


def _apply_moves(moves: list[tuple[_Costs, np.ndarray, np.ndarray, np.ndarray]], taken: np.ndarray) -> None:
    start = 0
    for c, rows, target, _ in moves:
        part = taken[start : start + rows.shape[0]]
        c.choice[rows[part]] = target[part]
        start += rows.shape[0]


def _fill(costs: list[_Costs], budget: int) -> None:
    """Spend the bytes left under ``budget`` on the upgrades with the largest error drop per byte."""
    for _ in range(_FILL_PASSES):
        left = budget - sum(c.size() for c in costs)
        if left <= 0:
            break
        moves = _moves(costs, upward=True)
        if not sum(m[1].shape[0] for m in moves):
            break
        ratio = np.concatenate([m[3] for m in moves])
        cost = np.concatenate([(m[0].row_bytes[m[2]] - m[0].row_bytes[m[0].choice[m[1]]]) for m in moves])
        taken = take_greedy(_best_first(-ratio, cost, left), cost.astype(np.float64), float(left))
        if not taken.any():
            break
        _apply_moves(moves, taken)
    _repair(costs, budget)


def _best_first(key: np.ndarray, cost: np.ndarray, allowance: float) -> np.ndarray:
    """Indices of the moves by ascending ``key``: only as many as ``allowance`` could pay
    for, each costing at least the cheapest move, and a margin (skipped moves are replaced
    by later ones in the next pass)."""
    positive = cost[cost > 0]
    cheapest = float(positive.min()) if positive.shape[0] else 1.0
    k = int(min(key.shape[0], 4 * (allowance // cheapest + 1) + 1024))
    if k >= key.shape[0]:
        return np.argsort(key, kind="stable")
    top = np.argpartition(key, k - 1)[:k]
    return top[np.argsort(key[top], kind="stable")]


def _repair(costs: list[_Costs], budget: int) -> None:
    """Move rows down (least error per byte saved first) until the exact bytes fit the budget.
    Normally a no-op: the fixed bytes of a table are linear in its class sizes."""
    for _ in range(64):
        over = sum(c.size() for c in costs) - budget
        if over <= 0:
            return
        moves = _moves(costs, upward=False)
        ratio = np.concatenate([m[3] for m in moves])
        if not ratio.shape[0]:
            break
        saved = np.concatenate([(m[0].row_bytes[m[0].choice[m[1]]] - m[0].row_bytes[m[2]]) for m in moves])
        order = np.argsort(ratio, kind="stable")
        need = np.searchsorted(np.cumsum(saved[order]), over) + 1
        taken = np.zeros(ratio.shape[0], dtype=np.bool_)
        taken[order[:need]] = True
        _apply_moves(moves, taken)
    for c in costs:  # last resort, never expected: prune whole tables
        if sum(k.size() for k in costs) <= budget:
            return
        c.allowed[:] = False
        c.allowed[_pruned_index(c)] = True
        c.choose(0.0)


def _plan_budget(costs: list[_Costs], budget: int) -> None:
    def fits(nbytes: int, error: float) -> bool:
        return nbytes <= budget

    # first the multiplier for the per-row bytes alone: shared codebooks counted as soon as
    # one row used them would make the size jump and the search settle on pruning
    for c in costs:
        c.rough = True
    lam = _bisect(costs, fits, ratio=1.5)
    for c in costs:
        c.rough = False
    _limit_codecs(costs, lam)
    _ensure_pruned(costs)
    _bisect(costs, fits, around=lam)
    _fill(costs, budget)
    if sum(c.rows for c in costs) <= _RESTART_ROWS:
        _restarts(costs, budget, lam)
    _not_worse_than_uniform(costs, budget)


def _restarts(costs: list[_Costs], budget: int, lam: float) -> None:
    """Search again with the codecs chosen as for smaller budgets (larger multipliers), then
    with the best plan's codec sets one codec swapped (``_swap_search``), and keep the best
    plan. Which codecs a table keeps decides what its shared codebooks cost; where those
    weigh much against its rows (small tables), the codecs kept at the budget's own
    multiplier can be worse than those of a budget a little below it."""
    error, best = sum(c.error() for c in costs), _snapshot(costs)
    tried = {_codec_sets(costs)}
    for factor in _RESTART_FACTORS:
        for c in costs:
            c.allowed[:] = True
        _limit_codecs(costs, lam * factor)
        _ensure_pruned(costs)
        got = _search_once(costs, budget, lam, tried)
        if got < error:
            error, best = got, _snapshot(costs)
    _restore(costs, best)
    _swap_search(costs, budget, lam, error, tried)


def _swap_search(costs: list[_Costs], budget: int, lam: float, error: float, tried: set[Any]) -> None:
    """From the plan in ``costs`` (of ``error``), try each table's codec set with one codec
    (not pruning) swapped for one it does not keep, the others as they are; take the first
    better plan and go on from it, until no swap improves. The restarts' codec sets come
    from a few multipliers: between them a set one codec away can be better (a budget 2%
    larger gave 16% more error on two small tables without it)."""
    improved = True
    while improved:
        improved = False
        start = _snapshot(costs)
        swaps = [
            (c, out, into)
            for c in costs
            for out in np.flatnonzero(c.allowed)
            if out != _pruned_index(c)
            for into in np.flatnonzero(~c.allowed)
        ]
        for c, out, into in swaps:
            c.allowed[out], c.allowed[into] = False, True
            got = _search_once(costs, budget, lam, tried)
            if got < error * (1 - 1e-12):
                error, improved = got, True
                break
            _restore(costs, start)


def _codec_sets(costs: list[_Costs]) -> tuple[bytes, ...]:
    return tuple(c.allowed.tobytes() for c in costs)


def _search_once(costs: list[_Costs], budget: int, lam: float, tried: set[Any]) -> float:
    """The error of the plan searched with the tables' codec sets as they are (bisection
    near ``lam``, then the greedy fill); inf for sets in ``tried`` (the same codecs search
    the same way: not searched again) and for a plan over ``budget``."""
    sets = _codec_sets(costs)
    if sets in tried:
        return math.inf
    tried.add(sets)
    _bisect(costs, lambda nbytes, error: nbytes <= budget, around=lam)
    _fill(costs, budget)
    if sum(c.size() for c in costs) > budget:
        return math.inf
    return sum(c.error() for c in costs)


def _snapshot(costs: list[_Costs]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(c.choice.copy(), c.allowed.copy()) for c in costs]


def _restore(costs: list[_Costs], snapshot: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for c, (choice, allowed) in zip(costs, snapshot, strict=True):
        c.choice[:], c.allowed[:] = choice, allowed


def _not_worse_than_uniform(costs: list[_Costs], budget: int) -> None:
    """Keep the plan no worse than the best uniform setting that fits: every row of every
    table in one codec. The search misses it where a table's fixed bytes weigh much (a few
    rows: each class it mixes in costs its own directory and header); then that setting,
    upgraded by the greedy fill where bytes are left, is the plan."""
    planned = sum(c.error() for c in costs)
    best: tuple[float, str] | None = None
    for codec in costs[0].codecs:
        if codec.kind == "pruned" or not all(codec in c.codecs for c in costs):
            continue
        error = sum(float(c.err[c.codecs.index(codec)].sum()) for c in costs)
        if error >= planned or (best is not None and error >= best[0]):
            continue
        size = sum(int(MixedTable.predicted_size(c.rows, c.dim, [c.rows], [codec])) for c in costs)
        if size <= budget:
            best = (error, codec.name)
    if best is None:
        return
    saved = _snapshot(costs)
    for c in costs:
        k = next(i for i, codec in enumerate(c.codecs) if codec.name == best[1])
        c.choice[:] = k
        if not c.allowed[k]:  # the codec in place of the least used one (pruning stays)
            _swap_in(c, k)
    start = [c.choice.copy() for c in costs]
    _fill(costs, budget)
    filled = sum(c.error() for c in costs)
    if filled > best[0] or sum(c.size() for c in costs) > budget:  # the fill's repair lost
        for c, choice in zip(costs, start, strict=True):
            c.choice[:] = choice
    if sum(c.error() for c in costs) >= planned:
        _restore(costs, saved)


def _swap_in(c: _Costs, k: int) -> None:
    """Allow codec ``k`` in table ``c``, dropping its least used allowed codec other than
    pruning when it already has MAX_CODECS."""
    if c.allowed.sum() >= MAX_CODECS:
        counts = np.where(c.allowed, c.counts(), np.iinfo(np.int64).max)
        counts[_pruned_index(c)] = np.iinfo(np.int64).max
        c.allowed[int(np.argmin(counts))] = False
    c.allowed[k] = True


def _plan_error(costs: list[_Costs], max_error: float) -> None:
    best = _evaluate(costs, 0.0)[1]
    if best > max_error:
        raise PlanError(
            f"max_error {max_error:.6g} is below the smallest predicted error these codecs reach ({best:.6g})"
        )

    _limit_codecs(costs, _bisect_largest(costs, max_error))
    if _evaluate(costs, 0.0)[1] > max_error:  # the kept codecs cannot reach it: keep the best ones
        for c in costs:
            c.allowed[:] = True
        _limit_codecs(costs, 0.0)
    _ensure_pruned(costs)
    _bisect_largest(costs, max_error)
    # then give up bytes while the error allows (least error added per byte saved first)
    for _ in range(_FILL_PASSES):
        left = max_error - sum(c.error() for c in costs)
        moves = _moves(costs, upward=False)
        if left <= 0 or not sum(m[1].shape[0] for m in moves):
            break
        ratio = np.concatenate([m[3] for m in moves])
        added = np.concatenate([m[0].err[m[2], m[1]] - m[0].err[m[0].choice[m[1]], m[1]] for m in moves])
        taken = take_greedy(np.argsort(ratio, kind="stable"), np.maximum(added, 0.0), left * (1 - 1e-9))
        if not taken.any():
            break
        _apply_moves(moves, taken)


def _finish(c: _Costs) -> TablePlan:
    """The table's plan: only the codecs it uses, cheapest first."""
    counts = c.counts()
    used = sorted(np.flatnonzero(counts).tolist(), key=lambda i: (int(c.row_bytes[i]), c.codecs[i].name))
    remap = np.zeros(len(c.codecs), dtype=np.uint8)
    for new, old in enumerate(used):
        remap[old] = new
    assignment = remap[c.choice.astype(np.int64)]
    codecs = tuple(c.codecs[i] for i in used)
    return TablePlan(
        name=c.name,
        rows=c.rows,
        dim=c.dim,
        codecs=codecs,
        assignment=assignment,
        predicted_bytes=c.size(counts),
        predicted_error=c.error(),
        reference_error=c.reference,
    )


# ------------------------------------------------------------------------------ applying helpers
def _table_error(weight: torch.Tensor, table: Any) -> dict[str, float]:
    """``rel_frobenius`` and ``max_abs`` of the stored table against ``weight`` (as the
    other layouts report them)."""
    decoded = table.dequantize().cpu().contiguous()
    rows = weight.shape[0]
    err_sq, ref_sq, max_abs = np.empty(rows), np.empty(rows), np.empty(rows)
    parallel_call(table_error, weight.numpy(), decoded.numpy(), err_sq, ref_sq, max_abs)
    total_err, total_ref = float(err_sq.sum()), float(ref_sq.sum())
    return {
        "rel_frobenius": math.sqrt(total_err / total_ref) if total_ref > 0 else math.sqrt(total_err),
        "max_abs": float(max_abs.max()) if rows else 0.0,
    }


# ------------------------------------------------------------------------------ JSON helpers
def _pack_ids(ids: np.ndarray) -> str:
    padded = np.zeros(-(-ids.shape[0] // 4) * 4, dtype=np.uint8)
    padded[: ids.shape[0]] = ids
    q = padded.reshape(-1, 4)
    packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return base64.b64encode(packed.astype(np.uint8).tobytes()).decode("ascii")


def _unpack_ids(data: Any, rows: int, where: str) -> np.ndarray:
    if not isinstance(data, str):
        raise PlanError(f"{where}: must be a base64 string")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PlanError(f"{where}: not valid base64") from None
    if len(raw) != -(-rows // 4):
        raise PlanError(f"{where}: holds {len(raw)} bytes, {rows} rows need {-(-rows // 4)}")
    packed = np.frombuffer(raw, dtype=np.uint8)
    ids = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)
    if ids[rows:].any():
        raise PlanError(f"{where}: the padding after the last row is not zero")
    return np.ascontiguousarray(ids[:rows])


def _exact_keys(obj: dict[str, Any], expected: set[str], where: str) -> None:
    missing = sorted(expected - set(obj))
    if missing:
        raise PlanError(f"{where}: missing field {missing[0]!r}")
    extra = sorted(set(obj) - expected)
    if extra:
        raise PlanError(f"{where}: unknown field {extra[0]!r}")


_MAX_INT = 2**63 - 1  # every count and size of a plan is an int64 (bytes, rows, positions)


def _is_int(value: Any) -> bool:
    """A JSON integer: an int, not a bool, not a float of an integral value."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any, where: str, zero: bool = False) -> int:
    if not _is_int(value):
        raise PlanError(f"{where}: must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        raise PlanError(f"{where}: must be {'>= 0' if zero else 'positive'}, got {value}")
    if value > _MAX_INT:
        raise PlanError(f"{where}: must be at most 2**63 - 1, got a {len(str(value))}-digit number")
    return value


def _nonnegative_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{where}: must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"{where}: must be a finite number >= 0, got {value}")
    return float(value)


def _percent(share: float) -> str:
    if share <= 0:
        return "0%"
    if share < 0.01:
        return "<1%"
    return f"{round(100 * share)}%"


def _relative(error: float, reference: float) -> str:
    return f"{error / reference:.4f}" if reference > 0 else "-"
