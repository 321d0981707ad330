"""The real TensorRT 11.4 and cuda-bindings modules, as far as a machine without a GPU can reach them.

- ``tensorrt_lean_bindings`` (PyPI ``tensorrt-lean-cu13-bindings`` + ``-libs``) and ``cuda.bindings.runtime``
  import without a GPU; their pybind11 / Cython signatures are read with :func:`signatures`. Nothing here
  constructs a ``Runtime`` (that needs a GPU and can crash without one).
- The full ``tensorrt_bindings`` module cannot be imported without TensorRT's native libraries (NVIDIA's
  index only), so :class:`BindingsStrings` reads the string literals of its extension module inside the
  ``tensorrt-cu13-bindings`` wheel that ``scripts/setup.sh`` downloads from PyPI (1.3 MB, never installed):
  pybind11 keeps method names, argument names (``py::arg``) and docstrings (``:arg name:`` lines) as literals.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TRT_VERSION = "11.4.0.106"
BINDINGS_WHEEL_DIR = Path(sys.prefix) / "trt-wheels"  # scripts/setup.sh: pip download into .venv/trt-wheels
BINDINGS_WHEEL = f"tensorrt_cu13_bindings-{TRT_VERSION}-cp3*-none-manylinux_2_28_x86_64.whl"
SETUP_HINT = ("run scripts/setup.sh: it installs the test extra (tensorrt-lean-cu13-bindings/-libs, cuda-bindings) "
              f"and downloads tensorrt-cu13-bindings=={TRT_VERSION} into {BINDINGS_WHEEL_DIR}")


def import_lean():
    """The real lean runtime module (``tensorrt_lean_bindings``), or an AssertionError saying how to get it."""
    try:
        import tensorrt_lean_bindings
    except ImportError as exc:  # pragma: no cover - a setup problem, reported as one
        raise AssertionError(f"tensorrt_lean_bindings is not importable ({exc}); {SETUP_HINT}") from None
    return tensorrt_lean_bindings


def _split_params(text: str) -> list[str]:
    """``"self: A, name: str, shape: tuple[int, int] = (1, 2)"`` -> parameter names, brackets respected."""
    names, depth, current = [], 0, ""
    for char in text + ",":
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            if current.strip():
                names.append(current.strip())
            current = ""
        else:
            current += char
    return names


@dataclass(frozen=True)
class Signature:
    params: tuple[str, ...]  # without self
    defaults: frozenset[str]  # parameters that have a default


def signatures(obj, name: str) -> list[Signature]:
    """Every overload of callable ``obj``: ``inspect.signature`` where Python has one (cuda-bindings' Cython
    functions), else pybind11's docstring lines ``name(self: T, a: X, b: Y = d) -> R``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # pybind11 functions carry their signatures in the docstring only
        sig = None
    if sig is not None and not any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        params = [p for p in sig.parameters.values() if p.name != "self"]
        return [Signature(tuple(p.name for p in params),
                          frozenset(p.name for p in params if p.default is not inspect.Parameter.empty))]
    doc = getattr(obj, "__doc__", "") or ""
    found = []
    for match in re.finditer(rf"^(?:\d+\. )?{re.escape(name)}\((.*)\)(?: -> .*)?$", doc, re.MULTILINE):
        params = _split_params(match.group(1))
        names = [re.split(r"[:=]", p, maxsplit=1)[0].strip() for p in params]
        defaults = {n for n, p in zip(names, params) if "=" in p}
        found.append(Signature(tuple(n for n in names if n != "self"), frozenset(defaults)))
    return found


def accepts(real: list[Signature], fake: tuple[str, ...]) -> bool:
    """A real overload takes the fake's parameters, by name and in order, and has defaults for any others."""
    return any(s.params[:len(fake)] == fake and set(s.params[len(fake):]) <= s.defaults for s in real)


class BindingsStrings:
    """String literals of ``tensorrt_bindings/tensorrt.so`` in the tensorrt-cu13-bindings wheel."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        data = zipfile.ZipFile(wheel).read("tensorrt_bindings/tensorrt.so")
        self.sha256 = hashlib.sha256(data).hexdigest()
        runs = [r.decode() for r in re.findall(rb"[\t\n\r\x20-\x7e]{2,}", data)]
        self.identifiers = {r for r in runs if re.fullmatch(r"[A-Za-z_]\w*", r)}
        # the linker merges a literal into the tail of a longer one ("Builder" is stored inside "IExprBuilder")
        self._tails = sorted(self.identifiers, key=len)
        self.doc_args = [tuple(re.findall(r":arg (\w+):", r)) for r in runs if ":arg " in r]

    def has_name(self, name: str) -> bool:
        """``name`` is a literal of the module, or the tail of one (tail-merged by the linker)."""
        return name in self.identifiers or any(r.endswith(name) for r in self._tails if len(r) > len(name))

    def documents_args(self, params: tuple[str, ...]) -> bool:
        """Some docstring's ``:arg`` list starts with ``params`` in this order."""
        return any(args[:len(params)] == params for args in self.doc_args)


@lru_cache(maxsize=1)
def bindings_strings() -> BindingsStrings:
    wheels = sorted(BINDINGS_WHEEL_DIR.glob(BINDINGS_WHEEL))
    if not wheels:
        raise AssertionError(f"no {BINDINGS_WHEEL} in {BINDINGS_WHEEL_DIR}; {SETUP_HINT}")
    return BindingsStrings(wheels[-1])
