"""Reduced-precision export recipes: which graph is traced in which dtype, and the DiT's fp32 islands.

Precision lives in the ONNX graph (TensorRT 10+ builds strongly typed networks from it; ONNX Runtime
runs the types it is given). A recipe assigns each graph a dtype; the module is cast before tracing and
its adapter casts the fp32 graph inputs down and the outputs back up, so every graph keeps the fp32
interface of its spec and the runtime, TensorRT profiles and Triton configs do not change.

The DiT in bf16 keeps fp32 islands where reduced precision overflows or lacks kernels (DESIGN.md section 5):
timestep embeddings and AdaLN scale/shift tables (so the modulation is computed in fp32 before the stream
is rounded), RMSNorms (computed in fp32, returned in the stream's dtype), the patch-embedding input
convolution (its input is the latents) and the output ConvTranspose (ONNX Runtime's CUDA provider has no
bf16 ConvTranspose, and TensorRT bf16 deconvolution builds are reported to fail), and the Euler update.
fp16 is refused for the DiT: its residual stream overflows (upstream ACE-Step issue #1274). The VAE may be
fp16 only (no bf16 Conv/ConvTranspose/Sin kernels in ONNX Runtime CUDA) and only if it keeps 40 dB of
audio SNR against fp32; every recipe keeps it fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from acestep_trt.runtime.errors import InputError
from acestep_trt.runtime.precision import MIN_SNR_DB, PRECISIONS
from acestep_trt.runtime.specs import CONDITION_ENCODER, DIT_STEP, GRAPH_NAMES, TEXT_ENCODER, VAE_DECODER

# dtypes each graph may be exported in
ALLOWED = {
    TEXT_ENCODER: ("fp32", "bf16", "fp16", "int8"),
    CONDITION_ENCODER: ("fp32", "bf16", "fp16", "int8"),
    DIT_STEP: ("fp32", "bf16", "int8"),
    VAE_DECODER: ("fp32", "fp16"),
}
# Why a dtype is refused for a graph (shown in the error).
REFUSED = {
    DIT_STEP: "an fp16 DiT overflows in its norms and residuals (upstream ACE-Step issue #1274); use bf16",
    VAE_DECODER: "ONNX Runtime's CUDA provider has no bf16 Conv (opset 20), ConvTranspose or Sin kernels, and "
                 "TensorRT builds of bf16 ConvTranspose are reported to fail; the int8 recipe quantises matrix "
                 "products and the VAE has none; use fp16 or fp32",
}

RECIPES = {
    "fp32": {name: "fp32" for name in GRAPH_NAMES},
    "bf16": {TEXT_ENCODER: "bf16", CONDITION_ENCODER: "bf16", DIT_STEP: "bf16", VAE_DECODER: "fp32"},
    # CPU deployment: int8 matrix products (export/quantize.py), fp32 everywhere else
    "int8": {TEXT_ENCODER: "int8", CONDITION_ENCODER: "int8", DIT_STEP: "int8", VAE_DECODER: "fp32"},
}

# Validation floors against the fp32 PyTorch module (runtime.precision.MIN_SNR_DB per dtype); a reduced
# VAE must reach 40 dB of audio SNR, else it stays fp32.
VAE_MIN_SNR_DB = 40.0


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtype of every graph: a named recipe plus per-graph overrides."""

    recipe: str
    graphs: dict[str, str]

    def min_snr_db(self, graph: str) -> float | None:
        """Validation floor against fp32 for ``graph``, or None for an fp32 graph (max-abs bound instead)."""
        dtype = self.graphs[graph]
        if dtype == "fp32":
            return None
        return VAE_MIN_SNR_DB if graph == VAE_DECODER else MIN_SNR_DB[dtype]

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "graphs": dict(self.graphs)}


def plan(recipe: str = "fp32", overrides: dict[str, str] | None = None) -> PrecisionPlan:
    """Resolve ``recipe`` and ``{graph: dtype}`` overrides; raises :class:`InputError` with the remedy."""
    if recipe not in RECIPES:
        raise InputError(f"unknown precision recipe {recipe!r}.", f"use one of {', '.join(RECIPES)}.")
    graphs = dict(RECIPES[recipe])
    for graph, dtype in (overrides or {}).items():
        if graph not in ALLOWED:
            raise InputError(f"unknown graph {graph!r} in --graph-precision.", f"use one of {', '.join(ALLOWED)}.")
        if dtype not in ALLOWED[graph]:
            why = f" ({REFUSED[graph]})" if graph in REFUSED else ""
            raise InputError(f"{graph} cannot be exported in {dtype!r}{why}.",
                             f"use one of {', '.join(ALLOWED[graph])} for {graph}.")
        graphs[graph] = dtype
    return PrecisionPlan(recipe, graphs)


def parse_overrides(items: tuple[str, ...]) -> dict[str, str]:
    """``("dit_step=bf16", ...)`` -> ``{"dit_step": "bf16"}``; raises :class:`InputError` on bad syntax."""
    out = {}
    for item in items:
        graph, sep, dtype = item.partition("=")
        if not sep or dtype.strip() not in PRECISIONS:
            raise InputError(f"--graph-precision {item!r} is not GRAPH=DTYPE.",
                             f"write e.g. text_encoder=fp16 (dtypes: {', '.join(PRECISIONS)}).")
        out[graph.strip()] = dtype.strip()
    return out


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def fp32_island(module, restore_dtype: bool = True):
    """Wrap ``module`` (kept in fp32) so it takes inputs of any float dtype and computes in fp32.

    The output returns to the first input's dtype when ``restore_dtype``, else stays fp32.
    """
    import torch
    from torch import nn

    class _Island(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner.float()

        def forward(self, x, *args, **kwargs):
            out = self.inner(x.float(), *args, **kwargs)
            return out.to(x.dtype) if restore_dtype and x.dtype != torch.float32 else out

    return _Island(module)


def cast_dit(transformer, dtype: str) -> None:
    """Cast ``AceStepTransformer1DModel`` in place to ``dtype`` with the fp32 islands of the module docstring.

    Island parameters are never rounded: they keep the checkpoint's fp32 values.
    """
    if dtype == "fp32":
        return
    from diffusers.models.normalization import RMSNorm

    islands = {"time_embed", "time_embed_r", "proj_in_conv", "proj_out_conv"}
    keep = {id(module.scale_shift_table) for module in [transformer, *transformer.layers]}
    for name, module in transformer.named_modules():
        if name in islands or isinstance(module, RMSNorm):
            keep.update(id(p) for p in module.parameters())
    low = torch_dtype(dtype)
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        if id(tensor) not in keep and tensor.is_floating_point():
            tensor.data = tensor.data.to(low)
    _wrap_children(transformer, RMSNorm, restore_dtype=True)
    transformer.proj_in_conv = fp32_island(transformer.proj_in_conv, restore_dtype=False)
    transformer.proj_out_conv = fp32_island(transformer.proj_out_conv, restore_dtype=False)


def _wrap_children(root, kind, restore_dtype: bool) -> None:
    """Replace every submodule of type ``kind`` under ``root`` with its fp32 island."""
    for parent in list(root.modules()):  # listed before wrapping: new islands are not visited
        for name, child in list(parent.named_children()):
            if isinstance(child, kind):
                setattr(parent, name, fp32_island(child, restore_dtype))


def reduced_adapter(adapter, dtype: str):
    """``adapter`` cast to ``dtype`` behind fp32 inputs and outputs (text/condition encoder, VAE): float
    inputs are cast down on entry and float outputs back to fp32, so the graph keeps its spec's interface.
    The wrapper's ``forward`` carries the adapter's signature, so the exporter still sees the spec's
    input names.
    """
    import inspect

    from torch import nn

    low = torch_dtype(dtype)

    def forward(self, *inputs):
        inputs = [x.to(low) if x.is_floating_point() else x for x in inputs]
        out = self.inner(*inputs)
        if isinstance(out, tuple):
            return tuple(y.float() if y.is_floating_point() else y for y in out)
        return out.float()

    params = list(inspect.signature(type(adapter).forward).parameters.values())
    forward.__signature__ = inspect.Signature(params)
    wrapper = type(f"Reduced{type(adapter).__name__}", (nn.Module,), {"forward": forward})()
    wrapper.inner = adapter.to(low)
    return wrapper


def trace_dtype(dtype: str) -> str:
    """The dtype a graph is traced in: int8 graphs are traced in fp32 and quantised afterwards."""
    return "fp32" if dtype == "int8" else dtype


def prepare(graph: str, adapter, dtype: str):
    """The module to trace for ``graph`` in ``dtype`` (``adapter`` itself for fp32)."""
    if trace_dtype(dtype) == "fp32":
        return adapter
    if graph == DIT_STEP:
        cast_dit(adapter.dit, dtype)  # the DiT adapter casts its own inputs around the fp32 islands
        return adapter
    return reduced_adapter(adapter, dtype)
