"""The ``embpress`` command: compress a checkpoint's embedding tables, inspect files, run the demo.

``compress`` reads a plain PyTorch state_dict (``.pt``/``.pth``, loaded with
``weights_only=True``) or a ``.safetensors`` file, rebuilds the state_dict as a skeleton
module (an ``nn.Embedding`` at each table, every other tensor a buffer at its own key),
runs :func:`embpress.post_training_sparse_quantize` on it and writes it with
:func:`embpress.save` (tables of kind "auto": a state_dict does not say which table is a
bag, so ``embpress.load`` builds each after the model's own module). The command and the
Python API share one code path, and ``embpress.load(model, OUT)`` loads the result into
the model IN came from.

User errors end in one ``error: ...`` line on stderr naming the file or option and a
non-zero exit status (2: bad usage, 1: anything else, 130: interrupted), never a
traceback; an internal error says so in one line (``EMBPRESS_DEBUG=1`` shows its
traceback). Only regular files are read, and none larger than this machine's memory.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click
import torch
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import nn

from . import io as eio
from .api import post_training_sparse_quantize
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag
from .quant.config import LAYOUTS, QuantConfig
from .report import human_bytes, quantized_modules
from .sparsify import DataNormSparsifier
from .sparsify.data_norm import MAX_BLOCK_SIDE

__all__ = [
    "CompressedTable",
    "build_skeleton",
    "cli",
    "compress_state_dict",
    "find_tables",
    "load_checkpoint",
    "looks_like_embedding",
    "main",
]

# Total table elements above which compress shows a progress bar (on stderr).
PROGRESS_MIN_ELEMENTS = 1_000_000
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_ZIP_MAGIC = b"PK\x03\x04"


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
    """``text``, prefixed with ``subject`` (a path) unless it already names it."""
    if subject is None or str(subject) in text:
        return text
    return f"{subject}: {text}"


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
            return _named(_one_line(err.strerror[:1].lower() + err.strerror[1:]), where)
        return _named(_one_line(err), subject)
    if isinstance(err, (ValueError, TypeError, RuntimeError, SafetensorError)):
        # FormatError is a ValueError: the library's own one-line messages
        return _named(_one_line(err), subject)
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
        sys.exit(rv if isinstance(rv, int) else 0)


# ------------------------------------------------------------------------------ reading
def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch.save's format) or 'other', from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] == _ZIP_MAGIC:
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32:
        return "safetensors"
    return "other"


def _memory_bytes() -> int | None:
    """This machine's memory (RAM + swap), or None where the OS does not say."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    swap = 0
    try:
        with open("/proc/meminfo") as fh:
            swap = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("SwapTotal:")), 0)
    except (OSError, ValueError, IndexError):
        pass
    return ram + swap if ram > 0 else None


def _check_fits(what: str, nbytes: int) -> None:
    """Refuse ``what`` (``nbytes`` to hold in memory) when this machine could not hold it."""
    limit = _memory_bytes()
    if limit is not None and nbytes > limit:
        raise CliError(
            f"{what} is too large: {human_bytes(nbytes)}, more than this machine's memory "
            f"({human_bytes(limit)})"
        )


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_readable(path: Path) -> None:
    """IN must be a non-empty regular file that fits in memory; anything else is never opened
    (a named pipe would block, /dev/zero never ends)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except OSError as err:
        raise CliError(_named(f"cannot read ({_one_line(err.strerror or 'unknown error')})", path)) from None
    if stat.S_ISDIR(info.st_mode):
        raise CliError(f"{path}: is a directory, expected a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
        raise CliError(f"{path}: not a regular file ({kind}), expected a checkpoint file")
    if info.st_size == 0:
        raise CliError(f"{path}: the file is empty")
    _check_fits(str(path), info.st_size)
    with open(path, "rb"):  # PermissionError says why
        pass


def _safetensors_cause(err: BaseException) -> str:
    """Why safetensors could not read a file, in our words."""
    text = str(err)
    if _out_of_memory(err):
        return "too large to map into memory"
    if "HeaderTooLarge" in text or "too large" in text:
        return "its header is too large"
    if any(
        s in text for s in ("incomplete metadata", "MetadataIncompleteBuffer", "InvalidOffset", "covered")
    ):
        return "truncated, or its header's offsets do not match its size"
    if any(s in text for s in ("JSON", "Header", "header", "utf", "UTF")):
        return "its header is not a valid safetensors header"
    return "damaged"


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise CliError(f"{path}: not a readable safetensors file ({_safetensors_cause(err)})") from None


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` with errors said in one line (mmap for zip files)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as err:  # torch raises many types for a bad file; all mean the same here
        text = str(err)
        if "allowed global" in text or "Unsupported global" in text:
            raise CliError(
                f"{path}: refused: the checkpoint holds Python objects that a weights-only load does "
                "not unpickle (save the model's state_dict() instead)"
            ) from None
        if _out_of_memory(err):
            why = "too large to read into memory"
        elif isinstance(err, RecursionError):
            why = "nested too deeply"
        else:
            why = "damaged, or not written by torch.save" if kind == "zip" else "unrecognized contents"
        raise CliError(f"{path}: not a PyTorch checkpoint or safetensors file ({why})") from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``obj``: itself, or under 'state_dict' / 'model' / 'model_state_dict'."""

    def is_state(d: Any) -> bool:
        return (
            isinstance(d, Mapping)
            and len(d) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
        )

    if is_state(obj):
        return {k: v.detach() for k, v in obj.items()}
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if is_state(obj.get(key)):
                return {k: v.detach() for k, v in obj[key].items()}
        if not obj:
            raise CliError(f"{path}: the checkpoint is empty")
    raise CliError(
        f"{path}: not a state_dict (expected a dict of tensors, possibly under "
        f"{' / '.join(repr(k) for k in _WRAPPER_KEYS)}; got {type(obj).__name__})"
    )


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, format) of a ``.pt``/``.pth`` state_dict or a plain ``.safetensors`` file.

    Never unpickles arbitrary objects (``weights_only=True``) and reads only a regular file
    no larger than this machine's memory. An embpress file is refused: its tables are
    already compressed. Sparse tensors are returned as they are (compress makes sparse tables dense).
    """
    p = Path(path)
    _check_readable(p)
    kind = _sniff(p)
    if kind == "safetensors" or p.suffix == ".safetensors":
        if _safetensors_metadata(p).get("format") == eio.FORMAT_NAME:
            raise CliError(f"{p}: already an embpress file (see 'embpress inspect {p}')")
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            raise CliError(f"{p}: not a readable safetensors file ({_safetensors_cause(err)})") from None
        if not tensors:
            raise CliError(f"{p}: the file holds no tensors")
        return tensors, "safetensors"
    state = _unwrap(_torch_load(p, kind), p)
    for key, t in state.items():
        if t.is_nested:
            raise CliError(f"{p}: tensor {key!r} is a nested tensor, which embpress cannot read")
    return state, "pytorch"


# ------------------------------------------------------------------------------ choosing tables
def looks_like_embedding(module_path: str) -> bool:
    """Whether a module path names an embedding (``emb1``, ``word_embeddings``, ``wte``, ``tables.3``...).

    The last component decides; a numeric one (a ModuleList index) defers to its parent.
    """
    parts = module_path.lower().split(".")
    last = parts[-1]
    if last.isdigit() and len(parts) > 1:
        last = parts[-2]
    return "emb" in last or last in ("wte", "wpe")


def _module_path(key: str) -> str | None:
    return key[: -len(".weight")] if key.endswith(".weight") and len(key) > len(".weight") else None


def _table_problem(state: Mapping[str, torch.Tensor], key: str, path: str) -> str | None:
    """Why ``key`` cannot be compressed as a table, or None."""
    t = state[key]
    if t.dim() != 2:
        return f"is not a 2-D table (shape {tuple(t.shape)})"
    if not t.is_floating_point():
        return f"is not a float table (dtype {str(t.dtype).replace('torch.', '')})"
    if t.shape[0] == 0 or t.shape[1] == 0:
        return f"is empty (shape {tuple(t.shape)})"
    others = [k for k in state if k.startswith(path + ".") and k != key]
    if others:
        return f"is not an embedding: its module {path!r} also holds {others[0]!r}"
    if any(not part for part in path.split(".")):
        return "has an empty component in its name"
    return None


def find_tables(state: Mapping[str, torch.Tensor], patterns: Sequence[str] = ()) -> list[str]:
    """The keys of ``state`` compressed as tables, in the order of ``state``.

    Without ``patterns``: every ``<module>.weight`` whose module name looks like an
    embedding (:func:`looks_like_embedding`) and that is a 2-D float tensor. With
    ``patterns`` (fnmatch globs on the key or on the module path): exactly the matched
    ``.weight`` tensors, each of which must be a 2-D float table (ValueError otherwise).
    """
    candidates = {k: p for k in state if (p := _module_path(k)) is not None}
    if not patterns:
        found = [k for k, p in candidates.items() if looks_like_embedding(p)]
        return [k for k in found if _table_problem(state, k, candidates[k]) is None]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [
            k
            for k, p in candidates.items()
            if fnmatch.fnmatchcase(k, pattern) or fnmatch.fnmatchcase(p, pattern)
        ]
        if not hits:
            some = ", ".join(list(candidates)[:5]) or "none"
            raise ValueError(
                f"--tables {pattern!r} matches no table (tables are '<module>.weight' tensors: {some}"
                f"{', ...' if len(candidates) > 5 else ''})"
            )
        chosen.extend(k for k in hits if k not in chosen)
    for key in chosen:
        problem = _table_problem(state, key, candidates[key])
        if problem is not None:
            raise ValueError(f"selected tensor {key!r} {problem}")
    return [k for k in state if k in chosen]


# ------------------------------------------------------------------------------ compressing
def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's data: equal for tied tables (shared storage, same view)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _child(parent: nn.Module, name: str) -> nn.Module:
    child = parent._modules.get(name)
    if child is None:
        child = parent._modules[name] = nn.Module()
    return child


def build_skeleton(
    state: Mapping[str, torch.Tensor], tables: Sequence[str]
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """A module whose ``state_dict()`` has the keys of ``state``; each table an embedding module.

    Table ``a.b.weight`` becomes an ``nn.Embedding`` at ``a.b`` holding the very tensor
    (no copy; the file records no kind, ``embpress.load`` takes it from the model, which
    may have an EmbeddingBag there); tied tables (the same
    storage) share one module, which embpress then saves once with aliases. Every other
    tensor is a buffer at its own key. Returns (skeleton, table key -> embedding module).
    """
    root = nn.Module()
    modules: dict[str, nn.Module] = {}
    shared: dict[tuple[Any, ...], str] = {}
    for key in tables:
        weight = state[key]
        first = shared.setdefault(_storage_key(weight), key)
        if first != key:
            modules[key] = modules[first]
            continue
        rows, dim = weight.shape
        module = nn.Embedding(rows, dim, _weight=weight)
        module.requires_grad_(False)
        modules[key] = module
    for key in tables:
        *parents, attr = key[: -len(".weight")].split(".")
        node = root
        for name in parents:
            node = _child(node, name)
        node._modules[attr] = modules[key]
    table_set = set(tables)
    for key, value in state.items():
        if key in table_set:
            continue
        *parents, attr = key.split(".")
        node = root
        for name in parents:
            node = _child(node, name)
        if isinstance(node, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(f"tensor {key!r} lies inside table {'.'.join(parents)!r}")
        node._buffers[attr] = value
    if set(root.state_dict(keep_vars=True)) != set(state):
        odd = sorted(set(state) ^ set(root.state_dict(keep_vars=True)))[:3]
        raise ValueError(f"these checkpoint keys cannot be stored as module names: {odd}")
    return root, modules


@dataclass
class CompressedTable:
    """One compressed table as the command reports it (bytes before = in the checkpoint's dtype)."""

    name: str
    aliases: list[str]
    kind: str
    mode: str | None
    rows: int
    dim: int
    dtype: str
    layout: str
    bits: int
    sparsity: float
    bytes_before: int
    bytes_after: int
    rel_frobenius: float | None
    max_abs_error: float | None

    @property
    def ratio(self) -> float:
        """Bytes after / bytes before."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


def compress_state_dict(
    state: Mapping[str, torch.Tensor],
    tables: Sequence[str],
    *,
    sparsity: float = 0.8,
    block: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    quant: QuantConfig | None = None,
    sparsify_first: bool = True,
    on_table: Callable[[str, int, bool], None] | None = None,
) -> tuple[nn.Module, list[CompressedTable]]:
    """Prune and quantize ``tables`` of ``state``; (skeleton ready for embpress.save, reports).

    Each table goes through :func:`post_training_sparse_quantize` on its own (masks are
    per table in DataNormSparsifier, so this equals one call over all of them), which lets
    ``on_table(name, elements, done)`` report progress.
    """
    root, modules = build_skeleton(state, tables)
    config = quant if quant is not None else QuantConfig()
    sparse_config: dict[str, Any] = {"sparsity_level": sparsity, "sparse_block_shape": tuple(block)}
    if zeros_per_block is not None:
        sparse_config["zeros_per_block"] = zeros_per_block
    names = {id(m): k for k, m in reversed(list(modules.items()))}  # first key of each module
    for module in {id(m): m for m in modules.values()}.values():
        key = names[id(module)]
        elements = state[key].numel()
        if on_table is not None:
            on_table(key[: -len(".weight")], elements, False)
        post_training_sparse_quantize(
            root,
            DataNormSparsifier,
            sparsify_first,
            [module],
            quant=config,
            norm=norm,
            **sparse_config,
        )
        if on_table is not None:
            on_table(key[: -len(".weight")], elements, True)
    reports = []
    for name, (found, aliases) in quantized_modules(root).items():
        qm = cast(QuantizedEmbedding | QuantizedEmbeddingBag, found)
        weight = state[f"{name}.weight"]
        error = qm.error or {}
        reports.append(
            CompressedTable(
                name=name,
                aliases=list(aliases),
                kind="auto",  # embpress.load builds it after the model's module
                mode=None,
                rows=qm.num_embeddings,
                dim=qm.embedding_dim,
                dtype=str(weight.dtype).replace("torch.", ""),
                layout=qm.layout,
                bits=qm.bits,
                sparsity=qm.sparsity,
                bytes_before=weight.numel() * weight.element_size(),
                bytes_after=qm.nbytes,
                rel_frobenius=error.get("rel_frobenius"),
                max_abs_error=error.get("max_abs"),
            )
        )
    return root, reports


# ------------------------------------------------------------------------------ output helpers
def _stdout() -> Console:
    """Rich console on stdout; wide when not a terminal so tables are never squeezed."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, allow_nan=False, default=str))


@contextmanager
def _progress(total_elements: int, enabled: bool) -> Iterator[Callable[[str, int, bool], None]]:
    """A per-table progress display on stderr (when the work is large)."""
    if not enabled or total_elements < PROGRESS_MIN_ELEMENTS:
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
            tasks[name] = progress.add_task(f"compressing {name}", total=elements)
        else:
            progress.update(tasks[name], completed=elements)

    with progress:
        yield update


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


_EXAMPLES = """\b
Examples:
  embpress compress model.pt model.embp.safetensors --sparsity 0.8 --bits 4
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

    Tables lose their least important (1 x 4 by default) blocks, which decode to exactly
    0.0, and keep the rest in 8, 4 or 2-bit row-wise quantization. Files are
    safetensors with an embpress header; nothing is ever unpickled.
    """


# ------------------------------------------------------------------------------ compress
_COMPRESS_EPILOG = """\b
Examples:
  embpress compress dlrm.pt dlrm.embp.safetensors
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


@cli.command(
    epilog=_COMPRESS_EPILOG, short_help="Compress a checkpoint's embedding tables into an embpress file."
)
@click.argument("src", metavar="IN", type=click.Path(path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--sparsity",
    type=_Fraction(),
    default=0.8,
    show_default=True,
    help="Fraction of each table's blocks pruned (smallest norm first), in [0, 1].",
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
    type=click.IntRange(min=0, max=MAX_BLOCK_SIDE * MAX_BLOCK_SIDE),
    metavar="N",
    default=None,
    help="Entries zeroed inside a pruned block (smallest first) [default: the whole block].",
)
@click.option("--norm", type=click.Choice(["L1", "L2"]), default="L1", show_default=True, help="Block norm.")
@click.option(
    "--bits",
    type=click.Choice(["8", "4", "2"]),
    default="8",
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
    type=click.Choice(list(LAYOUTS)),
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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (only JSON on stdout).")
@_boundary
def compress(
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
    as_json: bool,
) -> None:
    """Compress the embedding tables of checkpoint IN into the embpress file OUT.

    IN is a PyTorch state_dict (.pt/.pth, possibly wrapped as {"state_dict": ...} or
    {"model": ...}; loaded with weights_only=True) or a .safetensors file. OUT is one
    .safetensors file holding the compressed tables and every other tensor of IN,
    written atomically.
    """
    if zeros_per_block is not None and zeros_per_block > block[0] * block[1]:
        raise click.BadParameter(
            f"{zeros_per_block} is larger than the block {block[0]}x{block[1]} "
            f"({block[0] * block[1]} entries)",
            param_hint="'--zeros-per-block'",
        )
    table_patterns = _split_patterns(patterns)
    _check_readable(src)
    _check_out(src, dst)
    config = QuantConfig(bits=int(bits), layout=layout, nonfinite=nonfinite)

    state, _ = load_checkpoint(src)
    tables = find_tables(state, table_patterns)
    if not tables:
        raise CliError(
            f"{src}: no embedding table found among {len(state)} tensors "
            "(name them with --tables PATTERN; see 'embpress inspect IN')"
        )
    state = _dense_tables(state, tables, src)
    total = sum(state[k].numel() for k in tables)
    try:
        with _progress(total, True) as on_table:
            root, reports = compress_state_dict(
                state,
                tables,
                sparsity=sparsity,
                block=block,
                zeros_per_block=zeros_per_block,
                norm=norm,
                quant=config,
                sparsify_first=order == "sparsify-first",
                on_table=on_table,
            )
    except ValueError as err:
        message = _one_line(err).replace("pass QuantConfig(nonfinite='zero')", "pass --nonfinite zero")
        raise CliError(_named(message, src)) from None
    try:
        eio.save(root, dst, kind_from_model=True)  # atomic: OUT is replaced only when complete
    except (OSError, SafetensorError, RuntimeError, MemoryError) as err:
        if isinstance(err, OSError) and err.strerror:
            why = err.strerror[:1].lower() + err.strerror[1:]
        else:
            why = "not enough memory" if _out_of_memory(err) else _one_line(err)
        raise CliError(f"{dst}: could not write ({_one_line(why)}); nothing was written") from None

    copied = [k for k in state if k not in set(tables)]
    before = sum(r.bytes_before for r in reports)
    after = sum(r.bytes_after for r in reports)
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
        "tables": [r.as_dict() for r in reports],
        "total": {"bytes_before": before, "bytes_after": after, "ratio": after / before if before else 0.0},
        "copied": {"count": len(copied), "bytes": sum(_tensor_bytes(state[k]) for k in copied)},
        "file_bytes": {"in": src.stat().st_size, "out": dst.stat().st_size},
    }
    if as_json:
        _print_json(summary)
        return
    _print_compress(summary, reports)


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
    same = info is not None and os.path.samestat(info, os.stat(src))
    if same or os.path.realpath(src) == os.path.realpath(dst):
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


def _unstorable(t: torch.Tensor) -> str | None:
    """Why an embpress (safetensors) file cannot hold ``t`` as it is, or None."""
    if t.layout != torch.strided:
        return f"a sparse tensor ({str(t.layout).replace('torch.', '')})"
    if t.is_quantized:
        return "a quantized tensor"
    if t.is_meta:
        return "on the meta device (it holds no values)"
    if not _storable_dtype(t.dtype):
        return f"of dtype {str(t.dtype).replace('torch.', '')}, which safetensors cannot store"
    return None


@functools.cache
def _storable_dtype(dtype: torch.dtype) -> bool:
    try:
        safetensors_save({"t": torch.zeros(1, dtype=dtype)})
    except Exception:
        return False
    return True


def _dense_tables(
    state: Mapping[str, torch.Tensor], tables: Sequence[str], path: object
) -> dict[str, torch.Tensor]:
    """``state`` with its sparse (COO/CSR/...) ``tables`` made dense.

    Refuses a table whose dense form is larger than this machine's memory, and any other
    tensor an embpress file cannot hold (sparse, quantized, meta, or an unstorable dtype).
    """
    out = dict(state)
    dense: dict[int, torch.Tensor] = {}  # tied sparse tables stay tied
    chosen = set(tables)
    for key, t in state.items():
        if key in chosen and t.layout != torch.strided:
            if id(t) not in dense:
                _check_fits(f"{path}: sparse table {key!r} made dense", t.numel() * t.element_size())
                dense[id(t)] = t.to_dense()
            out[key] = dense[id(t)]
        elif key not in chosen and (problem := _unstorable(t)) is not None:
            raise CliError(f"{path}: tensor {key!r} is {problem}, which an embpress file cannot hold")
    return out


def _footed_table(columns: list[tuple[str, str, str]]) -> Table:
    """A rich table with (header, footer, justify) columns."""
    table = Table(show_footer=True)
    for head, foot, justify in columns:
        table.add_column(head, footer=foot, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


def _print_compress(summary: dict[str, Any], reports: list[CompressedTable]) -> None:
    console = _stdout()
    s = summary["settings"]
    title = (
        f"{summary['in']} -> {summary['out']}: sparsity {s['sparsity']:g}, block {s['block'][0]}x"
        f"{s['block'][1]}, {s['bits']} bits, {s['order']}"
    )
    console.print(Text(title))
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
    for r in reports:
        name = Text(r.name + (f" (= {', '.join(r.aliases)})" if r.aliases else ""))
        table.add_row(
            name,
            f"{r.rows} x {r.dim}",
            r.layout,
            str(r.bits),
            f"{r.sparsity:.4f}",
            human_bytes(r.bytes_before),
            human_bytes(r.bytes_after),
            f"{r.ratio:.4f}",
            _fmt(r.rel_frobenius, ".4f"),
            _fmt(r.max_abs_error, ".4g"),
        )
    console.print(table)
    copied, files = summary["copied"], summary["file_bytes"]
    console.print(
        Text(
            f"copied {copied['count']} other tensor(s) unchanged ({human_bytes(copied['bytes'])}); "
            f"wrote {summary['out']} ({human_bytes(files['out'])}, input {human_bytes(files['in'])})"
        )
    )


# ------------------------------------------------------------------------------ inspect
_INSPECT_EPILOG = """\b
Examples:
  embpress inspect model.embp.safetensors
  embpress inspect model.pt            # which tensors compress would take as tables
  embpress inspect model.pt --tables 'emb*' --json
"""


@cli.command(epilog=_INSPECT_EPILOG, short_help="Describe an embpress file or a checkpoint's tables.")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--tables",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="For a plain checkpoint: preview this selection, as 'compress --tables' would take it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (only JSON on stdout).")
@_boundary
def inspect(file: Path, patterns: tuple[str, ...], as_json: bool) -> None:
    """Describe FILE: an embpress file's tables, or a checkpoint's candidate tables.

    For an embpress file: format version, each table's kind, layout, bits, exact
    sparsity, bytes and ratio to float32 (checksums verified), and the other tensors.
    For a plain checkpoint (.pt/.pth/.safetensors): which tensors 'embpress compress'
    would compress as tables and which it would copy.
    """
    table_patterns = _split_patterns(patterns)
    _check_readable(file)
    if _sniff(file) == "safetensors" and _safetensors_metadata(file).get("format") == eio.FORMAT_NAME:
        summary = _inspect_embpress(file)
        if as_json:
            _print_json(summary)
        else:
            _print_inspect_embpress(summary)
        return
    state, fmt = load_checkpoint(file)
    tables = set(find_tables(state, table_patterns))

    def row(key: str) -> dict[str, Any]:
        t = state[key]
        dtype = str(t.dtype).replace("torch.", "")
        if t.layout != torch.strided:
            dtype += f" ({str(t.layout).replace('torch.', '')})"
        return {"key": key, "shape": list(t.shape), "dtype": dtype, "bytes": _tensor_bytes(t)}

    summary = {
        "file": str(file),
        "format": fmt,
        "tables": [row(k) for k in state if k in tables],
        "copied": [row(k) for k in state if k not in tables],
    }
    if as_json:
        _print_json(summary)
    else:
        _print_inspect_plain(summary)


def _inspect_embpress(path: Path) -> dict[str, Any]:
    index, tensors = eio.read_file(path, mmap=True)
    tables = []
    for name, entry in index["tables"].items():
        table = eio.build_table(path, name, entry, tensors)
        error = entry.get("error") or {}
        float_bytes = table.num_embeddings * table.embedding_dim * 4
        tables.append(
            {
                "name": name,
                "aliases": entry["aliases"],
                "kind": entry["kind"],
                "mode": (entry["module"] or {}).get("mode"),
                "rows": table.num_embeddings,
                "dim": table.embedding_dim,
                "layout": table.layout,
                "bits": table.bits,
                "sparsity": table.sparsity,
                "bytes": table.nbytes,
                "float32_bytes": float_bytes,
                "ratio": table.nbytes / float_bytes,
                "rel_frobenius": error.get("rel_frobenius"),
                "max_abs_error": error.get("max_abs"),
            }
        )
    other = [t for k, t in tensors.items() if k.startswith(eio.STATE_PREFIX)]
    stored, float32 = sum(t["bytes"] for t in tables), sum(t["float32_bytes"] for t in tables)
    return {
        "file": str(path),
        "format": eio.FORMAT_NAME,
        "format_version": index["format_version"],
        "file_bytes": path.stat().st_size,
        "tables": tables,
        "total": {"bytes": stored, "float32_bytes": float32, "ratio": stored / float32 if float32 else 0.0},
        "other_tensors": {"count": len(other), "bytes": sum(_tensor_bytes(t) for t in other)},
    }


def _print_inspect_embpress(summary: dict[str, Any]) -> None:
    console = _stdout()
    title = (
        f"{summary['file']}: embpress format version {summary['format_version']}, "
        f"{human_bytes(summary['file_bytes'])}, checksums ok"
    )
    console.print(Text(title))
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
            Text(name),
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
    console.print(Text(f"other tensors: {other['count']} ({human_bytes(other['bytes'])})"))


def _print_inspect_plain(summary: dict[str, Any]) -> None:
    console = _stdout()
    for part, title in (
        ("tables", "compressed as embedding tables"),
        ("copied", "copied unchanged"),
    ):
        rows = summary[part]
        size = human_bytes(sum(r["bytes"] for r in rows))
        console.print(Text(f"{summary['file']} ({summary['format']}): {len(rows)} tensor(s) {title}, {size}"))
        if not rows:
            continue
        table = Table()
        for head, justify in (("key", "left"), ("shape", "right"), ("dtype", "left"), ("bytes", "right")):
            table.add_column(head, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for r in rows:
            shape = " x ".join(str(s) for s in r["shape"]) or "scalar"
            table.add_row(Text(r["key"]), shape, r["dtype"], human_bytes(r["bytes"]))
        console.print(table)
    if not summary["tables"]:
        console.print(Text("no embedding table found by name; choose them with --tables PATTERN"))


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
    result = run_demo(out_dir, seed=seed, quick=quick, console=Console(stderr=True))
    print_results(result, console)


def main() -> None:
    """Console entry point (``embpress``)."""
    cli(prog_name="embpress")


if __name__ == "__main__":
    main()
