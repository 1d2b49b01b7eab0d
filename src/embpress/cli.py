"""The ``embpress`` command: compress a checkpoint's embedding tables, inspect files, run the demo.

A thin layer over the library: it parses arguments, calls :mod:`embpress.checkpoint`
(``load_checkpoint``, ``find_tables``, ``compress_state_dict``, ``inspect``,
``inspect_checkpoint``) and renders what they return (:class:`embpress.TableReport` and
the file reports) as rich tables or JSON. The command and the Python API share one code
path, and ``embpress.load(model, OUT)`` loads the result into the model IN came from.

User errors end in one ``error: ...`` line on stderr naming the file or option and a
non-zero exit status (2: bad usage, 1: anything else, 130: interrupted), never a
traceback; an internal error says so in one line (``EMBPRESS_DEBUG=1`` shows its
traceback). The library's exceptions carry the messages; this module puts them on one
line. Needs the ``cli`` extra (click, rich; matplotlib for the demo's plot).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import signal
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text
from safetensors import SafetensorError

from . import checkpoint
from .layouts import layout_choices
from .planner import DEFAULT_UNSEEN_WEIGHT, Plan
from .quant.codecs import CODECS, Codec
from .quant.config import QuantConfig
from .report import CheckpointReport, FileReport, TableReport, TensorInfo, human_bytes, printable
from .sparsify.data_norm import MAX_BLOCK_SIDE
from .usage import Usage, UsageError

__all__ = ["cli", "main"]

# Total table elements above which compress shows a progress bar (on stderr).
PROGRESS_MIN_ELEMENTS = 1_000_000


# ------------------------------------------------------------------------------ errors
class CliError(click.ClickException):
    """A user-facing failure: printed as one ``error: ...`` line, exit status 1."""

    exit_code = 1


class Interrupted(click.ClickException):
    """Ctrl-C: nothing half-written is left behind; exit status 130."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted; nothing was written")


_MAX_MESSAGE = 400
_DEBUG_ENV = "EMBPRESS_DEBUG"
_INTERNAL = f"internal error in embpress; rerun with {_DEBUG_ENV}=1 for the traceback, and please report it"


def _one_line(err: BaseException | str) -> str:
    """``err``'s message on one short line: escapes and control characters removed."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(err))
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text or "unknown error"


def _named(text: str, subject: object) -> str:
    """``text`` on one line, prefixed with ``subject`` (a path) unless it already names it."""
    line = _one_line(text)
    if subject is None or (line != "unknown error" and str(subject) in text):
        return line
    return _one_line(f"{subject}: {line}")


def _debug() -> bool:
    return os.environ.get(_DEBUG_ENV, "").strip() not in ("", "0")


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("unable to mmap", "Cannot allocate memory", "can't allocate memory")
    )


def _describe(err: Exception, subject: object) -> str:
    """The one-line message of an error that escaped a command working on ``subject``."""
    if _out_of_memory(err):
        return _named("not enough memory (the input is too large for this machine)", subject)
    if isinstance(err, RecursionError):
        return _named("nested too deeply to process", subject)
    if isinstance(err, OSError):
        if err.strerror:
            where = err.filename if err.filename is not None else subject
            return _named(err.strerror[:1].lower() + err.strerror[1:], where)
        return _named(str(err), subject)
    if isinstance(err, (ValueError, TypeError, RuntimeError, SafetensorError)):
        # FormatError is a ValueError: the library's own one-line messages
        return _named(_in_cli_terms(err), subject)
    return _named(_INTERNAL, subject)


F = TypeVar("F", bound=Callable[..., Any])


def _boundary(fn: F) -> F:
    """Turn the library's and the OS's errors (and Ctrl-C) into one-line CLI errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        subject = next((kwargs[k] for k in ("src", "file", "out_dir") if kwargs.get(k) is not None), None)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except (click.ClickException, click.Abort, click.exceptions.Exit):  # click's own
            raise
        except Exception as err:
            if _debug():
                raise
            raise CliError(_describe(err, subject)) from None

    return cast(F, wrapper)


class _Group(click.Group):
    """A click group whose errors are one ``error:`` line on stderr, never a traceback."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        shown = warnings.showwarning
        warnings.showwarning = _show_warning  # the library's warnings as one line each
        _SHOWN.clear()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
            click.echo(f"error: {_one_line(Exception(err.format_message()))}{hint}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {_one_line(Exception(err.format_message()))}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:  # Ctrl-C outside a command body (click turns it into Abort)
            click.echo(f"error: {Interrupted().message}", err=True)
            sys.exit(Interrupted.exit_code)
        except Exception as err:  # a bug outside a command body (commands use _boundary)
            if _debug():
                raise
            click.echo(f"error: {_describe(err, None)}", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = shown
        sys.exit(rv if isinstance(rv, int) else 0)


_SHOWN: set[str] = set()  # the warning lines this command has printed


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """A library warning as one 'warning:' line, once per command (a step that runs twice,
    such as finding the tables, warns once)."""
    line = f"warning: {_one_line(Exception(str(message)))}"
    if line not in _SHOWN:
        _SHOWN.add(line)
        click.echo(line, err=True)


# ------------------------------------------------------------------------------ output helpers
def _stdout() -> Console:
    """Rich console on stdout; wide when not a terminal so tables are never squeezed."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, allow_nan=False, default=str))


def _footed_table(columns: list[tuple[str, str, str]]) -> Table:
    """A rich table with (header, footer, justify) columns."""
    table = Table(show_footer=True)
    for head, foot, justify in columns:
        table.add_column(head, footer=foot, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


@contextmanager
def _progress(total_elements: int) -> Iterator[Callable[[str, int, bool], None]]:
    """A per-table progress display on stderr when the work is large; it starts with the
    first table, so an input refused before any table starts prints nothing."""
    if total_elements < PROGRESS_MIN_ELEMENTS:
        yield lambda name, elements, done: None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    tasks: dict[str, Any] = {}

    def update(name: str, elements: int, done: bool) -> None:
        if not done:
            if not tasks:
                progress.start()
            tasks[name] = progress.add_task(f"compressing {name}", total=elements)
        else:
            progress.update(tasks[name], completed=elements)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()


# ------------------------------------------------------------------------------ parameter types


class _BlockShape(click.ParamType):
    """HxW, each side an ASCII integer from 1 to MAX_BLOCK_SIDE."""

    name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*([0-9]{1,30})\s*[xX*,]\s*([0-9]{1,30})\s*", str(value))
        sides = (int(match[1]), int(match[2])) if match else (0, 0)
        if not all(1 <= side <= MAX_BLOCK_SIDE for side in sides):
            shown = value if len(str(value)) <= 40 else f"{str(value)[:37]}..."
            self.fail(
                f"{shown!r} is not a block shape: expected HxW with integers from 1 to {MAX_BLOCK_SIDE}, "
                "e.g. 1x4",
                param,
                ctx,
            )
        return sides


class _Fraction(click.ParamType):
    name = "FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(f"{value!r} is not a number", param, ctx)
        shown = value if len(str(value)) <= 40 else f"{str(value)[:37]}..."
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{shown!r} is not a number", param, ctx)
        if not math.isfinite(number) or not 0.0 <= number <= 1.0:
            self.fail(f"{shown!r} is not in [0, 1]", param, ctx)
        return number + 0.0  # -0.0 -> 0.0


class _Budget(click.ParamType):
    """Bytes with a unit (20MB, 64KiB) or a share of the float32 table bytes (1/16)."""

    name = "BUDGET"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return checkpoint.parse_budget(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _Codecs(click.ParamType):
    """Codec names, comma-separated (rowwise8,rowwise4,colbook2...), each one the planner knows."""

    name = "NAMES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            self.fail("give one codec name or more, comma-separated", param, ctx)
        for name in names:
            try:
                Codec.parse(name)
            except ValueError as err:
                self.fail(str(err), param, ctx)
        return tuple(names)


class _Bytes(click.ParamType):
    """A number of bytes with an optional unit (512MiB, 2GB, 600000000), at least ``minimum``."""

    name = "SIZE"

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return checkpoint.parse_bytes(str(value), "size", minimum=self.minimum)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class _NonNegative(click.ParamType):
    name = "FLOAT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        shown = value if len(str(value)) <= 40 else f"{str(value)[:37]}..."
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{shown!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{shown!r} is not a finite number >= 0", param, ctx)
        return number + 0.0


_EXAMPLES = """\b
Examples:
  embpress compress model.pt model.embp.safetensors            # 4-bit, no pruning
  embpress plan model.pt --budget 1/16 --usage usage.safetensors
  embpress compress model.pt model.embp.safetensors --budget 20MB
  embpress inspect model.embp.safetensors
  embpress demo --out out/demo

\b
In Python, load the result into the model it came from:
  model = embpress.load(MyModel(), "model.embp.safetensors")
"""


@click.group(cls=_Group, epilog=_EXAMPLES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embpress", prog_name="embpress")
def cli() -> None:
    """Prune and low-bit quantize the embedding tables of trained PyTorch models.

    By default every row is kept in 4-bit row-wise quantization. With a byte budget,
    'plan' and 'compress --budget' choose each row's storage (8 to 1 bits, shared
    codebooks, or pruned) for the least expected error, weighted by recorded usage if
    given. Uniform pruning (--sparsity) is there too. Files are safetensors with an
    embpress header; nothing is ever unpickled.
    """


# ------------------------------------------------------------------------------ compress
_COMPRESS_EPILOG = """\b
Examples:
  embpress compress dlrm.pt dlrm.embp.safetensors          # 4-bit, no pruning
  embpress compress dlrm.pt out.safetensors --budget 1/16 --usage usage.safetensors
  embpress compress dlrm.pt out.safetensors --plan plan.json
  embpress compress model.pt out.safetensors --sparsity 0.9 --bits 4 --block 1x8
  embpress compress model.pt out.safetensors --tables 'sparse_arch.*'
  embpress compress model.safetensors out.safetensors --order quantize-first --json

\b
Tables: '<module>.weight' 2-D float tensors whose module name looks like an
embedding (emb1, embedding, word_embeddings, embed_tokens, wte, embedding_bags.3,
anything with 'emb'), or exactly those --tables selects; a sparse (COO/CSR)
table is made dense first. Everything else is copied unchanged (a sparse or
quantized tensor that is not a table is refused). Load OUT with
embpress.load(model, OUT): each table becomes a QuantizedEmbedding or
QuantizedEmbeddingBag after the module the model has there.
"""


def _usage_options(fn: F) -> F:
    """The planner's --usage, --unseen-weight and --codecs (plan, compress)."""
    fn = click.option(
        "--codecs",
        type=_Codecs(),
        default=None,
        help="The codecs the planner chooses from, comma-separated [default: all of "
        f"{', '.join(c.name for c in CODECS)}]; pruning a row is always among them; e.g. "
        "leave out colbook4 for faster lookups.",
    )(fn)
    fn = click.option(
        "--unseen-weight",
        type=_Fraction(),
        default=DEFAULT_UNSEEN_WEIGHT,
        show_default=True,
        help="With --usage: share of lookups assumed to fall evenly on all rows, seen or not.",
    )(fn)
    return click.option(
        "--usage",
        "usage_file",
        type=click.Path(path_type=Path),
        default=None,
        help="Rows' lookup counts (usage.save of embpress.record_usage) to weight the plan by.",
    )(fn)


@cli.command(
    epilog=_COMPRESS_EPILOG, short_help="Compress a checkpoint's embedding tables into an embpress file."
)
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--sparsity",
    type=_Fraction(),
    default=0.0,
    show_default=True,
    help="Fraction of each table's blocks pruned (smallest norm first), in [0, 1]. At equal bytes "
    "fewer bits keep more quality than pruning; see --budget.",
)
@click.option(
    "--block",
    type=_BlockShape(),
    metavar="HxW",
    default="1x4",
    show_default=True,
    help="Block shape HxW (rows x columns) pruned as a unit.",
)
@click.option(
    "--zeros-per-block",
    type=click.IntRange(min=0),  # (at most the block's entries: checked with --block)
    metavar="N",
    default=None,
    help="Entries zeroed inside a pruned block (smallest first) [default: the whole block].",
)
@click.option("--norm", type=click.Choice(["L1", "L2"]), default="L1", show_default=True, help="Block norm.")
@click.option(
    "--bits",
    type=click.Choice(["8", "4", "2"]),
    default=str(checkpoint.DEFAULT_BITS),
    show_default=True,
    help="Bits per kept entry (row-wise scale and offset).",
)
@click.option(
    "--order",
    type=click.Choice(["sparsify-first", "quantize-first"]),
    default="sparsify-first",
    show_default=True,
    help="Prune the float table, then quantize; or quantize, then prune the quantized table.",
)
@click.option(
    "--tables",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Compress only the '.weight' tensors whose key or module path matches this glob "
    "(repeatable, or comma-separated) [default: tables found by name].",
)
@click.option(
    "--layout",
    type=click.Choice(layout_choices()),
    default="auto",
    show_default=True,
    help="Storage layout; auto takes the smallest.",
)
@click.option(
    "--nonfinite",
    type=click.Choice(["raise", "zero"]),
    default="raise",
    show_default=True,
    help="A table with NaN/Inf: refuse it, or treat those entries as 0.0.",
)
@click.option(
    "--budget",
    type=_Budget(),
    default=None,
    help="Plan each row's storage for the least expected error within BUDGET bytes of tables: "
    "20MB, 512kB, 64KiB, 123456B, or a share of their float32 bytes such as 1/16.",
)
@click.option(
    "--max-error",
    type=_NonNegative(),
    default=None,
    help="Instead of --budget: the fewest bytes whose predicted error (expected squared error "
    "per lookup, summed over tables) is at most this.",
)
@_usage_options
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Apply a plan saved by 'embpress plan --json FILE' (its tables, as planned; with the "
    "same --usage if it was made with one).",
)
@click.option(
    "--memory",
    type=_Bytes(minimum=16 * 2**20),  # streaming.MIN_MEMORY (streaming loads on first use)
    default="512MiB",
    show_default=True,
    help="Working memory of a .safetensors input, which is read and compressed in row "
    "chunks (besides the output).",
)
@click.option(
    "--gather",
    is_flag=True,
    help="Under torchrun: send every process's rows to rank 0, which writes OUT (hosts without "
    "a filesystem they all share; rank 0 then holds the whole output). Default: each process "
    "writes its own rows into OUT.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (only JSON on stdout).")
@click.pass_context
@_boundary
def compress(
    ctx: click.Context,
    src: Path,
    dst: Path,
    sparsity: float,
    block: tuple[int, int],
    zeros_per_block: int | None,
    norm: str,
    bits: str,
    order: str,
    patterns: tuple[str, ...],
    layout: str,
    nonfinite: str,
    budget: checkpoint.Budget | None,
    max_error: float | None,
    usage_file: Path | None,
    unseen_weight: float,
    codecs: tuple[str, ...] | None,
    plan_file: Path | None,
    memory: int,
    gather: bool,
    as_json: bool,
) -> None:
    """Compress the embedding tables of checkpoint IN into the embpress file OUT.

    IN is a PyTorch state_dict (.pt/.pth, possibly wrapped as {"state_dict": ...} or
    {"model": ...}; loaded with weights_only=True) or a .safetensors file. OUT is one
    .safetensors file holding the compressed tables and every other tensor of IN,
    written atomically.

    With no options every table is stored at 4 bits per entry, no pruning: on the models
    measured (BENCHMARKS.md) that keeps quality at about 1/7 of the float32 bytes, while
    pruning loses more than fewer bits at equal bytes. With --budget (or --max-error, or
    --plan) each row gets its own storage instead, chosen by the planner.

    A .safetensors IN is read and compressed in row chunks, in bounded working memory
    (--memory), even when larger than RAM; torchrun can share the work among processes,
    each writing its rows into OUT (on a filesystem they all share):
    torchrun --standalone --nproc-per-node 4 -m embpress compress IN OUT. OUT is the same
    file, byte for byte, however it was made.
    """
    planned = budget is not None or max_error is not None or plan_file is not None
    if planned:
        _check_planned_options(ctx, budget, max_error, plan_file)
        _compress_planned(
            src, dst, patterns, budget, max_error, usage_file, unseen_weight, codecs, plan_file, as_json
        )
        return
    if _given(ctx, "codecs"):  # (a plan read with --plan keeps its own)
        raise click.BadParameter("only with --budget or --max-error", param_hint="'--codecs'")
    for name, flag in (("usage_file", "--usage"), ("unseen_weight", "--unseen-weight")):
        if _given(ctx, name):
            raise click.BadParameter("only with --budget, --max-error or --plan", param_hint=f"'{flag}'")
    if zeros_per_block is not None and zeros_per_block > block[0] * block[1]:
        raise click.BadParameter(
            f"{zeros_per_block} is larger than the block {block[0]}x{block[1]} "
            f"({block[0] * block[1]} entries)",
            param_hint="'--zeros-per-block'",
        )
    table_patterns = _split_patterns(patterns)
    collective = _collective()
    if collective is not None:
        from .distributed import leave

        ctx.call_on_close(lambda: leave(collective))  # on success and on error alike
    streamed = collective is not None or checkpoint.is_safetensors_file(src)
    if not streamed:
        checkpoint.check_input_file(src)
        if _given(ctx, "memory"):  # a .pt checkpoint unpickles whole: no bound to keep
            raise click.BadParameter(
                f"only with a .safetensors IN ({src} is read whole; convert it with "
                "safetensors.torch.save_file to compress it in bounded memory)",
                param_hint="'--memory'",
            )
    _check_out(src, dst)
    config = QuantConfig(bits=int(bits), layout=layout, nonfinite=nonfinite)
    settings: dict[str, Any] = {
        "sparsity": sparsity,
        "block": block,
        "zeros_per_block": zeros_per_block,
        "norm": norm,
        "quant": config,
        "sparsify_first": order == "sparsify-first",
    }
    if streamed:
        done = _compress_streamed(src, dst, table_patterns, settings, memory, collective, gather)
        if done is None:
            return  # another process than rank 0: rank 0 writes and reports
        result = done
        if result.written is None:  # gathered: rank 0 holds the tables
            _save_result(result, dst)
    else:
        state, _ = checkpoint.load_checkpoint(src)
        tables = checkpoint.find_tables(state, table_patterns, source=src)
        if not tables:
            raise CliError(
                f"{src}: no embedding table found among {len(state)} tensors "
                "(name them with --tables PATTERN; see 'embpress inspect IN')"
            )
        try:
            with _progress(sum(state[k].numel() for k in tables)) as on_table:
                result = checkpoint.compress_state_dict(state, tables, on_table=on_table, **settings)
        except ValueError as err:
            raise CliError(_named(_in_cli_terms(err), src)) from None
        _save_result(result, dst)

    before, after = result.original_nbytes, result.nbytes
    summary = {
        "in": str(src),
        "out": str(dst),
        "settings": {
            "sparsity": sparsity,
            "block": list(block),
            "zeros_per_block": zeros_per_block,
            "norm": norm,
            "bits": int(bits),
            "order": order,
            "layout": layout,
            "nonfinite": nonfinite,
        },
        "tables": [_compressed_row(r) for r in result.tables],
        "total": {"bytes_before": before, "bytes_after": after, "ratio": after / before if before else 0.0},
        "copied": {"count": result.copied_count, "bytes": result.copied_nbytes},
        "file_bytes": {"in": src.stat().st_size, "out": dst.stat().st_size},
    }
    if as_json:
        _print_json(summary)
        return
    _print_compress(summary)


def _in_cli_terms(err: Exception) -> str:
    text = str(err).replace("pass QuantConfig(nonfinite='zero')", "pass --nonfinite zero")
    text = text.replace(
        "(uniform settings can zero them instead)",
        "(compress without --budget, --max-error or --plan can zero them: --nonfinite zero)",
    )
    # 8-bit rows keep float32 scales (FBGEMM's format); 4- and 2-bit ones float16
    text = text.replace("use QuantConfig(scale_dtype=torch.float32)", "use --bits 8 (float32 row scales)")
    return text.replace(
        "pass the usage the plan was made with", "pass the --usage file the plan was made with"
    )


def _world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _exit_on_sigterm() -> None:
    """Make SIGTERM end this process through Python's clean-up (the temp file beside OUT
    removed) rather than at once: torchrun stops the other ranks with it when one fails."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _collective() -> Any:
    """The processes torchrun started (gloo), or None when this one runs alone."""
    if _world_size() <= 1:
        return None
    from .distributed import from_environment

    _exit_on_sigterm()
    try:
        return from_environment()
    except (RuntimeError, ValueError) as err:
        raise CliError(
            f"rank {os.environ.get('RANK', '?')}: could not join the other processes ({_one_line(err)})"
        ) from None


def _fingerprint(
    src: Path, dst: Path, patterns: Sequence[str], settings: dict[str, Any], memory: int, gather: bool
) -> bytes:
    """What every process must agree on: the options, and IN's size, header and first and
    last MiB (a different file is refused even where it has the same name)."""
    size = src.stat().st_size
    with open(src, "rb") as fh:
        head = fh.read(1 << 20)
        fh.seek(max(0, size - (1 << 20)))
        tail = fh.read(1 << 20)
    options = json.dumps([str(dst), list(patterns), repr(settings), memory, gather, size])
    return options.encode() + head + tail


def _compress_streamed(
    src: Path,
    dst: Path,
    patterns: Sequence[str],
    settings: dict[str, Any],
    memory: int,
    collective: Any,
    gather: bool = False,
) -> checkpoint.CompressedCheckpoint | None:
    """compress of a .safetensors IN in row chunks, written into OUT chunk by chunk
    (unjoined); with torchrun, each process its share of the rows (rank 0 gets the
    report, the others None), or, with ``gather`` and several processes, the parts
    gathered on rank 0, which gets the result to write."""
    from . import streaming
    from ._collective import LOCAL

    rank = 0 if collective is None else collective.rank
    where = "" if collective is None else f"rank {rank}: "
    try:
        if collective is not None:
            from .distributed import check_same

            check_same(
                collective,
                "IN, OUT and the options",
                _fingerprint(src, dst, patterns, settings, memory, gather),
            )
        tables = streaming.safetensors_tables(src, patterns)
        if not tables:
            raise CliError(
                f"{src}: no embedding table found "
                "(name them with --tables PATTERN; see 'embpress inspect IN')"
            )
        total = sum(math.prod(shape) for shape in tables.values()) if rank == 0 else 0
        with _progress(total) as on_table:
            return streaming.compress_safetensors(
                src,
                patterns,
                chunk_bytes=streaming.memory_chunk_bytes(memory),
                collective=collective if collective is not None else LOCAL,
                on_table=on_table,
                out=None if gather and collective is not None else dst,
                **settings,
            )
    except CliError:
        raise
    except OSError as err:  # writing OUT (in place, by every process)
        why = err.strerror[:1].lower() + err.strerror[1:] if err.strerror else _one_line(err)
        raise CliError(f"{where}{dst}: could not write ({_one_line(why)}); nothing was written") from None
    except ValueError as err:
        raise CliError(where + _named(_in_cli_terms(err), src)) from None
    except RuntimeError as err:  # torch.distributed: another process failed or went away
        if collective is None:
            raise
        raise CliError(
            f"{where}stopped: another process failed or left ({_one_line(err)}); {dst} not written"
        ) from None


def _save_result(result: checkpoint.CompressedCheckpoint, dst: Path) -> None:
    try:
        result.save(dst)  # atomic: OUT is replaced only when complete
    except (OSError, SafetensorError, RuntimeError, MemoryError) as err:
        if isinstance(err, OSError) and err.strerror:
            why = err.strerror[:1].lower() + err.strerror[1:]
        else:
            why = "not enough memory" if _out_of_memory(err) else _one_line(err)
        raise CliError(f"{dst}: could not write ({_one_line(why)}); nothing was written") from None


# options of compress's row-chunk path (uniform settings only): a planned compress reads IN
# whole, in one process
_STREAMED_OPTIONS = {"memory": "--memory", "gather": "--gather"}

# the uniform settings of compress, which a plan replaces
_UNIFORM_OPTIONS = {
    "sparsity": "--sparsity",
    "block": "--block",
    "zeros_per_block": "--zeros-per-block",
    "norm": "--norm",
    "bits": "--bits",
    "order": "--order",
    "layout": "--layout",
    "nonfinite": "--nonfinite",
}


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def _check_planned_options(
    ctx: click.Context, budget: object, max_error: object, plan_file: Path | None
) -> None:
    goals = [
        flag
        for flag, v in (("--budget", budget), ("--max-error", max_error), ("--plan", plan_file))
        if v is not None
    ]
    if len(goals) > 1:
        raise click.BadParameter(f"give one of --budget, --max-error and --plan, not {' and '.join(goals)}",
                                 param_hint=f"'{goals[1]}'")  # fmt: skip
    for name, flag in _UNIFORM_OPTIONS.items():
        if _given(ctx, name):
            raise click.BadParameter(
                f"uniform settings do not combine with {goals[0]}", param_hint=f"'{flag}'"
            )
    for name, flag in _STREAMED_OPTIONS.items():
        if _given(ctx, name):
            raise click.BadParameter(
                f"only with uniform settings, not with {goals[0]} (a planned compress reads IN "
                "whole, in one process)",
                param_hint=f"'{flag}'",
            )
    if _world_size() > 1:
        raise CliError(
            f"{goals[0]}: several processes (torchrun, WORLD_SIZE={_world_size()}) compress with "
            "uniform settings only; run a planned compress as one process"
        )
    if plan_file is not None and ctx.params.get("patterns"):
        raise click.BadParameter("a plan names its own tables", param_hint="'--tables'")
    if plan_file is not None and _given(ctx, "unseen_weight"):
        raise click.BadParameter("a plan keeps the value it was made with", param_hint="'--unseen-weight'")
    if plan_file is not None and _given(ctx, "codecs"):
        raise click.BadParameter("a plan keeps the codecs it chose", param_hint="'--codecs'")


T = TypeVar("T")


def _read_input(path: Path | None, load: Callable[[Path], T], expected: str) -> T | None:
    """``load(path)`` of an input file given by an option (None when not given); its
    errors as one line naming the file (``expected``: what it should be)."""
    if path is None:
        return None
    try:
        checkpoint.check_input_file(path, expected=expected)
        return load(path)
    except (OSError, ValueError) as err:
        raise CliError(_describe(err, path)) from None


def _read_usage(path: Path | None) -> Usage | None:
    return _read_input(path, Usage.load, "a usage file (usage.save of embpress.record_usage)")


def _read_plan(path: Path | None) -> Plan | None:
    return _read_input(path, Plan.load, "a plan JSON file ('embpress plan --json FILE')")


def _compress_planned(
    src: Path,
    dst: Path,
    patterns: tuple[str, ...],
    budget: checkpoint.Budget | None,
    max_error: float | None,
    usage_file: Path | None,
    unseen_weight: float,
    codecs: tuple[str, ...] | None,
    plan_file: Path | None,
    as_json: bool,
) -> None:
    """compress with a plan: made here (--budget / --max-error) or read (--plan)."""
    table_patterns = _split_patterns(patterns)
    checkpoint.check_input_file(src)
    _check_out(src, dst)
    _refuse_inputs(dst, "'OUT'", {"--usage": usage_file, "--plan": plan_file})
    usage = _read_usage(usage_file)
    given_plan = _read_plan(plan_file)
    if given_plan is not None and given_plan.with_usage and usage is None:
        raise CliError(
            f"{plan_file}: the plan was made with usage: pass the same --usage FILE it was made with"
        )
    if given_plan is not None and not given_plan.with_usage and usage is not None:
        raise click.BadParameter(f"{plan_file} was made without usage", param_hint="'--usage'")
    state, _ = checkpoint.load_checkpoint(src)
    tables: list[str] | None = None
    if given_plan is None:
        tables = checkpoint.find_tables(state, table_patterns, source=src)
        if not tables:
            raise CliError(
                f"{src}: no embedding table found among {len(state)} tensors "
                "(name them with --tables PATTERN; see 'embpress inspect IN')"
            )
        elements = sum(state[k].numel() for k in tables)
    else:
        elements = sum(t.rows * t.dim for t in given_plan.tables)
    try:
        with _progress(elements) as on_table:
            result = checkpoint.compress_state_dict(
                state,
                tables,
                on_table=on_table,
                plan=given_plan,
                budget=budget,
                max_error=max_error,
                usage=usage,
                unseen_weight=unseen_weight,
                codecs=codecs,
            )
    except UsageError as err:
        raise CliError(_named(_in_cli_terms(err), usage_file or src)) from None
    except ValueError as err:
        raise CliError(_named(_in_cli_terms(err), src)) from None
    _save_result(result, dst)
    applied = result.plan
    assert applied is not None
    before, after = result.original_nbytes, result.nbytes
    rows = [_compressed_row(r) for r in result.tables]
    for row in rows:
        row["choice"] = applied[row["name"]].summary()
        row["predicted_error"] = applied[row["name"]].predicted_error
    summary = {
        "in": str(src),
        "out": str(dst),
        "settings": {
            "planned": True,
            "budget_bytes": applied.budget_bytes,
            "max_error": applied.max_error,
            "usage": None if usage_file is None else str(usage_file),
            "unseen_weight": applied.unseen_weight,
            "codecs": None if codecs is None else list(codecs),
            "plan": None if plan_file is None else str(plan_file),
        },
        "tables": rows,
        "total": {
            "bytes_before": before,
            "bytes_after": after,
            "ratio": after / before if before else 0.0,
            "predicted_error": applied.predicted_error,
        },
        "copied": {"count": result.copied_count, "bytes": result.copied_nbytes},
        "file_bytes": {"in": src.stat().st_size, "out": dst.stat().st_size},
    }
    if as_json:
        _print_json(summary)
        return
    _print_compress(summary)


def _compressed_row(r: TableReport) -> dict[str, Any]:
    """One compressed table as compress reports it (bytes before: in the checkpoint's dtype)."""
    before = r.original_nbytes if r.original_nbytes is not None else r.float_nbytes
    return {
        "name": r.name,
        "aliases": list(r.aliases),
        "kind": r.kind,
        "mode": r.mode,
        "rows": r.rows,
        "dim": r.dim,
        "dtype": r.dtype,
        "layout": r.layout,
        "bits": r.bits,
        "sparsity": r.sparsity,
        "bytes_before": before,
        "bytes_after": r.nbytes,
        "rel_frobenius": r.rel_frobenius,
        "max_abs_error": r.max_abs_error,
        "ratio": r.nbytes / before if before else 0.0,
    }


def _check_out(src: Path, dst: Path) -> None:
    """OUT must not be IN, nor an existing non-file, and its folder must exist (checked before any work)."""
    try:
        info: os.stat_result | None = os.stat(dst)
    except FileNotFoundError:
        info = None
    except OSError as err:
        raise click.BadParameter(
            f"{dst}: {_one_line(err.strerror or 'unusable')}", param_hint="'OUT'"
        ) from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise click.BadParameter(f"{dst} is a directory", param_hint="'OUT'")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise click.BadParameter(f"{dst} exists and is not a regular file", param_hint="'OUT'")
    if checkpoint.same_file(src, dst):
        raise click.BadParameter(f"{dst} is the input file; write to another path", param_hint="'OUT'")
    parent = Path(os.path.realpath(dst)).parent
    if not parent.is_dir():
        raise CliError(f"{dst}: folder {parent} does not exist")


def _split_patterns(patterns: Sequence[str]) -> list[str]:
    """--tables values, repeated or comma-separated; given but all empty is a usage error."""
    split = [p.strip() for spec in patterns for p in spec.split(",") if p.strip()]
    if patterns and not split:
        raise click.BadParameter("the pattern is empty", param_hint="'--tables'")
    return split


def _text(text: str) -> Text:
    """Rich text of ``text`` as it reads, characters that do not print escaped
    (``report.printable``): table names and paths come from the files read."""
    return Text(printable(text))


def _print_compress(summary: dict[str, Any]) -> None:
    console = _stdout()
    s = summary["settings"]
    if s.get("planned"):
        goal = (
            f"budget {human_bytes(s['budget_bytes'])}"
            if s["budget_bytes"] is not None
            else f"max error {s['max_error']:.4g}"
        )
        how = f"usage {s['usage']}" if s["usage"] else "no usage"
        source = f"plan {s['plan']}" if s["plan"] else f"planned for {goal}, {how}"
        title = f"{summary['in']} -> {summary['out']}: {source}"
    else:
        title = (
            f"{summary['in']} -> {summary['out']}: sparsity {s['sparsity']:g}, block {s['block'][0]}x"
            f"{s['block'][1]}, {s['bits']} bits, {s['order']}"
        )
    console.print(_text(title))
    total = summary["total"]
    table = _footed_table(
        [
            ("table", "total", "left"),
            ("rows x dim", "", "right"),
            ("layout", "", "left"),
            ("bits", "", "right"),
            ("sparsity", "", "right"),
            ("before", human_bytes(total["bytes_before"]), "right"),
            ("after", human_bytes(total["bytes_after"]), "right"),
            ("ratio", f"{total['ratio']:.4f}", "right"),
            ("rel err", "", "right"),
            ("max |err|", "", "right"),
        ]
    )
    for r in summary["tables"]:
        name = _text(r["name"] + (f" (= {', '.join(r['aliases'])})" if r["aliases"] else ""))
        table.add_row(
            name,
            f"{r['rows']} x {r['dim']}",
            _text(r.get("choice", r["layout"])),
            str(r["bits"]),
            f"{r['sparsity']:.4f}",
            human_bytes(r["bytes_before"]),
            human_bytes(r["bytes_after"]),
            f"{r['ratio']:.4f}",
            _fmt(r["rel_frobenius"], ".4f"),
            _fmt(r["max_abs_error"], ".4g"),
        )
    console.print(table)
    copied, files = summary["copied"], summary["file_bytes"]
    console.print(
        _text(
            f"copied {copied['count']} other tensor(s) unchanged ({human_bytes(copied['bytes'])}); "
            f"wrote {summary['out']} ({human_bytes(files['out'])}, input {human_bytes(files['in'])})"
        )
    )


# ------------------------------------------------------------------------------ plan
_PLAN_EPILOG = """\b
Examples:
  embpress plan model.pt --budget 20MB
  embpress plan model.pt --budget 1/16 --usage usage.safetensors --json plan.json
  embpress compress model.pt out.safetensors --plan plan.json --usage usage.safetensors

\b
BUDGET covers the selected tables alone: bytes with a unit (B, kB, MB, GB
decimal; KiB, MiB, GiB binary) or a share of their float32 bytes (1/16).
Record usage in Python: with embpress.record_usage(model) as usage: ...;
usage.save("usage.safetensors").
"""


@cli.command(
    "plan", epilog=_PLAN_EPILOG, short_help="Choose each row's storage within a byte budget; print the plan."
)
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.option("--budget", type=_Budget(), default=None, help="Bytes the tables may take (see below).")
@click.option(
    "--max-error",
    type=_NonNegative(),
    default=None,
    help="Instead of --budget: the fewest bytes whose predicted error is at most this.",
)
@_usage_options
@click.option(
    "--tables",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Plan only the '.weight' tensors whose key or module path matches this glob "
    "(repeatable, or comma-separated) [default: tables found by name].",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="Also write the plan as JSON to FILE, for 'compress --plan FILE' ('-': print only the JSON).",
)
@click.pass_context
@_boundary
def plan_command(
    ctx: click.Context,
    src: Path,
    budget: checkpoint.Budget | None,
    max_error: float | None,
    usage_file: Path | None,
    unseen_weight: float,
    codecs: tuple[str, ...] | None,
    patterns: tuple[str, ...],
    json_out: Path | None,
) -> None:
    """Choose how to store each row of checkpoint IN's tables within a budget; print it.

    For every row the planner weighs 8, 4 and 2-bit row-wise codes, per-row levels,
    per-column codebooks and pruning, and picks the mix with the least expected error
    (rows weighted by the square roots of the --usage counts when given, else by their
    squared norms) whose bytes are at most BUDGET (compress --plan then writes tables of
    exactly the planned bytes). Give --budget or --max-error.
    """
    if (budget is None) == (max_error is None):
        raise click.UsageError("give one of --budget and --max-error")
    if usage_file is None and _given(ctx, "unseen_weight"):
        raise click.BadParameter("only with --usage", param_hint="'--unseen-weight'")
    table_patterns = _split_patterns(patterns)
    checkpoint.check_input_file(src)
    if json_out is not None and str(json_out) != "-":
        _check_plan_out(src, json_out)
        _refuse_inputs(json_out, "'--json'", {"--usage": usage_file})
    usage = _read_usage(usage_file)
    try:
        made = checkpoint.plan_checkpoint(
            src,
            table_patterns,
            budget=budget,
            max_error=max_error,
            usage=usage,
            unseen_weight=unseen_weight,
            codecs=codecs,
        )
    except UsageError as err:  # the usage file does not fit the checkpoint: it is what to fix
        raise CliError(_named(str(err), usage_file)) from None
    if json_out is not None and str(json_out) == "-":
        _print_json(made.to_json())
        return
    click.echo(str(made))
    if json_out is not None:
        try:
            made.save(json_out)
        except OSError as err:
            why = err.strerror or "unknown error"
            raise CliError(f"{json_out}: could not write ({_one_line(why[:1].lower() + why[1:])})") from None
        # quoted for the shell, so that the command runs as pasted
        words = ["embpress", "compress", str(src), "OUT", "--plan", str(json_out)]
        words += [] if usage_file is None else ["--usage", str(usage_file)]
        apply = " ".join(shlex.quote(w) for w in words)
        click.echo(f"wrote {json_out}; apply it with: {apply}")


def _refuse_inputs(out: Path, hint: str, inputs: dict[str, Path | None]) -> None:
    """An output path must not be a file the command reads (``inputs``: option -> path)."""
    for flag, path in inputs.items():
        if path is not None and checkpoint.same_file(out, path):
            raise click.BadParameter(f"{out} is the {flag} file; write to another path", param_hint=hint)


def _check_plan_out(src: Path, out: Path) -> None:
    """--json FILE must not be IN or a folder, and its folder must exist."""
    if out.is_dir():
        raise click.BadParameter(f"{out} is a directory", param_hint="'--json'")
    if out.exists() and (not out.is_file() or checkpoint.same_file(out, src)):
        raise click.BadParameter(f"{out} is not a writable plan file", param_hint="'--json'")
    if not Path(os.path.realpath(out)).parent.is_dir():
        raise CliError(f"{out}: folder {Path(os.path.realpath(out)).parent} does not exist")


# ------------------------------------------------------------------------------ inspect
_INSPECT_EPILOG = """\b
Examples:
  embpress inspect model.embp.safetensors
  embpress inspect model.pt            # which tensors compress would take as tables
  embpress inspect model.pt --tables 'emb*' --json
"""


@cli.command(epilog=_INSPECT_EPILOG, short_help="Describe an embpress file or a checkpoint's tables.")
@click.argument("file", type=click.Path(path_type=Path), required=False)
@click.option(
    "--tables",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="For a plain checkpoint: preview this selection, as 'compress --tables' would take it.",
)
@click.option(
    "--system",
    is_flag=True,
    help="Describe this machine instead: the lookup kernel path (avx512, avx2 or generic; "
    "EMBPRESS_KERNEL forces one), the CPU features it needs, versions, threads.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (only JSON on stdout).")
@_boundary
def inspect(file: Path | None, patterns: tuple[str, ...], system: bool, as_json: bool) -> None:
    """Describe FILE: an embpress file's tables, or a checkpoint's candidate tables.

    For an embpress file: format version, each table's kind, layout, bits, exact
    sparsity, bytes and ratio to float32 (checksums verified), and the other tensors.
    For a plain checkpoint (.pt/.pth/.safetensors): which tensors 'embpress compress'
    would compress as tables and which it would copy. With --system (and no FILE): the
    machine, as the lookup kernels see it.
    """
    if system:
        if file is not None or patterns:
            raise click.UsageError("--system takes no FILE or --tables")
        from .layouts.lookup import system_info

        info = system_info()
        if as_json:
            _print_json(info)
        else:
            for key, value in info.items():
                click.echo(f"{key}: {value}")
        return
    if file is None:
        raise click.UsageError("missing argument FILE (or give --system)")
    table_patterns = _split_patterns(patterns)
    if checkpoint.is_embpress_file(file):
        if table_patterns:  # (an embpress file's tables are those it holds)
            raise click.BadParameter(
                "picks a checkpoint's tables; an embpress file shows all it holds", param_hint="'--tables'"
            )
        summary = _file_summary(checkpoint.inspect(file))
        if as_json:
            _print_json(summary)
        else:
            _print_inspect_embpress(summary)
        return
    plain = _checkpoint_summary(checkpoint.inspect_checkpoint(file, table_patterns))
    if as_json:
        _print_json(plain)
    else:
        _print_inspect_plain(plain)


def _file_summary(report: FileReport) -> dict[str, Any]:
    """An embpress file's report as inspect prints it (and its JSON)."""
    tables = [
        {
            "name": t.name,
            "aliases": list(t.aliases),
            "kind": t.kind,
            "mode": t.mode,
            "rows": t.rows,
            "dim": t.dim,
            "layout": t.layout,
            "bits": t.bits,
            "sparsity": t.sparsity,
            "bytes": t.nbytes,
            "float32_bytes": t.float_nbytes,
            "ratio": t.ratio,
            "rel_frobenius": t.rel_frobenius,
            "max_abs_error": t.max_abs_error,
        }
        for t in report.tables
    ]
    return {
        "file": report.path,
        "format": report.format,
        "format_version": report.format_version,
        "file_bytes": report.file_bytes,
        "tables": tables,
        "total": {"bytes": report.nbytes, "float32_bytes": report.float_nbytes, "ratio": report.ratio},
        "other_tensors": {"count": report.other_tensors, "bytes": report.other_nbytes},
    }


def _checkpoint_summary(report: CheckpointReport) -> dict[str, Any]:
    """A plain checkpoint's report as inspect prints it (and its JSON)."""

    def row(t: TensorInfo) -> dict[str, Any]:
        dtype = t.dtype if t.layout == "strided" else f"{t.dtype} ({t.layout})"
        return {"key": t.key, "shape": list(t.shape), "dtype": dtype, "bytes": t.nbytes, "tied_to": t.tied_to}

    return {
        "file": report.path,
        "format": report.format,
        "tables": [row(t) for t in report.tables],
        "copied": [row(t) for t in report.copied],
    }


def _print_inspect_embpress(summary: dict[str, Any]) -> None:
    console = _stdout()
    title = (
        f"{summary['file']}: embpress format version {summary['format_version']}, "
        f"{human_bytes(summary['file_bytes'])}, checksums ok"
    )
    console.print(_text(title))
    total = summary["total"]
    table = _footed_table(
        [
            ("table", "total", "left"),
            ("kind", "", "left"),
            ("rows x dim", "", "right"),
            ("layout", "", "left"),
            ("bits", "", "right"),
            ("sparsity", "", "right"),
            ("float32", human_bytes(total["float32_bytes"]), "right"),
            ("stored", human_bytes(total["bytes"]), "right"),
            ("ratio", f"{total['ratio']:.4f}", "right"),
            ("rel err", "", "right"),
        ]
    )
    for t in summary["tables"]:
        name = t["name"] + (f" (= {', '.join(t['aliases'])})" if t["aliases"] else "")
        kind = t["kind"] if t["mode"] is None else f"{t['kind']}({t['mode']})"
        table.add_row(
            _text(name),
            kind,
            f"{t['rows']} x {t['dim']}",
            t["layout"],
            str(t["bits"]),
            f"{t['sparsity']:.4f}",
            human_bytes(t["float32_bytes"]),
            human_bytes(t["bytes"]),
            f"{t['ratio']:.4f}",
            _fmt(t["rel_frobenius"], ".4f"),
        )
    console.print(table)
    other = summary["other_tensors"]
    console.print(_text(f"other tensors: {other['count']} ({human_bytes(other['bytes'])})"))


def _print_inspect_plain(summary: dict[str, Any]) -> None:
    console = _stdout()
    for part, title in (
        ("tables", "compressed as embedding tables"),
        ("copied", "copied unchanged"),
    ):
        rows = summary[part]
        size = human_bytes(sum(r["bytes"] for r in rows if r["tied_to"] is None))  # tied data once
        line = f"{summary['file']} ({summary['format']}): {len(rows)} tensor(s) {title}, {size}"
        console.print(_text(line))
        if not rows:
            continue
        table = Table()
        for head, justify in (("key", "left"), ("shape", "right"), ("dtype", "left"), ("bytes", "right")):
            table.add_column(head, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for r in rows:
            shape = " x ".join(str(s) for s in r["shape"]) or "scalar"
            size = human_bytes(r["bytes"]) if r["tied_to"] is None else f"= {r['tied_to']}"
            table.add_row(_text(r["key"]), shape, r["dtype"], _text(size))
        console.print(table)
    if not summary["tables"]:
        console.print(_text("no embedding table found by name; choose them with --tables PATTERN"))


# ------------------------------------------------------------------------------ demo
_DEMO_EPILOG = """\b
Example:
  embpress demo --out out/demo          # well under a minute on 2 cores
  embpress demo --quick --seed 1        # a few seconds
"""


@cli.command(epilog=_DEMO_EPILOG, short_help="Train a small click model and sweep sparsity x bits.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out/demo"),
    show_default=True,
    help="Folder for tradeoff.png.",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**32 - 1),
    default=0,
    show_default=True,
    help="Seed of data, model and training.",
)
@click.option("--quick", is_flag=True, help="Smaller tables, shorter training and sweep (a few seconds).")
@_boundary
def demo(out_dir: Path, seed: int, quick: bool) -> None:
    """Train a small DLRM-style click model, then sweep sparsity x bits.

    Synthetic click data (Zipf-skewed ids, labels from a hidden logistic model) trains a
    model with four nn.EmbeddingBag tables; each (sparsity, bits) setting compresses a
    copy with post_training_sparse_quantize and reports table bytes, held-out AUC and
    log loss. Writes OUT/tradeoff.png (AUC against table bytes).
    """
    from .demo import print_results, run_demo

    console = _stdout()
    try:
        result = run_demo(out_dir, seed=seed, quick=quick, console=Console(stderr=True))
    except ImportError as err:  # matplotlib, for the plot: part of the cli extra
        raise CliError(_one_line(err)) from None
    print_results(result, console)


def main() -> None:
    """Run the command (the ``embpress`` console script calls this through ``embpress.__main__``)."""
    cli(prog_name="embpress")


if __name__ == "__main__":
    main()
