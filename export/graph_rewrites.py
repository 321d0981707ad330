"""Rewrites of every traced ONNX graph, before it is saved, into forms ONNX Runtime fuses into fewer kernels.

RMSNorm (``x * torch.rsqrt(mean(x ** 2) + eps) * weight`` in diffusers' ``RMSNorm`` and transformers'
``Qwen3RMSNorm``) traces as ``Mul(x, Reciprocal(Sqrt(v)))``, since ONNX has no Rsqrt. ONNX Runtime's
``SimplifiedLayerNormFusion``, which turns a whole RMSNorm into one ``SimplifiedLayerNormalization``
kernel, matches only ``Div(x, Sqrt(v))``, so every norm ran as seven passes over its tensor (Pow,
ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul): 57 of them per mid-size DiT step. :data:`RULES` rewrites
the product into that quotient, which is also how the same RMSNorm would be written by hand. ``x / s``
rounds once where ``x * (1 / s)`` rounds twice, so outputs move in the last bits only (validated at
export against PyTorch like every graph). ``Div`` and ``Sqrt`` are inside TensorRT's ONNX table, so the
engines are built from the same graph.

Rules use onnxscript's pattern rewriter (the library torch's exporter already runs over every graph); a
match whose ``Reciprocal`` has another consumer is left alone.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _times_reciprocal_sqrt(op, x, v):
    return op.Mul(x, op.Reciprocal(op.Sqrt(v)))


def _divided_by_sqrt(op, x, v):
    return op.Div(x, op.Sqrt(v))


def rules():
    """The rewrite rules, both operand orders of the ``Mul``."""
    from onnxscript.rewriter import pattern

    rule = pattern.RewriteRule(_times_reciprocal_sqrt, _divided_by_sqrt, name="rms_norm_as_division")
    return pattern.RewriteRuleSet([rule], commute=True)


def apply(model) -> int:
    """Rewrite ``model`` (an ``onnx_ir.Model``, as ``torch.onnx.export`` returns in ``.model``) in place;
    returns how many matches were rewritten."""
    count = rules().apply_to_model(model)
    if count:
        log.debug("graph rewrites: %d RMSNorm products as divisions", count)
    return count
