"""Checkpoints on disk: read a state_dict safely, pick its embedding tables, compress them, describe files.

The library behind ``embpress compress`` and ``embpress inspect``; Python code calls the
same functions. A checkpoint is a plain PyTorch state_dict (``.pt``/``.pth``, read with
``torch.load(weights_only=True)``, never unpickling arbitrary objects) or a
``.safetensors`` file. :func:`compress_state_dict` rebuilds the state_dict as a skeleton
module (an ``nn.Embedding`` at each table, every other tensor a buffer at its own key)
and runs :func:`embpress.post_training_sparse_quantize` on it; the result is saved with
tables of kind "auto" (a state_dict does not say which table is a bag, so
``embpress.load`` builds each after the model's own module).

Only non-empty regular files no larger than this machine's memory are read: a named pipe
would block, ``/dev/zero`` never ends. Bad input raises ``ValueError`` (``FormatError``
for a damaged embpress file), ``TypeError`` or ``OSError`` with a one-line message that
names the file, key or argument.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import re
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from . import io as eio
from ._collective import LOCAL, Collective
from .api import post_training_sparse_quantize
from .nn import QuantizedEmbedding, QuantizedEmbeddingBag, replaceable_class
from .planner import DEFAULT_UNSEEN_WEIGHT, Plan, PlanError
from .planner import plan as make_plan
from .quant.config import QuantConfig
from .report import CheckpointReport, FileReport, TableReport, TensorInfo, human_bytes, quantized_modules
from .sparsify import DataNormSparsifier
from .usage import Usage, UsageError

__all__ = [
    "CompressedCheckpoint",
    "build_skeleton",
    "check_input_file",
    "compress_checkpoint",
    "compress_state_dict",
    "compressed_checkpoint",
    "find_tables",
    "inspect",
    "inspect_checkpoint",
    "is_embpress_file",
    "is_safetensors_file",
    "load_checkpoint",
    "looks_like_embedding",
    "parse_budget",
    "parse_bytes",
    "plan_checkpoint",
    "plan_state_dict",
    "resolve_budget",
]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
# Uniform defaults (compress_state_dict, `embpress compress`): 4 bits, no pruning. On the
# trained models measured (BENCHMARKS.md) 4-bit rows keep quality at about 1/7 of float32
# bytes, while pruning loses more than fewer bits do at equal bytes.
DEFAULT_BITS = 4
# working memory of a chunked compression (``--memory``), besides the output
DEFAULT_MEMORY = 512 * 2**20
_ZIP_MAGIC = b"PK\x03\x04"
_SUFFIX = ".weight"

PathLike = str | os.PathLike[str]


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
        raise ValueError(
            f"{what} is too large: {human_bytes(nbytes)}, more than this machine's memory "
            f"({human_bytes(limit)})"
        )


_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_input_file(path: PathLike, *, fits: bool = True, expected: str = "a checkpoint file") -> None:
    """Refuse ``path`` unless it is a non-empty regular file that fits in memory (``fits``;
    a file read in chunks need not). ``expected``: what the file should be, for the messages.

    Anything else is never opened (a named pipe would block, /dev/zero never ends):
    FileNotFoundError, IsADirectoryError, PermissionError, or ValueError saying why.
    """
    p = Path(path)
    try:
        info = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such file") from None
    except OSError as err:
        raise OSError(f"{p}: cannot read ({err.strerror or 'unknown error'})") from None
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(f"{p}: is a directory, expected {expected}")
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
        raise ValueError(f"{p}: not a regular file ({kind}), expected {expected}")
    if info.st_size == 0:
        raise ValueError(f"{p}: the file is empty")
    if fits:
        _check_fits(str(p), info.st_size)
    with open(p, "rb"):  # PermissionError says why
        pass


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("unable to mmap", "Cannot allocate memory", "can't allocate memory")
    )


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
        # numpy: a read-only map, which works for a file beyond RAM + swap (torch's does not)
        with safe_open(str(path), framework="numpy") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({_safetensors_cause(err)})") from None


def is_safetensors_file(path: PathLike) -> bool:
    """Whether ``path`` is a plain safetensors checkpoint (checked as an input file first)."""
    p = Path(path)
    check_input_file(p, fits=False)
    return _sniff(p) == "safetensors" or p.suffix == ".safetensors"


def is_embpress_file(path: PathLike) -> bool:
    """Whether ``path`` says it is an embpress file (its safetensors header's format).

    Only the header is read; :func:`inspect` validates the rest. A file that starts as a
    safetensors file but whose header cannot be read raises ValueError.
    """
    p = Path(path)
    check_input_file(p)
    return _sniff(p) == "safetensors" and _safetensors_metadata(p).get("format") == eio.FORMAT_NAME


def _torch_load(path: Path, kind: str) -> Any:
    """``torch.load(weights_only=True)`` with errors said in one line (mmap for zip files)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as err:  # torch raises many types for a bad file; all mean the same here
        text = str(err)
        if "allowed global" in text or "unsupported global" in text.lower():
            raise ValueError(
                f"{path}: refused: the checkpoint holds Python objects that a weights-only load does "
                "not unpickle (save the model's state_dict() instead)"
            ) from None
        if _out_of_memory(err):
            why = "too large to read into memory"
        elif isinstance(err, RecursionError):
            why = "nested too deeply"
        else:
            why = "damaged, or not written by torch.save" if kind == "zip" else "unrecognized contents"
        raise ValueError(f"{path}: not a PyTorch checkpoint or safetensors file ({why})") from None


def _is_state(d: Any) -> bool:
    return (
        isinstance(d, Mapping)
        and len(d) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
    )


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``obj``: itself, or under 'state_dict' / 'model' / 'model_state_dict'."""
    if _is_state(obj):
        return {k: v.detach() for k, v in obj.items()}
    expected = f"expected a dict of tensors, possibly under {' / '.join(repr(k) for k in _WRAPPER_KEYS)}"
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state(obj.get(key)):
                return {k: v.detach() for k, v in obj[key].items()}
        if not obj:
            raise ValueError(f"{path}: the checkpoint is empty")
        # name the first entry that is not a tensor: of the wrapped dict if there is one
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        state, under = (obj, "") if inner is None else (obj[inner], f" (under {inner!r})")
        for k, v in state.items():
            if not isinstance(k, str):
                raise ValueError(
                    f"{path}: not a state_dict: key {k!r}{under} is {type(k).__name__}, not a string "
                    f"({expected})"
                )
            if not isinstance(v, torch.Tensor):
                raise ValueError(
                    f"{path}: not a state_dict: entry {k!r}{under} is {type(v).__name__}, not a tensor "
                    f"({expected}; drop the other entries)"
                )
    raise ValueError(f"{path}: not a state_dict ({expected}; got {type(obj).__name__})")


def load_checkpoint(path: PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, format) of a ``.pt``/``.pth`` state_dict or a plain ``.safetensors`` file.

    ``format`` is "pytorch" or "safetensors". A ``.pt``/``.pth`` file may hold the
    state_dict itself or under 'state_dict', 'model' or 'model_state_dict'. Never unpickles
    arbitrary objects (``weights_only=True``) and reads only a regular file no larger than
    this machine's memory (see :func:`check_input_file`). An embpress file is refused: its
    tables are already compressed. Sparse tensors are returned as they are
    (:func:`compress_state_dict` makes sparse tables dense).
    """
    p = Path(path)
    check_input_file(p)
    kind = _sniff(p)
    if kind == "safetensors" or p.suffix == ".safetensors":
        if _safetensors_metadata(p).get("format") == eio.FORMAT_NAME:
            raise ValueError(f"{p}: already an embpress file (see 'embpress inspect {p}')")
        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
            raise ValueError(f"{p}: not a readable safetensors file ({_safetensors_cause(err)})") from None
        if not tensors:
            raise ValueError(f"{p}: the file holds no tensors")
        return tensors, "safetensors"
    state = _unwrap(_torch_load(p, kind), p)
    for key, t in state.items():
        if t.is_nested:
            raise ValueError(f"{p}: tensor {key!r} is a nested tensor, which embpress cannot read")
    return state, "pytorch"


# ------------------------------------------------------------------------------ choosing tables
def looks_like_embedding(module_path: str) -> bool:
    """Whether a module path names an embedding (``emb1``, ``word_embeddings``, ``wte``,
    ``embedding_bags.3``..., and ``shared``, the token table of Hugging Face's
    encoder-decoder models: T5, BART, Pegasus, M2M100, whose safetensors files hold it
    alone; not ``tables.3``, which ``--tables`` picks).

    The last component decides; a numeric one (a ModuleList index) defers to its parent.
    """
    parts = module_path.lower().split(".")
    last = parts[-1]
    if last.isdigit() and len(parts) > 1:
        last = parts[-2]
    return "emb" in last or last in ("wte", "wpe", "shared")


def _module_path(key: str) -> str | None:
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) and len(key) > len(_SUFFIX) else None


def _table_problem(state: Mapping[str, torch.Tensor], key: str, path: str) -> str | None:
    """Why ``key`` cannot be compressed as a table, or None."""
    t = state[key]
    if t.dim() != 2:
        return f"is not a 2-D table (shape {tuple(t.shape)})"
    if not t.is_floating_point():
        return f"is not a float table (dtype {_dtype_name(t.dtype)})"
    if t.shape[0] == 0 or t.shape[1] == 0:
        return f"is empty (shape {tuple(t.shape)})"
    others = [k for k in state if k.startswith(path + ".") and k != key]
    if others:
        return f"is not an embedding: its module {path!r} also holds {others[0]!r}"
    if path in state:  # (no module holds a tensor named as itself)
        return f"is not an embedding: a tensor is named {path!r}, as its module"
    if any(not part for part in path.split(".")):
        return "has an empty component in its name"
    return None


def _tied_keys(state: Mapping[str, torch.Tensor]) -> dict[tuple[Any, ...], list[str]]:
    """The keys of each tensor held under several keys (tied weights), by storage."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            groups.setdefault(eio.view_key(value), []).append(key)
    return {k: keys for k, keys in groups.items() if len(keys) > 1}


def _is_table(state: Mapping[str, Any], key: str) -> bool:
    """Whether ``key`` is found as a table by name: an embedding-like module's 2-D float
    ``.weight`` that its module holds alone."""
    path = _module_path(key)
    return path is not None and looks_like_embedding(path) and _table_problem(state, key, path) is None


def _untied_from_others(
    state: Mapping[str, torch.Tensor], found: list[str], kept: Mapping[str, tuple[str, str]]
) -> list[str]:
    """``found`` without the tables tied to a tensor that is not one of them (a language
    model's output head, ``lm_head.weight``, tied to its token table), nor those that a
    Hugging Face model folder says to keep float (``kept``, each with its reason: a head
    tied to a table the file holds alone, a module with its own forward): compressing a
    tied table would add its codes beside the float copy and untie the two, and ``load``
    refuses to put a table in place of a module with its own forward. A warning names
    them; naming the table in ``patterns`` compresses it anyway."""
    chosen = set(found)
    left: list[str] = []
    for keys in _tied_keys(state).values():
        others = [k for k in keys if k not in chosen]
        if others and len(others) < len(keys):
            tables = [k for k in keys if k in chosen]
            chosen -= set(tables)
            left.append(f"{', '.join(tables)} (tied to {', '.join(others)})")
    for key in [k for k in found if k in chosen and k in kept]:
        chosen.discard(key)
        left.append(f"{key} ({kept[key][0]})")
    if left:
        warnings.warn(
            "left float, where a compressed module cannot serve (an output head tied to a "
            "table keeps computing with it; a module with its own forward refuses one): "
            + "; ".join(left)
            + "; select them with --tables / tables= to compress them anyway",
            stacklevel=3,
        )
    return [k for k in found if k in chosen]


def _with_tied(
    state: Mapping[str, Any], chosen: Sequence[str], kept: Mapping[str, tuple[str, str]]
) -> list[str]:
    """``chosen`` (selected by name) with the embedding tables tied to one of them: the
    same table under another module's name, compressed with it as one (a model's modules
    on that weight then share the compressed module), in the order of ``state``. A chosen
    table tied to a tensor of another kind (an output head), or one a Hugging Face model
    folder says to keep float (``kept``: why, and what the result then lacks), is
    compressed as asked, with a warning saying what the result lacks."""
    keys = set(chosen)
    broken: list[str] = []
    for group in _tied_keys(state).values():
        if keys.isdisjoint(group):
            continue
        keys.update(k for k in group if _is_table(state, k))
        others = [k for k in group if k not in keys]
        if others:
            tables = ", ".join(k for k in group if k in keys)
            broken.append(
                f"{tables} (tied to {', '.join(others)}, which stays float: the file holds both, "
                "and a model that ties them loads it only once they are untied)"
            )
    broken += [f"{k} ({kept[k][0]}: {kept[k][1]})" for k in state if k in keys and k in kept]
    if broken:
        warnings.warn("compressed as selected: " + "; ".join(broken), stacklevel=3)
    return [k for k in state if k in keys]


# what compressing a table that a model folder says to keep float leaves
_NO_HEAD = "the file holds no float weight for that head, so a model built from that config does not load it"
_REFUSED = "embpress.load refuses to put a table in that module's place"
# model classes whose output head Hugging Face ties to the token table (tie_word_embeddings),
# where transformers cannot say itself
_HEAD_CLASSES = (
    "LMHead",
    "ForCausalLM",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForPreTraining",
    "DoubleHeads",
    "MTModel",
)
_CONFIG_MAX = 4 << 20  # bytes of a config.json read at most
# module names of position and type tables, which a token table's row count may match
_NOT_TOKENS = re.compile(r"pos|wpe|type", re.IGNORECASE)


def _has_head(model_class: object) -> bool:
    """Whether a Hugging Face model class name is one with a head tied to its token table."""
    return isinstance(model_class, str) and any(h in model_class for h in _HEAD_CLASSES)


def _config_kept(source: PathLike, state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """The tables of ``state`` that a Hugging Face ``config.json`` beside the file
    ``source`` says to keep float, each with its reason and what compressing it anyway
    leaves: the token table where the model
    ties its output head to it (``save_pretrained`` writes the pair once, under the
    table's name, so only the config says it), and tables of modules with their own
    forward (learned position tables with an offset). Where ``transformers`` is installed
    the model is built from the config on the meta device and asked; otherwise the config
    is read: ``tie_word_embeddings`` true (the default), a model class with such a head,
    and the table with ``vocab_size`` rows (a position or type table only where no other
    matches). A config that cannot be read says nothing."""
    path = Path(source).parent / "config.json"
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > _CONFIG_MAX:
            return {}
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(config, dict) or "model_type" not in config:
        return {}
    tied = (f"tied to the output head by {path} (tie_word_embeddings)", _NO_HEAD)
    facts = _model_facts(str(path), info.st_mtime_ns, info.st_size)
    if facts is not None:
        head_tied, own_forward = facts
        kept = {
            k: (f"its module is a {own_forward[k]} with its own forward ({path})", _REFUSED)
            for k in state
            if k in own_forward
        }
        kept |= {k: tied for k in state if k in head_tied}
        return kept
    classes = config.get("architectures")
    if isinstance(classes, list) and classes and not any(_has_head(c) for c in classes):
        return {}
    tie = config.get("tie_word_embeddings", True)
    vocab: set[int] = set()
    for part in (config, config.get("text_config")):
        if isinstance(part, dict) and part.get("tie_word_embeddings", tie) is True:
            size = part.get("vocab_size")
            if type(size) is int:
                vocab.add(size)
    sized = [k for k, v in state.items() if _is_table(state, k) and v.shape[0] in vocab]
    tokens = [k for k in sized if not _NOT_TOKENS.search(k.rsplit(".", 2)[-2])]
    return {k: tied for k in (tokens or sized)}


@functools.lru_cache(maxsize=8)
def _model_facts(config: str, mtime_ns: int, size: int) -> tuple[frozenset[str], dict[str, str]] | None:
    """For the Hugging Face ``config.json`` at ``config`` (its time and size key the cache):
    the weight names of the token table where the model's output head is tied to it, and
    the class of each embedding module with its own forward, by weight name; from the
    model built on the meta device. None where transformers is not installed or cannot
    build the model (an unknown class, code of its own)."""
    import logging

    try:
        import transformers
    except Exception:  # not installed, or broken: the config is read instead
        return None
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings = transformers.AutoConfig.from_pretrained(str(Path(config).parent))
            names = getattr(settings, "architectures", None) or []
            cls = getattr(transformers, names[0], None) if names else None
            if cls is None:
                return None
            with torch.device("meta"):
                model = cls(settings)
    except Exception:  # whatever keeps transformers from building it: the config is read instead
        return None
    finally:
        logger.setLevel(level)
    tables = [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    ]
    head = model.get_output_embeddings()
    tokens = model.get_input_embeddings()
    weight = getattr(tokens, "weight", None)
    head_tied: frozenset[str] = frozenset()
    if weight is not None and getattr(head, "weight", None) is weight:
        head_tied = frozenset(f"{name}.weight" for name, m in tables if m.weight is weight)
    own_forward = {f"{name}.weight": type(m).__name__ for name, m in tables if not replaceable_class(type(m))}
    return head_tied, own_forward


def _check_state_types(state: Any) -> None:
    """TypeError unless ``state`` is a mapping of str keys to tensors (a state_dict)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict of tensors (a state_dict), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state must map str keys to tensors; {key!r} maps to {type(value).__name__}")


def find_tables(
    state: Mapping[str, torch.Tensor], patterns: Sequence[str] = (), *, source: PathLike | None = None
) -> list[str]:
    """The keys of ``state`` compressed as tables, in the order of ``state``.

    Without ``patterns``: every ``<module>.weight`` whose module name looks like an
    embedding (:func:`looks_like_embedding`) and that is a 2-D float tensor, except
    those tied to another kind of tensor (an output head: they stay float). With
    ``patterns`` (fnmatch globs on the key or on the module path): exactly the matched
    ``.weight`` tensors, each of which must be a 2-D float table (ValueError otherwise),
    and the embedding tables tied to them (one table under several names).

    ``source``: the file ``state`` was read from. Where a Hugging Face ``config.json``
    beside it ties the token table to an output head (``tie_word_embeddings``; the file
    then holds the table alone), that table counts as tied to the head.
    """
    _check_state_types(state)
    if isinstance(patterns, str):
        raise TypeError(f"patterns must be a list of globs, got the string {patterns!r}")
    candidates = {k: p for k in state if (p := _module_path(k)) is not None}
    kept = {} if source is None else _config_kept(source, state)
    if not patterns:
        found = [k for k in candidates if _is_table(state, k)]
        return _untied_from_others(state, found, kept)
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
    return _with_tied(state, chosen, kept)


# ------------------------------------------------------------------------------ compressing
def _dtype_name(value: torch.dtype | torch.layout) -> str:
    """'float32' for torch.float32, 'sparse_coo' for torch.sparse_coo."""
    return str(value).replace("torch.", "")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _stored(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(count, bytes) of the tensors a file stores for ``tensors``: keys that are one
    tensor's data (tied weights) are stored once."""
    distinct = {eio.view_key(t): t for t in tensors.values()}
    return len(distinct), sum(_nbytes(t) for t in distinct.values())


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
    may have an EmbeddingBag there); tied tables (the same storage) share one module,
    which embpress then saves once with aliases. Every other tensor is a buffer at its
    own key. Returns (skeleton, table key -> embedding module).
    """
    root = nn.Module()
    modules: dict[str, nn.Module] = {}
    shared: dict[tuple[Any, ...], str] = {}
    for key in tables:
        weight = state[key]
        first = shared.setdefault(eio.view_key(weight), key)
        if first != key:
            modules[key] = modules[first]
            continue
        rows, dim = weight.shape
        module = nn.Embedding(rows, dim, _weight=weight)
        module.requires_grad_(False)
        modules[key] = module
    for key in tables:
        *parents, attr = key[: -len(_SUFFIX)].split(".")
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


def _dense_tables(state: Mapping[str, torch.Tensor], tables: Sequence[str]) -> dict[str, torch.Tensor]:
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
                _check_fits(f"sparse table {key!r} made dense", _nbytes(t))
                dense[id(t)] = t.to_dense()
            out[key] = dense[id(t)]
        elif key not in chosen and (problem := eio.unstorable(t)) is not None:
            raise ValueError(f"tensor {key!r} is {problem}, which an embpress file cannot hold")
    return out


def _checked_state(state: Any, tables: Sequence[str] | None) -> list[str]:
    """The table keys to compress (``tables``, or those :func:`find_tables` finds), checked."""
    _check_state_types(state)
    if tables is None:
        keys = find_tables(state)
        if not keys:
            raise ValueError(
                f"no embedding table found among {len(state)} tensors "
                "(name them with tables=[...] or find_tables(state, patterns))"
            )
        return keys
    if isinstance(tables, str) or not isinstance(tables, Sequence):
        raise TypeError(f"tables must be a list of state_dict keys, got {type(tables).__name__}")
    if not tables:
        raise ValueError("tables is empty: name at least one '<module>.weight' key")
    for key in tables:
        if key not in state:
            raise ValueError(f"table {key!r} is not a key of the state_dict")
        path = _module_path(key)
        problem = "is not a '<module>.weight' tensor" if path is None else _table_problem(state, key, path)
        if problem is not None:
            raise ValueError(f"selected tensor {key!r} {problem}")
    return _with_tied(state, tables, {})  # state's order, as find_tables gives


@dataclass
class CompressedCheckpoint:
    """What :func:`compress_state_dict` made: a module ready to save, a report per table
    (kind "auto", shared tables once), the keys copied unchanged and the plan applied
    (None for uniform settings)."""

    module: nn.Module
    tables: list[TableReport]
    copied: list[str]
    copied_nbytes: int  # of the tensors the file stores for them (tied keys share one)
    plan: Plan | None = None  # the plan applied, where one was
    # the file the tables were written to chunk by chunk, by one process or several
    # (then ``module`` holds no table)
    written: Path | None = None
    copied_stored: int | None = None  # tensors the file stores for ``copied`` (None: one each)

    @property
    def copied_count(self) -> int:
        """How many tensors the file stores for the copied keys (tied keys share one)."""
        return len(self.copied) if self.copied_stored is None else self.copied_stored

    @property
    def nbytes(self) -> int:
        """Bytes of every compressed table."""
        return sum(t.nbytes for t in self.tables)

    @property
    def original_nbytes(self) -> int:
        """Bytes of the same tables in the checkpoint (in their own dtype)."""
        return sum(t.original_nbytes or 0 for t in self.tables)

    def save(self, path: PathLike) -> None:
        """Write the embpress file atomically (``path`` is replaced only when complete)."""
        if self.written is not None:
            raise ValueError(f"the tables were written to {self.written} chunk by chunk; none is held here")
        eio.save(self.module, path, kind_from_model=True)


# ------------------------------------------------------------------------------ budgets and plans
_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_BUDGET = re.compile(r"\s*([0-9]{1,30}(?:\.[0-9]{1,30})?)\s*([A-Za-z]{0,3})\s*")
_SHARE = re.compile(r"\s*([0-9]{1,30})\s*/\s*([0-9]{1,30})\s*")

Budget = int | Fraction


def parse_budget(text: str) -> Budget:
    """A byte budget from text: ``20MB``, ``1.5 GB``, ``512kB`` (decimal units), ``64KiB``,
    ``2 MiB`` (binary units), ``123456`` or ``123456B`` (bytes) as an int (see
    :func:`parse_bytes`); or ``1/16``, a share of the selected tables' float32 bytes, as a
    Fraction in (0, 1]. ValueError saying what is accepted otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"budget must be a string, got {type(text).__name__}")
    share = _SHARE.fullmatch(text)
    if share:
        num, den = int(share[1]), int(share[2])
        if den == 0 or num == 0 or num > den:
            shown = _shown_text(text)
            raise ValueError(f"{shown!r}: a share of the float32 bytes must be in (0, 1], e.g. 1/16")
        return Fraction(num, den)
    return parse_bytes(text, "budget", ", or a share of the float32 table bytes, e.g. 1/16")


def parse_bytes(text: str, what: str = "size", alternative: str = "", minimum: int = 1) -> int:
    """A whole number of bytes, ``minimum`` to 2**63 - 1, from text: a decimal number with
    an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB; the case of a unit's letters
    does not matter). ValueError naming ``what`` otherwise (``alternative``: what else the
    caller takes, for the message)."""
    shown = _shown_text(text)
    match = _BUDGET.fullmatch(text)
    unit = match[2].lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{shown!r} is not a {what}: expected bytes with an optional unit (B, kB, MB, GB, KiB, "
            f"MiB, GiB), e.g. 20MB{alternative}"
        )
    try:
        value = Decimal(match[1]) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise ValueError(f"{shown!r} is not a number of bytes") from None
    if value != value.to_integral_value():
        raise ValueError(f"{shown!r} is not a whole number of bytes")
    if value < max(minimum, 1):
        raise ValueError(f"{shown!r}: the {what} must be at least {_least(max(minimum, 1))}")
    if value > _MAX_BYTES:  # what a file offset (and the planner's budget) can hold
        raise ValueError(f"{shown!r}: the {what} must be at most {_MAX_BYTES} bytes (8 EiB)")
    return int(value)


_MAX_BYTES = 2**63 - 1


def _least(n: int) -> str:
    """``n`` bytes as a minimum reads: in MiB where whole, else in bytes."""
    if n % 2**20 == 0:
        return f"{n >> 20} MiB"
    return "1 byte" if n == 1 else f"{n} bytes"


def _shown_text(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:37]}..."


def resolve_budget(budget: Budget, float32_nbytes: int) -> int:
    """Bytes of ``budget``: an int as it is, a Fraction as that share of ``float32_nbytes``
    (rounded down)."""
    if isinstance(budget, Fraction):
        if not 0 < budget <= 1:
            raise ValueError(f"a budget share must be in (0, 1], got {budget}")
        return max(1, int(budget * float32_nbytes))
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int (bytes) or a Fraction (share), got {type(budget).__name__}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    return budget


def _float32_nbytes(modules: Mapping[str, nn.Module]) -> int:
    """float32 bytes of the distinct table modules (tied tables once)."""
    unique = {id(m): m for m in modules.values()}.values()
    return sum(int(getattr(m, "num_embeddings")) * int(getattr(m, "embedding_dim")) * 4 for m in unique)  # noqa: B009


def _usage_for(
    usage: Usage | None, modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor]
) -> Usage | None:
    """``usage`` restricted to the tables being planned (a usage file recorded on the whole
    model also counts tables a ``--tables`` selection leaves out). UsageError when it counts
    a table the checkpoint does not have (``<name>.weight``, a 2-D tensor) or another
    number of rows than the checkpoint's, planned or not, as :func:`embpress.plan`
    refuses usage that does not match the model."""
    if usage is None:
        return None
    if not isinstance(usage, Usage):
        raise TypeError(f"usage must be an embpress.Usage, got {type(usage).__name__}")
    unknown = [n for n in usage.counts if getattr(state.get(n + _SUFFIX), "ndim", None) != 2]
    if unknown:
        raise UsageError(f"usage names tables the checkpoint does not have: {', '.join(sorted(unknown))}")
    for name, counts in usage.counts.items():
        rows, given = state[name + _SUFFIX].shape[0], counts.numel()
        if given != rows:
            raise UsageError(f"table {name!r}: usage has {given} rows, the checkpoint's table {rows}")
    names = [k[: -len(_SUFFIX)] for k in modules]
    return Usage({n: usage.counts[n] for n in names if n in usage.counts})


def plan_state_dict(
    state: Mapping[str, torch.Tensor],
    tables: Sequence[str] | None = None,
    *,
    budget: Budget | None = None,
    max_error: float | None = None,
    usage: Usage | None = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    codecs: Sequence[str] | None = None,
) -> Plan:
    """The :func:`embpress.plan` of a state_dict's embedding tables.

    ``tables`` as in :func:`compress_state_dict`; ``budget``: bytes (int) or a share of
    the tables' float32 bytes (Fraction), covering those tables alone; or ``max_error``.
    ``codecs``: the codec names to choose from (default: all, see :func:`embpress.plan`).
    Table names in the plan (and in ``usage``) are the module paths, the keys without
    ``.weight``.
    """
    keys = _checked_state(state, tables)
    dense = _dense_tables(state, keys)
    root, modules = build_skeleton(dense, keys)
    budget_bytes = None if budget is None else resolve_budget(budget, _float32_nbytes(modules))
    return make_plan(
        root,
        budget_bytes,
        usage=_usage_for(usage, modules, state),
        max_error=max_error,
        unseen_weight=unseen_weight,
        codecs=codecs,
    )


def plan_checkpoint(
    src: PathLike,
    patterns: Sequence[str] = (),
    *,
    budget: Budget | None = None,
    max_error: float | None = None,
    usage: Usage | None = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    codecs: Sequence[str] | None = None,
) -> Plan:
    """The plan for checkpoint ``src``'s tables (what ``embpress plan`` prints): as
    :func:`compress_checkpoint` finds them (``patterns``), see :func:`plan_state_dict`."""
    state, _ = load_checkpoint(src)
    try:
        keys = find_tables(state, patterns, source=src)
        if not keys:
            raise ValueError(
                f"no embedding table found among {len(state)} tensors (choose them with patterns)"
            )
        return plan_state_dict(
            state,
            keys,
            budget=budget,
            max_error=max_error,
            usage=usage,
            unseen_weight=unseen_weight,
            codecs=codecs,
        )
    except UsageError:
        raise  # about the usage, not the checkpoint: its caller names the usage's source
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err


def _check_plan_options(
    planned: bool, plan: Plan | None, codecs: Sequence[str] | None, usage: Usage | None, unseen_weight: float
) -> None:
    """Refuse the planner's options where no plan is made (they would be ignored)."""
    if codecs is not None and (plan is not None or not planned):
        raise ValueError("codecs= is for making a plan: give it with budget= or max_error=")
    if not planned and (usage is not None or unseen_weight != DEFAULT_UNSEEN_WEIGHT):
        raise ValueError(
            "usage= and unseen_weight= are for planning: give them with budget=, max_error= or plan="
        )


def _plan_keys(state: Mapping[str, torch.Tensor], the_plan: Plan) -> list[str]:
    """The state_dict keys of a plan's tables (each must be there), with the keys of the
    embedding tables tied to them (the same storage; not an output head's), in the
    state_dict's order."""
    if not isinstance(the_plan, Plan):
        raise TypeError(f"plan must be an embpress.Plan, got {type(the_plan).__name__}")
    storages: dict[Any, str] = {}
    for t in the_plan.tables:
        key = f"{t.name}{_SUFFIX}"
        if key not in state:
            raise PlanError(f"the plan names table {t.name!r}, but the checkpoint has no tensor {key!r}")
        if isinstance(state[key], torch.Tensor):
            first = storages.setdefault(eio.view_key(state[key]), t.name)
            if first != t.name:
                raise PlanError(
                    f"the plan names {first!r} and {t.name!r} as two tables, but the checkpoint "
                    "ties them (one tensor): make the plan from this checkpoint"
                )
    named = {f"{t.name}{_SUFFIX}" for t in the_plan.tables}

    def tied_table(k: str, v: Any) -> bool:  # an embedding table tied to a planned one
        return isinstance(v, torch.Tensor) and eio.view_key(v) in storages and _is_table(state, k)

    return [k for k, v in state.items() if k in named or tied_table(k, v)]


# ------------------------------------------------------------------------------ compressing
def compress_state_dict(
    state: Mapping[str, torch.Tensor],
    tables: Sequence[str] | None = None,
    *,
    sparsity: float = 0.0,
    block: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    quant: QuantConfig | None = None,
    sparsify_first: bool = True,
    on_table: Callable[[str, int, bool], None] | None = None,
    plan: Plan | None = None,
    budget: Budget | None = None,
    max_error: float | None = None,
    usage: Usage | None = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    codecs: Sequence[str] | None = None,
) -> CompressedCheckpoint:
    """Prune and quantize the embedding tables of a state_dict; everything else is copied.

    ``tables``: the keys to compress (``<module>.weight`` 2-D float tensors), or None for
    those :func:`find_tables` finds by name. Sparse (COO/CSR) tables are made dense; a
    tensor an embpress file cannot hold (sparse, quantized, meta) is refused. Tied tables
    (one storage) are compressed once and saved with aliases.

    Uniform settings: those of :class:`embpress.DataNormSparsifier` (``sparsity``,
    ``block``, ``zeros_per_block``, ``norm``) and :class:`embpress.QuantConfig`
    (``quant``); by default 4 bits and no pruning. Each table goes through
    :func:`embpress.post_training_sparse_quantize` on its own (masks are per table, so
    this equals one call over all of them).

    Planned: with ``budget`` (bytes, or a Fraction of the tables' float32 bytes) or
    ``max_error``, :func:`plan_state_dict` chooses each row's storage (``usage``,
    ``unseen_weight``, ``codecs`` as there) and the plan is applied; with ``plan``, that plan is
    applied to its tables (``tables`` must then be None; ``usage``: the one it was made
    with, if any, see :meth:`Plan.apply`). The uniform settings do not apply then.

    ``on_table(name, elements, done)`` reports progress. ``state`` is not changed.
    """
    planned = plan is not None or budget is not None or max_error is not None
    if plan is not None and (budget is not None or max_error is not None or tables is not None):
        raise ValueError("plan= applies a plan made earlier: give no tables, budget or max_error with it")
    _check_plan_options(planned, plan, codecs, usage, unseen_weight)
    keys = _checked_state(state, tables if plan is None else _plan_keys(state, plan))
    dense = _dense_tables(state, keys)
    root, modules = build_skeleton(dense, keys)
    names = {id(m): k for k, m in reversed(list(modules.items()))}  # first key of each module
    if planned:
        if plan is None:
            budget_bytes = None if budget is None else resolve_budget(budget, _float32_nbytes(modules))
            plan = make_plan(
                root,
                budget_bytes,
                usage=_usage_for(usage, modules, state),
                max_error=max_error,
                unseen_weight=unseen_weight,
                codecs=codecs,
            )
        _apply_plan(root, plan, dense, _usage_for(usage, modules, state), on_table)
    else:
        _compress_uniform(
            root,
            modules,
            names,
            dense,
            sparsity,
            block,
            zeros_per_block,
            norm,
            quant,
            sparsify_first,
            on_table,
        )
    chosen = set(keys)
    copied = {k: v for k, v in dense.items() if k not in chosen}
    return compressed_checkpoint(root, dense, copied, plan)


def _table_report(
    name: str,
    meta: Mapping[str, Any],
    nbytes: int,
    error: Mapping[str, float] | None,
    weight: torch.Tensor,
    aliases: Sequence[str] = (),
) -> TableReport:
    """The report of one compressed table of a checkpoint, from its layout's ``meta``
    (kind "auto": ``embpress.load`` builds it after the model's module); ``weight``: the
    original table (a meta tensor will do), for its dtype and bytes."""
    error = error or {}
    rows, dim = int(meta["num_embeddings"]), int(meta["embedding_dim"])
    return TableReport(
        name=name,
        kind="auto",
        rows=rows,
        dim=dim,
        layout=str(meta["layout"]),
        bits=int(meta["bits"]),
        sparsity=int(meta["num_pruned"]) / (rows * dim) if rows * dim else 0.0,
        nbytes=nbytes,
        float_nbytes=rows * dim * 4,
        rel_frobenius=error.get("rel_frobenius"),
        max_abs_error=error.get("max_abs"),
        aliases=tuple(aliases),
        mode=None,
        dtype=_dtype_name(weight.dtype),
        original_nbytes=_nbytes(weight),
    )


def compressed_checkpoint(
    root: nn.Module,
    weights: Mapping[str, torch.Tensor],
    copied: Mapping[str, torch.Tensor],
    plan: Plan | None = None,
) -> CompressedCheckpoint:
    """The result of compressing the tables of skeleton ``root``: a report per table
    (``weights``: the original tables by key, for their dtype and bytes; meta tensors will
    do) and the keys copied unchanged."""
    reports = []
    for name, (found, aliases) in quantized_modules(root).items():
        qm = cast(QuantizedEmbedding | QuantizedEmbeddingBag, found)
        meta = qm.table.meta()
        reports.append(_table_report(name, meta, qm.nbytes, qm.error, weights[f"{name}{_SUFFIX}"], aliases))
    count, nbytes = _stored(copied)
    return CompressedCheckpoint(root, reports, list(copied), nbytes, plan, copied_stored=count)


def written_checkpoint(
    path: PathLike,
    weights: Mapping[str, torch.Tensor],
    tables: Sequence[tuple[str, dict[str, Any], int, dict[str, float]]],
    copied: Mapping[str, torch.Tensor],
) -> CompressedCheckpoint:
    """The report of a file written chunk by chunk (``assemble.write_parts``), by one
    process or several: ``tables`` gives each table's name, joined meta, bytes and error;
    no table is held."""
    reports = [
        _table_report(name, meta, nbytes, error, weights[f"{name}{_SUFFIX}"])
        for name, meta, nbytes, error in tables
    ]
    count, nbytes = _stored(copied)
    return CompressedCheckpoint(
        nn.Module(), reports, list(copied), nbytes, written=Path(path), copied_stored=count
    )


def _apply_plan(
    root: nn.Module,
    the_plan: Plan,
    dense: Mapping[str, torch.Tensor],
    usage: Usage | None,
    on_table: Callable[[str, int, bool], None] | None,
) -> None:
    """Apply ``the_plan`` to the skeleton one table at a time (for progress; the skeleton is
    thrown away if one fails, so all-or-nothing per table is enough)."""
    for table in the_plan.tables:
        elements = dense[f"{table.name}{_SUFFIX}"].numel()
        if on_table is not None:
            on_table(table.name, elements, False)
        one = Plan(
            (table,), the_plan.budget_bytes, the_plan.max_error, the_plan.unseen_weight, the_plan.with_usage
        )
        one.apply(root, usage)
        if on_table is not None:
            on_table(table.name, elements, True)


def _compress_uniform(
    root: nn.Module,
    modules: Mapping[str, nn.Module],
    names: Mapping[int, str],
    dense: Mapping[str, torch.Tensor],
    sparsity: float,
    block: tuple[int, int],
    zeros_per_block: int | None,
    norm: str,
    quant: QuantConfig | None,
    sparsify_first: bool,
    on_table: Callable[[str, int, bool], None] | None,
) -> None:
    config = quant if quant is not None else QuantConfig(bits=DEFAULT_BITS)
    sparse_config: dict[str, Any] = {"sparsity_level": sparsity, "sparse_block_shape": tuple(block)}
    if zeros_per_block is not None:
        sparse_config["zeros_per_block"] = zeros_per_block
    for module in {id(m): m for m in modules.values()}.values():
        key = names[id(module)]
        elements = dense[key].numel()
        if on_table is not None:
            on_table(key[: -len(_SUFFIX)], elements, False)
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
            on_table(key[: -len(_SUFFIX)], elements, True)


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether paths ``a`` and ``b`` name one file (links followed; a missing one names
    none but itself)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def compress_checkpoint(
    src: PathLike,
    dst: PathLike,
    patterns: Sequence[str] = (),
    *,
    sparsity: float = 0.0,
    block: tuple[int, int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
    quant: QuantConfig | None = None,
    sparsify_first: bool = True,
    on_table: Callable[[str, int, bool], None] | None = None,
    plan: Plan | None = None,
    budget: Budget | None = None,
    max_error: float | None = None,
    usage: Usage | None = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    codecs: Sequence[str] | None = None,
    memory: int | None = None,
    collective: Collective | None = None,
) -> CompressedCheckpoint | None:
    """Compress the embedding tables of checkpoint ``src`` into the embpress file ``dst``.

    What ``embpress compress`` does: :func:`load_checkpoint`, :func:`find_tables` (with
    ``patterns``: globs on the key or module path; with ``plan``: the plan's tables),
    :func:`compress_state_dict` (uniform settings, or a plan: see there), then an atomic
    write of ``dst`` (left as it was if anything fails). Load the result with
    ``embpress.load(model, dst)``.

    A ``.safetensors`` input with uniform settings is read and compressed in row chunks
    (``streaming.compress_safetensors``: the same file, in bounded memory; ``memory`` is
    the working memory in bytes, default ``DEFAULT_MEMORY``), by several
    processes where ``collective`` has several (each writes its own rows of ``dst``,
    which must be on a filesystem they all share; rank 0 returns the report, the others
    None).
    """
    if quant is not None and not isinstance(quant, QuantConfig):  # on every path, before reading
        raise TypeError(f"quant must be an embpress.QuantConfig, got {type(quant).__name__}")
    if same_file(src, dst):
        raise ValueError(f"dst {dst} is the checkpoint src; write to another path")
    planned = plan is not None or budget is not None or max_error is not None
    _check_plan_options(planned, plan, codecs, usage, unseen_weight)
    many = collective is not None and collective.size > 1
    if many and planned:
        raise ValueError("several processes compress with uniform settings only (no budget or plan)")
    if planned and memory is not None:  # the row-chunk path's bound: a plan reads SRC whole
        raise ValueError(
            "memory bounds the row-chunk path of uniform settings; a planned compress reads SRC whole"
        )
    streams = not planned and (many or is_safetensors_file(src))
    if memory is not None:  # its checks before any work, on every path
        from .streaming import memory_chunk_bytes

        memory_chunk_bytes(memory)
        if not streams and not planned:
            raise ValueError(
                f"memory bounds the row-chunk path of a .safetensors src; {src} is read whole "
                "(save it with safetensors.torch.save_file to compress it in bounded memory)"
            )
    if streams:
        from .streaming import compress_safetensors, memory_chunk_bytes

        streamed = compress_safetensors(
            src,
            patterns,
            sparsity=sparsity,
            block=block,
            zeros_per_block=zeros_per_block,
            norm=norm,
            quant=quant if quant is not None else QuantConfig(bits=DEFAULT_BITS),
            sparsify_first=sparsify_first,
            chunk_bytes=memory_chunk_bytes(DEFAULT_MEMORY if memory is None else memory),
            collective=collective if collective is not None else LOCAL,
            on_table=on_table,
            out=dst,
        )
        return streamed
    state, _ = load_checkpoint(src)
    try:
        keys: list[str] | None = None
        if plan is None:
            keys = find_tables(state, patterns, source=src)
            if not keys:
                raise ValueError(
                    f"no embedding table found among {len(state)} tensors (choose them with patterns)"
                )
        elif patterns:
            raise ValueError("a plan names its tables: give no patterns with it")
        result = compress_state_dict(
            state,
            keys,
            sparsity=sparsity,
            block=block,
            zeros_per_block=zeros_per_block,
            norm=norm,
            quant=quant,
            sparsify_first=sparsify_first,
            on_table=on_table,
            plan=plan,
            budget=budget,
            max_error=max_error,
            usage=usage,
            unseen_weight=unseen_weight,
            codecs=codecs,
        )
    except ValueError as err:
        raise ValueError(f"{src}: {err}") from err
    result.save(dst)
    return result


# ------------------------------------------------------------------------------ describing files
def inspect(path: PathLike) -> FileReport:
    """Describe the embpress file ``path``: a :class:`TableReport` per table, and the rest.

    Every header field and every tensor's CRC-32 is checked, and that each tensor is a
    table's or the model's state (FormatError if not, as ``load`` refuses it); header and
    tensors come from one opened, memory-mapped file.
    """
    p = Path(path)
    check_input_file(p)
    index, tensors = eio.read_file(p, mmap=True)
    tables = []
    owned: set[str] = set()
    for name, entry in index["tables"].items():
        table = eio.build_table(p, name, entry, tensors)
        eio.claim_tensors(p, name, table, owned)
        error = entry.get("error") or {}
        rows, dim = table.num_embeddings, table.embedding_dim
        tables.append(
            TableReport(
                name=name,
                kind=entry["kind"],
                rows=rows,
                dim=dim,
                layout=table.layout,
                bits=table.bits,
                sparsity=table.sparsity,
                nbytes=table.nbytes,
                float_nbytes=rows * dim * 4,
                rel_frobenius=error.get("rel_frobenius"),
                max_abs_error=error.get("max_abs"),
                aliases=tuple(entry["aliases"]),
                mode=(entry["module"] or {}).get("mode"),
            )
        )
    eio.check_no_stray(p, tensors, owned)  # as load refuses it
    other = [t for k, t in tensors.items() if k.startswith(eio.STATE_PREFIX)]
    return FileReport(
        path=str(p),
        format=eio.FORMAT_NAME,
        format_version=index["format_version"],
        file_bytes=p.stat().st_size,
        tables=tuple(tables),
        other_tensors=len(other),
        other_nbytes=sum(_nbytes(t) for t in other),
    )


def _tensor_info(key: str, t: torch.Tensor) -> TensorInfo:
    return TensorInfo(key, tuple(t.shape), _dtype_name(t.dtype), _dtype_name(t.layout), _nbytes(t))


def inspect_checkpoint(path: PathLike, patterns: Sequence[str] = ()) -> CheckpointReport:
    """Which tensors of checkpoint ``path`` :func:`compress_checkpoint` would compress as
    tables (with ``patterns``, as it would take them) and which it would copy unchanged."""
    state, fmt = load_checkpoint(path)
    tables = set(find_tables(state, patterns, source=path))
    first = {}
    for keys in _tied_keys(state).values():
        first.update({k: keys[0] for k in keys[1:]})
    infos = {k: dataclasses.replace(_tensor_info(k, t), tied_to=first.get(k)) for k, t in state.items()}
    return CheckpointReport(
        path=str(Path(path)),
        format=fmt,
        tables=tuple(info for k, info in infos.items() if k in tables),
        copied=tuple(info for k, info in infos.items() if k not in tables),
    )
