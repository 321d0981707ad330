"""Importing TensorRT and cuda-bindings, and asking the GPU what it is, with one clear message each.

TensorRT's native libraries come from NVIDIA's package index (``pip install tensorrt-cu13`` pulls
them from pypi.nvidia.com); the lean runtime (``tensorrt-lean``) can run version-compatible engines
only. cuda-bindings (``pip install cuda-bindings``) gives device memory, streams and the compute
capability without torch or pycuda. Imports go through :func:`importlib.import_module` so tests can
inject fake modules via ``sys.modules``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import BackendError


INSTALL_TRT = ("install TensorRT on a machine with an NVIDIA GPU: `pip install tensorrt-cu13` (its libraries come "
               "from NVIDIA's index, pypi.nvidia.com).")
INSTALL_CUDA = "pip install cuda-bindings (NVIDIA's CUDA Python bindings; no torch or pycuda needed)."
NO_GPU = "run on a machine with an NVIDIA GPU and a working driver (check `nvidia-smi`)."


# Module names, in order of preference. The PyPI wheels install ``tensorrt_bindings`` (tensorrt-cu13-bindings)
# and ``tensorrt_lean_bindings`` (tensorrt-lean-cu13-bindings); ``tensorrt`` / ``tensorrt_lean`` exist only
# through NVIDIA's meta packages (tensorrt-cu13, tensorrt-lean-cu13), which re-export those modules.
FULL_MODULES = ("tensorrt", "tensorrt_bindings")
LEAN_MODULES = ("tensorrt_lean", "tensorrt_lean_bindings")


def import_tensorrt(lean_ok: bool = False):
    """Return the full TensorRT module, or with ``lean_ok`` the lean runtime when the full one is absent.

    The full module must have ``Builder`` (a build needs it), the lean one ``Runtime``: the PyPI placeholder
    packages install a module without the API. Raises :class:`BackendError` saying what to install.
    """
    candidates = [(name, "Builder" if not lean_ok else "Runtime") for name in FULL_MODULES]
    candidates += [(name, "Runtime") for name in LEAN_MODULES] if lean_ok else []
    failures = []
    for name, needed in candidates:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or OSError/RuntimeError from missing native libraries
            failures.append(f"{name}: {str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__}")
            continue
        if not hasattr(module, needed):
            failures.append(f"{name}: no {needed} (a placeholder package without the native libraries, or the lean "
                            "runtime where the full TensorRT is needed)")
            continue
        return module
    raise BackendError(f"TensorRT is not installed ({'; '.join(failures)}).", INSTALL_TRT)


def is_lean(trt) -> bool:
    """True for the lean runtime (``tensorrt_lean`` or ``tensorrt_lean_bindings``): it runs version-compatible
    engines only, and cannot build."""
    return getattr(trt, "__name__", "tensorrt").split(".")[0] in LEAN_MODULES


def import_cudart():
    """Return cuda-bindings' CUDA runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError):
            continue
    raise BackendError("cuda-bindings is not installed (needed for device memory and streams).", INSTALL_CUDA)


def check_cuda(cudart, result, what: str):
    """Unpack a cuda-bindings call result ``(err, *values)``; raise :class:`BackendError` on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise BackendError(f"CUDA call {what} failed with {name}.", NO_GPU)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    """The GPU engines are built for and run on: TensorRT engines are specific to its compute capability."""

    device: int
    name: str
    compute_capability: str  # "9.0"


def gpu_info(cudart=None, device: int = 0) -> GpuInfo:
    """Query device ``device``; raise :class:`BackendError` when there is no usable GPU."""
    cudart = cudart or import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        reason = getattr(err, "name", str(err)) if err != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise BackendError(f"no NVIDIA GPU is available ({reason}); TensorRT engines need one.", NO_GPU)
    if device >= count:
        raise BackendError(f"GPU {device} does not exist ({count} visible).", "pick a device below the count.")
    props = check_cuda(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(device, name, f"{props.major}.{props.minor}")


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)`` (non-numeric parts end the tuple)."""
    parts = []
    for piece in str(version).split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)
