"""QuantizedEmbedding and QuantizedEmbeddingBag: nn.Embedding / nn.EmbeddingBag over a quantized table.

``forward`` takes what the float modules take and returns what they return on
``self.dequantize()``. It is one custom op (``torch.ops.embpress.embedding_bag`` /
``embedding``, see ``embpress.ops``), so that ``torch.compile(fullgraph=True)``,
``torch.export``, ``torch.jit.trace`` and ``torch.jit.script`` see one node; a plain eager
call runs the op's kernel without the dispatcher round trip (``_runs_eagerly``). In the
kernel, sum and mean bags use a fused kernel where the layout has one on the device
(torch's FBGEMM ops, or numba); everything else decodes only the distinct rows a batch
touches and hands them to ``torch.nn.functional``.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import re
from typing import Any, ClassVar, cast

import torch
from torch import nn

from . import ops
from .layouts import QuantizedTable, encode_table
from .quant import QuantConfig, RowQParams

__all__ = [
    "OUTPUT_DTYPES",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "embedding_scale",
    "module_arguments",
    "output_dtype_of",
]


# nn.EmbeddingBag's mode names as the ops' ints (``ops.MODES``' values)
_MODE_CODES = {name: int(code) for name, code in ops.MODES.items()}


def _untraced() -> bool:
    """Whether nothing traces this call and no torch function or dispatch mode sees it."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    )


def _runs_eagerly(*tensors: torch.Tensor | None) -> bool:
    """Whether this forward runs plainly: nothing traces it (torch.compile, torch.export,
    torch.jit.trace, make_fx), no torch function or dispatch mode sees it, no tensor
    subclass and no gradient is involved.

    The modules then run the op's kernel directly (``ops.embedding_bag_impl``: the same
    code, the same outputs), without the dispatcher's Python-kernel round trip, which
    costs more than the whole lookup of a small batch (see BENCHMARKS.md, "Op boundary").
    Everywhere else they call the op, so graphs hold it and gradients take its formula.
    """
    if not _untraced():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        # a meta tensor takes the op, whose fake kernel gives the output's shape
        if t is not None and (type(t) is not torch.Tensor or t.is_meta or (grad and t.requires_grad)):
            return False
    return True


def _transformed(weights: torch.Tensor | None) -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``jacrev``...) wants the gradient of
    ``weights``: the op's autograd kernel cannot serve one (no custom op's can), so the
    module takes its ``autograd.Function`` itself (``ops.bag_with_gradient``)."""
    return (
        weights is not None
        and torch._C._are_functorch_transforms_active()
        and torch.is_grad_enabled()
        and weights.requires_grad
    )


def _float_weights(weights: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``per_sample_weights`` as the ops take them (float32), refused unless of the
    module's output ``dtype`` (as ``nn.EmbeddingBag`` refuses weights of another dtype
    than its table's). A leaf of ``torch.fx.symbolic_trace`` graphs, so that it runs when
    the graph runs (tracing cannot read a proxy's dtype, nor whether it is None)."""
    if weights is None:
        return None
    if weights.dtype != dtype:
        raise RuntimeError(
            f"per_sample_weights must have dtype {dtype}, the dtype of the module's output "
            f"(the weight it replaces); got {weights.dtype}"
        )
    return weights.float()


torch.fx.wrap("_float_weights")


def _check_tensor(value: object, name: str, optional: bool = False) -> None:
    """TypeError for a non-tensor argument (the ops' schema would refuse it less clearly);
    ``torch.fx.symbolic_trace``'s proxies pass (the graph calls the op)."""
    if not isinstance(value, (torch.Tensor, torch.fx.Proxy)) and not (optional and value is None):
        kind = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


# the dtypes a module can return, as a float module's weight may have them
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _output_dtype(dtype: object) -> torch.dtype:
    """``dtype`` if the modules can return it; TypeError otherwise."""
    if not isinstance(dtype, torch.dtype) or dtype not in OUTPUT_DTYPES:
        raise TypeError(f"output_dtype must be one of {', '.join(map(str, OUTPUT_DTYPES))}, got {dtype!r}")
    return dtype


def output_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a module replacing ``module`` returns: its weight's (or its own output
    dtype), float32 where that is not a float dtype the modules can return."""
    dtype = getattr(module, "output_dtype", None)
    weight = getattr(module, "weight", None)
    if dtype is None and isinstance(weight, torch.Tensor):
        dtype = weight.dtype
    return dtype if dtype in OUTPUT_DTYPES else torch.float32


# the forward of Hugging Face's ScaledWordEmbedding modules (BART, mBART, M2M100, Gemma 3...):
# nn.Embedding's lookup times ``embed_scale``, the only subclasses with their own forward
# that a compressed module replaces (with ``output_scale``)
_SCALED_SIGNATURE = re.compile(r"def forward\(self, input_ids(: [\w.]+)?\)( -> [\w.]+)?:")
_SCALED_RETURNS = {
    "return super().forward(input_ids) * self.embed_scale": False,
    "return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)": True,
}


@functools.cache
def _scaled_forward(cls: type) -> bool | None:
    """For an nn.Embedding subclass whose forward is exactly a ScaledWordEmbedding's: whether
    it casts the scale to the weight's dtype first; else None (read from its source)."""
    try:
        source = inspect.getsource(cls.forward)  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return None
    lines = [line.strip() for line in source.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) != 2 or not _SCALED_SIGNATURE.fullmatch(lines[0]):
        return None
    return _SCALED_RETURNS.get(lines[1])


def _keeps_forward(cls: type) -> bool:
    """Whether ``cls`` is nn.Embedding / nn.EmbeddingBag or a subclass keeping its forward."""
    return any(
        issubclass(cls, b) and getattr(cls, "forward", None) is b.forward
        for b in (nn.Embedding, nn.EmbeddingBag)
    )


def replaceable_class(cls: type) -> bool:
    """Whether a compressed module can stand in for modules of class ``cls``, known from
    the class alone (a module whose weights are not at hand, built on the meta device):
    nn.Embedding / nn.EmbeddingBag, a subclass keeping their forward, or one whose forward
    is a ScaledWordEmbedding's (:func:`embedding_scale` then reads the module's scale)."""
    return _keeps_forward(cls) or (
        issubclass(cls, nn.Embedding) and _scaled_forward(cast(type, cls)) is not None  # (mypy: classes hash)
    )


def embedding_scale(module: nn.Module) -> float | None:
    """What a compressed module replacing ``module`` multiplies its lookups by: 1.0 for
    nn.Embedding / nn.EmbeddingBag (or a subclass that keeps their forward), the scale of a
    Hugging Face ScaledWordEmbedding (as its forward applies it); None for any other
    subclass with its own forward, which a compressed module cannot stand in for."""
    if _keeps_forward(type(module)):
        return 1.0
    if not isinstance(module, nn.Embedding):
        return None
    to_weight_dtype = _scaled_forward(cast(type, type(module)))  # (mypy: classes hash)
    scale: Any = getattr(module, "embed_scale", None)
    if to_weight_dtype is None or scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            return None
        scale = scale.to(module.weight.dtype) if to_weight_dtype else scale
    elif to_weight_dtype:
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def module_arguments(module: nn.Module) -> tuple[Any, ...]:
    """What a compressed module keeps of a float embedding module besides its weight: its
    kind and arguments (modules sharing one weight with equal ones become one module)."""
    m: Any = module
    if isinstance(m, nn.EmbeddingBag):
        return ("EmbeddingBag", m.padding_idx, m.max_norm, m.norm_type, m.mode, m.include_last_offset)
    return ("Embedding", m.padding_idx, m.max_norm, m.norm_type, embedding_scale(m))


class _QuantizedModule(nn.Module):
    """Shared by both modules: the table, sizes, and the report of how it was made."""

    # TorchScript compiles a scripted module's properties unless they are listed here
    __jit_unused_properties__: ClassVar[list[str]] = [
        "num_embeddings",
        "embedding_dim",
        "bits",
        "layout",
        "sparsity",
        "nbytes",
        "float_nbytes",
    ]

    def __init__(
        self, table: QuantizedTable, output_dtype: torch.dtype = torch.float32, output_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.table = table
        self.error: dict[str, float] | None = None
        self.output_dtype = _output_dtype(output_dtype)
        if isinstance(output_scale, bool) or not isinstance(output_scale, (int, float)):
            raise TypeError(f"output_scale must be a number, got {type(output_scale).__name__}")
        if not math.isfinite(output_scale):
            raise ValueError(f"output_scale must be finite, got {output_scale}")
        self.output_scale = float(output_scale)

    def __getattr__(self, name: str) -> Any:
        """nn.Module's lookup of buffers and submodules; ``weight`` (which code written for
        nn's modules reads: resizing or tying embeddings) is refused with what to do."""
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} holds a compressed table, not a float 'weight': "
                ".dequantize() gives its float rows; resize or tie embeddings before compressing"
            )
        return super().__getattr__(name)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``model.half()``, ``.to(torch.bfloat16)``... set the dtype of the outputs, as they
        set a float module's weight (the table's own buffers keep theirs): the dtype is
        what ``fn`` makes of an empty float tensor of the current one."""
        probe = fn(torch.empty(0, dtype=self.output_dtype))
        if isinstance(probe, torch.Tensor) and probe.dtype in OUTPUT_DTYPES:
            self.output_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _padding(self, padding_idx: int | None) -> int | None:
        """``padding_idx`` as torch's modules keep it: a negative one counted from the end,
        ValueError outside ``[-num_embeddings, num_embeddings)``."""
        if padding_idx is None:
            return None
        try:  # an int or a NumPy integer, as torch's modules take
            index = operator.index(padding_idx)
        except TypeError:
            index = None
        if index is None or isinstance(padding_idx, bool):
            raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
        padding_idx = index
        rows = self.table.num_embeddings
        if not -rows <= padding_idx < rows:
            raise ValueError(f"padding_idx must be within num_embeddings ({rows}), got {padding_idx}")
        return padding_idx + rows if padding_idx < 0 else padding_idx

    @property
    def num_embeddings(self) -> int:
        return self.table.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.table.embedding_dim

    @property
    def bits(self) -> int:
        return self.table.bits

    @property
    def layout(self) -> str:
        return self.table.layout

    @property
    def sparsity(self) -> float:
        """Fraction of entries pruned; each decodes to exactly 0.0."""
        return self.table.sparsity

    @property
    def nbytes(self) -> int:
        """Every byte held for the table (codes, qparams, bitmaps, index maps)."""
        return self.table.nbytes

    @property
    def float_nbytes(self) -> int:
        """Bytes of the same table in float32."""
        return self.num_embeddings * self.embedding_dim * 4

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[num_embeddings, embedding_dim]`` this module computes with."""
        return self.table.dequantize()

    def extra_repr(self) -> str:
        ratio = self.nbytes / self.float_nbytes if self.float_nbytes else 0.0
        out = "" if self.output_dtype == torch.float32 else f", output_dtype={self.output_dtype}"
        out += "" if self.output_scale == 1.0 else f", output_scale={self.output_scale:g}"
        # the float module's arguments where they differ from its defaults, as nn's repr shows them
        args = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        args += "" if self.max_norm is None else f", max_norm={self.max_norm}"
        args += "" if self.norm_type == 2.0 else f", norm_type={self.norm_type}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{args}, bits={self.bits}, layout={self.layout}, "
            f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes}, ratio_to_float32={ratio:.4f}{out}"
        )

    def _cast(self, out: torch.Tensor) -> torch.Tensor:
        """The lookup (float32) in the module's output dtype, times its output scale (as a
        ScaledWordEmbedding scales its lookup in its weight's dtype)."""
        if self.output_dtype != torch.float32:
            out = out.to(self.output_dtype)
        return out if self.output_scale == 1.0 else out * self.output_scale

    @staticmethod
    def _encode(
        weight: torch.Tensor,
        config: QuantConfig | None,
        mask: torch.Tensor | None,
        block_width: int,
        saved_qparams: RowQParams | None,
    ) -> tuple[QuantizedTable, dict[str, float]]:
        config = config if config is not None else QuantConfig()
        if not isinstance(config, QuantConfig):
            raise TypeError(f"config must be an embpress.QuantConfig or None, got {type(config).__name__}")
        if weight.is_meta:
            raise ValueError(
                "the weight is on the meta device (it holds no values): load or initialise it first"
            )
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask is not None and (mask.is_meta or mask.layout != torch.strided):
            raise ValueError("mask must be a dense tensor holding values (not meta, not sparse)")
        if mask is not None and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        table, error = encode_table(
            weight,
            None if mask is None else mask.to("cpu", torch.bool),
            config,
            block_width=block_width,
            saved_qparams=saved_qparams,
        )
        return table.to(weight.device), error


def norm_args(max_norm: Any, norm_type: Any) -> tuple[float | None, float]:
    """``max_norm`` and ``norm_type`` as the modules keep them and the file stores them:
    ``max_norm`` None or a finite number > 0, ``norm_type`` a number, not NaN (torch's
    modules take any float; 0, a negative or an infinite max_norm zeroes, flips or leaves
    the rows, which no model means). ValueError (TypeError) naming the argument otherwise,
    before anything is built, so a model holding one stays as it was."""
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a finite number > 0 or None, got {max_norm}")
    if norm_type is None or math.isnan(norm_type):
        raise ValueError(f"norm_type must be a number (inf included), got {norm_type}")
    return (None if max_norm is None else float(max_norm)), float(norm_type)


class QuantizedEmbedding(_QuantizedModule):
    """Drop-in for ``nn.Embedding`` (inference): any index shape in, ``[*shape, D]`` out."""

    def __init__(
        self,
        table: QuantizedTable,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        *,
        output_dtype: torch.dtype = torch.float32,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__(table, output_dtype, output_scale)
        self.padding_idx = self._padding(padding_idx)
        self.max_norm, self.norm_type = norm_args(max_norm, norm_type)

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding,
        config: QuantConfig | None = None,
        *,
        mask: torch.Tensor | None = None,
        block_width: int = 1,
        saved_qparams: RowQParams | None = None,
    ) -> QuantizedEmbedding:
        """Quantize ``module`` (entries where ``mask`` is False are pruned to exact 0.0)."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"expected nn.Embedding, got {type(module).__name__}")
        scale = embedding_scale(module)
        if scale is None:
            raise TypeError(f"{type(module).__name__} overrides forward; it cannot be replaced safely")
        table, error = cls._encode(module.weight, config, mask, block_width, saved_qparams)
        out = cls(
            table,
            module.padding_idx,
            module.max_norm,
            module.norm_type,
            output_dtype=output_dtype_of(module),
            output_scale=scale,
        )
        out.error = error
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        table = self.table
        if not torch.jit.is_scripting():
            _check_tensor(input, "indices")
            if _runs_eagerly(input):
                fast = input.device.type == "cpu"  # the op's CPU kernel, else its plain-torch one
                return self._cast(ops.embedding_impl(table, input, self.max_norm, self.norm_type, fast))
        layout, rows, dim, bits, scale_dtype, layout_args = table.op_fields()
        out = torch.ops.embpress.embedding(
            table.op_tensors(),
            layout,
            rows,
            dim,
            bits,
            scale_dtype,
            layout_args,
            input,
            self.max_norm,
            self.norm_type,
        )
        return self._cast(out)


class QuantizedEmbeddingBag(_QuantizedModule):
    """Drop-in for ``nn.EmbeddingBag`` (inference): sum / mean / max bags."""

    def __init__(
        self,
        table: QuantizedTable,
        mode: str = "mean",
        padding_idx: int | None = None,
        include_last_offset: bool = False,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        *,
        output_dtype: torch.dtype = torch.float32,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__(table, output_dtype, output_scale)
        if mode not in ops.MODES:
            raise ValueError(f"mode must be 'sum', 'mean' or 'max', got {mode!r}")
        self.mode = mode
        self.padding_idx = self._padding(padding_idx)
        self.include_last_offset = include_last_offset
        self.max_norm, self.norm_type = norm_args(max_norm, norm_type)

    @classmethod
    def from_float(
        cls,
        module: nn.EmbeddingBag,
        config: QuantConfig | None = None,
        *,
        mask: torch.Tensor | None = None,
        block_width: int = 1,
        saved_qparams: RowQParams | None = None,
    ) -> QuantizedEmbeddingBag:
        """Quantize ``module`` (entries where ``mask`` is False are pruned to exact 0.0)."""
        if not isinstance(module, nn.EmbeddingBag):
            raise TypeError(f"expected nn.EmbeddingBag, got {type(module).__name__}")
        table, error = cls._encode(module.weight, config, mask, block_width, saved_qparams)
        out = cls(
            table,
            module.mode,
            module.padding_idx,
            module.include_last_offset,
            module.max_norm,
            module.norm_type,
            output_dtype=output_dtype_of(module),
        )
        out.error = error
        return out

    def forward(
        self,
        input: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript: see below)
            # the usual call (ids and offsets on the CPU, no weights), decided in few steps:
            # a large lookup leaves the caches cold, where each step costs microseconds
            # (ids and offsets are integer tensors: no gradient can flow through them)
            if (
                per_sample_weights is None
                and type(input) is torch.Tensor
                and type(offsets) is torch.Tensor
                and input.is_cpu
                and offsets.is_cpu  # (meta offsets take the op: its fake kernel gives the shape)
                and _untraced()
            ):
                mode_code = _MODE_CODES.get(self.mode)
                if mode_code is not None:
                    # (nn.Module's own lookup of the table takes three frames)
                    plain_table: QuantizedTable = self._modules["table"]  # type: ignore[assignment]
                    out = ops.embedding_bag_impl(
                        plain_table,
                        input,
                        offsets,
                        None,
                        mode_code,
                        self.include_last_offset,
                        self.padding_idx,
                        self.max_norm,
                        self.norm_type,
                    )
                    return self._cast(out)
        table = self.table
        if self.mode != "sum" and self.mode != "mean" and self.mode != "max":  # as nn.EmbeddingBag
            raise ValueError(f"mode has to be one of sum, mean or max, got {self.mode}")
        # ops.MODES[self.mode] as a plain int (layouts.Pooling's values): TorchScript compiles this
        mode = 0 if self.mode == "sum" else (1 if self.mode == "mean" else 2)
        if not torch.jit.is_scripting():
            _check_tensor(input, "indices")
            _check_tensor(offsets, "offsets", optional=True)
            _check_tensor(per_sample_weights, "per_sample_weights", optional=True)
        if not torch.jit.is_scripting():
            per_sample_weights = _float_weights(per_sample_weights, self.output_dtype)
        elif per_sample_weights is not None:  # TorchScript's copy of _float_weights
            if per_sample_weights.dtype != self.output_dtype:
                raise RuntimeError("per_sample_weights must have the dtype of the module's output")
            per_sample_weights = per_sample_weights.float()
        # TorchScript leaves out a block guarded by is_scripting() alone (not one merged with `and`)
        if not torch.jit.is_scripting():  # noqa: SIM102
            if _runs_eagerly(input, offsets, per_sample_weights):
                out = ops.embedding_bag_impl(
                    table,
                    input,
                    offsets,
                    per_sample_weights,
                    mode,
                    self.include_last_offset,
                    self.padding_idx,
                    self.max_norm,
                    self.norm_type,
                    input.device.type == "cpu",  # the op's CPU kernel, else its plain-torch one
                )
                return self._cast(out)
        layout, rows, dim, bits, scale_dtype, layout_args = table.op_fields()
        bag = torch.ops.embpress.embedding_bag
        if not torch.jit.is_scripting():  # noqa: SIM102
            if _transformed(per_sample_weights):
                bag = ops.bag_with_gradient  # type: ignore[assignment]
        out = bag(
            table.op_tensors(),
            layout,
            rows,
            dim,
            bits,
            scale_dtype,
            layout_args,
            input,
            offsets,
            per_sample_weights,
            mode,
            self.include_last_offset,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
        )
        return self._cast(out)

    def _generic(
        self, flat: torch.Tensor, bounds: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The plain-torch bag (decoded rows + torch.nn.functional) of flat ids and bounds
        with a final total: what the fused kernels are tested against."""
        return ops.generic_bag(
            self.table,
            flat,
            bounds,
            weights,
            ops.MODES[self.mode],
            self.padding_idx,
            self.max_norm,
            self.norm_type,
        )

    def extra_repr(self) -> str:
        last = ", include_last_offset=True" if self.include_last_offset else ""
        return f"{super().extra_repr()}, mode={self.mode!r}{last}"


def module_kwargs(module: _QuantizedModule) -> dict[str, Any]:
    """Constructor arguments besides the table (for saving)."""
    keys: tuple[str, ...] = ("padding_idx", "max_norm", "norm_type")
    if isinstance(module, QuantizedEmbeddingBag):
        keys = (*keys, "mode", "include_last_offset")
    out = {k: getattr(module, k) for k in keys}
    if math.isinf(out["norm_type"]):  # JSON has no infinity: the file holds "inf" / "-inf"
        out["norm_type"] = str(float(out["norm_type"]))
    return out
