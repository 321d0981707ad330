"""ONNX Runtime backend (CPU, or CUDA when onnxruntime-gpu and a GPU are present)."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ArtifactError, BackendError
from ..precision import CPU_NATIVE
from ..specs import GraphSpec


_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Graphs that keep ONNX Runtime's CPU memory arena (README, Performance: memory). The arena never hands
# memory back and grows in doubling chunks, so every session kept the high-water mark of its own largest
# run beside the others' (at mid size 1153 MB peak RSS for a 10 s clip, 756 MB without any arena; results
# are bit-identical either way). Without it buffers come from malloc and large ones return on free.
CPU_ARENA_GRAPHS = frozenset({"vae_decoder", "vae_encoder"})


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError(
            "ONNX Runtime is not installed.", "pip install 'acestep-trt[ort]' (or onnxruntime-gpu for CUDA)."
        ) from None
    return ort


def cuda_available() -> bool:
    """ONNX Runtime here has the CUDA provider (onnxruntime-gpu); a GPU is still checked per session."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return _PROVIDER["cuda"] in ort.get_available_providers()


def check_device(device: str) -> None:
    """Raise unless ``device`` has an ONNX Runtime provider here (no silent CPU fallback)."""
    ort = _import_ort()
    if _PROVIDER[device] not in ort.get_available_providers():
        raise BackendError(
            f"device {device!r} is not available to ONNX Runtime here (providers: {ort.get_available_providers()}).",
            "install onnxruntime-gpu on a machine with an NVIDIA GPU and CUDA 12/13, or use --device cpu.",
        )


def _session(path: Path, options, providers: list[str]):
    ort = _import_ort()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ArtifactError(
            f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:300]}",
            "re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite`.",
        ) from None


def _check_precision(name: str, precision: str, device: str, emulate: bool) -> bool:
    """Whether ``name`` must run emulated (a bf16/fp16 graph on the CPU); refuse it unless allowed.

    int8 graphs (the CPU recipe) run natively on the CPU and are refused on CUDA: their fused dynamic
    quantisation kernels are ONNX Runtime CPU contrib ops, and this path has not run on a GPU.
    """
    if precision == "int8" and device != "cpu":
        raise BackendError(
            f"{name} was exported with the int8 recipe (export --precision int8), a CPU deployment recipe.",
            "use --device cpu for it, or export again with --precision bf16 (or fp32) for the GPU.",
        )
    if precision in CPU_NATIVE or device != "cpu":
        return False
    if not emulate:
        raise BackendError(
            f"{name} was exported in {precision} (export --precision); ONNX Runtime's CPU provider has no bf16 "
            "kernels and few fp16 ones, so it does not run reduced-precision graphs.",
            "run it on a GPU (--device cuda), export again with --precision fp32 for CPU use, or pass "
            "--emulate-precision to check its numerics on the CPU (fp32 arithmetic rounded to the graph's "
            "precision; slower than fp32).",
        )
    return True


class DeferredGraph:
    """A graph whose session is created at its first use, for graphs only some tasks run (the audio tokenizer
    pair: cover of source audio, audio codes), so that a process that never runs them never holds their
    weights (0.8 GiB at full size).

    ``create()`` opens the session; ``check()`` runs first and refuses if the artifact directory was replaced
    since the runtime verified it (the other graphs are of the verified export). ``pending_bytes`` is what the
    first use will load (its files' size), for the memory check; 0 once loaded. Anything but ``run`` and
    ``close`` opens the session and reads the attribute from it.
    """

    check_dims = None  # fixed-shape limits are TensorRT engines' (AceStepRuntime._check_engine_limits)

    def __init__(self, spec: GraphSpec, create: Callable[[], "OrtGraph"], check: Callable[[], None], nbytes: int):
        self.spec, self.name = spec, spec.name
        self._create, self._check, self._nbytes = create, check, int(nbytes)
        self._graph: OrtGraph | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._graph is not None

    @property
    def pending_bytes(self) -> int:
        return 0 if self.loaded else self._nbytes

    def _open(self) -> "OrtGraph":
        with self._lock:  # two threads' first runs open one session
            if self._graph is None:
                self._check()
                self._graph = self._create()
            return self._graph

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._open().run(feeds)

    def close(self) -> None:
        close = getattr(self._graph, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._open(), name)


class OrtGraph:
    """One ONNX graph in an ``InferenceSession``; feeds are checked against the spec first.

    ``precision`` is the graph's dtype from the manifest; a reduced one on the CPU runs only when
    ``emulate`` (see :mod:`acestep_trt.runtime.precision`).
    """

    def __init__(self, path: Path, spec: GraphSpec, device: str = "cpu", threads: int | None = None,
                 precision: str = "fp32", emulate: bool = False):
        check_device(device)
        self._path, self._threads, self._name = path, threads, spec.name
        self._providers = [_PROVIDER[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
        self._emulated = _check_precision(spec.name, precision, device, emulate)
        self._overrides: dict[str, np.ndarray] = {}  # initializer replacements (LoRA), kept alive for the session
        self.session = self._open({})
        self.providers = self.session.get_providers()
        if self.providers[0] != _PROVIDER[device]:
            raise BackendError(
                f"ONNX Runtime placed {spec.name} on {self.providers[0]} instead of {_PROVIDER[device]}.",
                "check the CUDA installation (nvidia-smi, CUDA libraries on LD_LIBRARY_PATH) or use --device cpu.",
            )
        self.name = spec.name
        self.spec = spec
        self._outputs = [o.name for o in spec.outputs]
        self.device = device

    def _open(self, overrides: dict[str, np.ndarray]):
        """A session on the graph file, with ``overrides`` {initializer: array} replacing stored initializers."""
        ort = _import_ort()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self._threads:
            options.intra_op_num_threads = self._threads
        if self._providers[0] == _PROVIDER["cpu"] and self._name not in CPU_ARENA_GRAPHS:
            options.enable_cpu_mem_arena = False
        names, self._pinned = _ort_initializers(ort, overrides, self._emulated)  # must outlive the session
        if names:
            options.add_external_initializers(names, self._pinned)
            if self._providers[0] == _PROVIDER["cpu"]:
                # Prepacking copies every MatMul weight into MLAS's packed layout at session creation: 16.5 s
                # for the full-size DiT here, and the arrays handed over would stay allocated beside the packed
                # copies. Without it the session is created in 1.9 s and computes from the arrays themselves,
                # at some cost per step (README, LoRA adapters).
                options.add_session_config_entry("session.disable_prepacking", "1")
        if not self._emulated:
            return _session(self._path, options, self._providers)
        from ..precision import emulated_copy

        with tempfile.TemporaryDirectory(prefix="acestep-emulated-") as work:
            return _session(emulated_copy(self._path, Path(work)), options, self._providers)

    def set_weights(self, values: dict[str, np.ndarray], original: bool = False) -> None:
        """Replace initializers {name: array in the initializer's layout and dtype (bf16 as uint16 bits)}.

        The ONNX files stay untouched: the session is created again with the arrays handed to ONNX Runtime
        (``SessionOptions.add_external_initializers``), which then reads only the other initializers from the
        graph's data file. ``original`` drops every replacement (back to the file's weights). The old session
        is released first, so the graph never sits in memory twice; if the new one fails, the old is restored.
        """
        previous = self._overrides
        self.session = None
        try:
            overrides = {} if original else {**previous, **values}
            self.session = self._open(overrides)
            self._overrides = overrides
        except Exception:
            self.session = self._open(previous)
            raise

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.spec.check_feeds(feeds)
        values = self.session.run(self._outputs, {t.name: feeds[t.name] for t in self.spec.inputs})
        return dict(zip(self._outputs, values))

    # -- device-resident execution (IO binding): the same code path on "cuda" and, for tests, on "cpu" --

    def to_device(self, array: np.ndarray):
        """Copy a host array into an ``OrtValue`` on this graph's device."""
        ort = _import_ort()
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty(self, shape: tuple[int, ...], dtype=np.float32):
        """Preallocate an ``OrtValue`` on this graph's device (reused across calls of one shape)."""
        ort = _import_ort()
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, 0)

    def run_bound(self, inputs: dict, outputs: dict) -> None:
        """Run with every input and output bound to device ``OrtValue``s; nothing crosses to the host."""
        binding = self.session.io_binding()
        for spec in self.spec.inputs:
            binding.bind_ortvalue_input(spec.name, inputs[spec.name])
        for name in self._outputs:
            binding.bind_ortvalue_output(name, outputs[name])
        self.session.run_with_iobinding(binding)


def _ort_initializers(ort, values: dict[str, np.ndarray], emulated: bool) -> tuple[list[str], list]:
    """(names, OrtValues) for ``add_external_initializers``; bf16 arrays are uint16 bits (ONNX type 16).

    In an emulated graph (``precision.emulate``) reduced-precision initializers carry a suffix.
    """
    from ..precision import _ROUND_SUFFIX

    names, ortvalues = [], []
    for name, array in values.items():
        array = np.ascontiguousarray(array)
        reduced = array.dtype in (np.uint16, np.float16)
        names.append(name + _ROUND_SUFFIX if emulated and reduced else name)
        if array.dtype == np.uint16:
            ortvalues.append(ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, 16))
        else:
            ortvalues.append(ort.OrtValue.ortvalue_from_numpy(array))
    return names, ortvalues


def checking_graph(path: Path, spec: GraphSpec, precision: str) -> OrtGraph:
    """``path`` in ONNX Runtime as the reference for a validation: fp32 graphs on the CPU provider (no
    TF32); bf16/fp16 graphs natively on CUDA when onnxruntime-gpu is present, else emulated on the CPU; int8
    graphs natively on the CPU."""
    device = "cuda" if precision not in CPU_NATIVE and cuda_available() else "cpu"
    return OrtGraph(path, spec, device, precision=precision, emulate=True)
