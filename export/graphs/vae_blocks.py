"""Export-time rewrites of the Oobleck VAE's blocks into a form ONNX Runtime runs with less work.

``fold_snakes`` replaces every diffusers ``Snake1d`` by :class:`FoldedSnake`, the same function with its
per-call constant work done once at export: diffusers' ``Snake1d.forward`` (autoencoder_oobleck.py) computes
``exp(alpha)``, ``exp(beta)``, ``(beta + 1e-9).reciprocal()`` and ``sin(alpha * x).pow(2)`` on every call,
and reshapes its input to 3-D and back. Traced, that is per activation a Reshape pair, a Pow and two
scalar-parameter chains; folded, it is ``x + inv_beta * (s * s)`` with ``s = sin(alpha * x)``: Mul, Sin,
Mul, Mul, Add. The constants are computed with the same torch fp32 operations as diffusers, so a folded
module is bitwise equal to the original in PyTorch (``tests/test_vae_fast.py``), and ONNX Runtime's
multi-threaded ``Mul`` replaces its ``Pow``. Every operator stays inside TensorRT's ONNX support table
(``runtime/trt/tensorrt_onnx_operators.json``), so the GPU engines are built from the same graph.
"""

from __future__ import annotations

import torch
from torch import nn


class FoldedSnake(nn.Module):
    """``x + 1 / (beta + 1e-9) * sin(alpha * x) ** 2`` with alpha, beta (log-scale resolved) stored folded.

    x [B, C, ...] -> same shape; ``alpha`` and ``inv_beta`` are [1, C, 1] buffers.
    """

    def __init__(self, snake: nn.Module):
        super().__init__()
        with torch.no_grad():  # mirrors Snake1d.forward's constant part, in the same fp32 operations
            alpha = torch.exp(snake.alpha) if snake.logscale else snake.alpha
            beta = torch.exp(snake.beta) if snake.logscale else snake.beta
            inv_beta = (beta + 1e-9).reciprocal()
        self.register_buffer("alpha", alpha.detach().clone())
        self.register_buffer("inv_beta", inv_beta.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sin(self.alpha * x)
        return x + self.inv_beta * (s * s)  # s * s is pow(s, 2) exactly (IEEE), without ORT's Pow


def fold_snakes(module: nn.Module) -> int:
    """Replace every ``Snake1d`` inside ``module`` by a :class:`FoldedSnake`, in place; returns how many."""
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Snake1d):
                setattr(parent, name, FoldedSnake(child))
                replaced += 1
    return replaced
