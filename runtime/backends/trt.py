"""TensorRT backend: engines built by ``acestep-trt build``, device memory and streams from cuda-bindings.

No torch, no pycuda. Each :class:`TrtGraph` has the same contract as ``OrtGraph``: ``run(feeds)`` takes
and returns host NumPy arrays keyed by the spec's tensor names. Device buffers are allocated once per
input shape (a few shapes are kept: the VAE sees two or three window lengths) and reused.
:class:`TrtDitGraph` adds ``denoise``: the whole Euler loop with the latents on the device (dit_step
computes ``next_latents = latents + dt * velocity`` itself; two latent buffers ping-pong), one upload and
one download per call; with ``audio_cover_strength < 1`` two DiT evaluations per step (the cover and the
text2music condition) and the ``cover_blend`` engine mixing them, all on the device.

The audio-to-audio graphs run as engines when ``engines.json`` has them; an engine directory built before
they had engines serves the core graphs, and the runtime runs the audio graphs in ONNX Runtime (logged).

Every engine is checked against ``engines.json`` before it is deserialized (TensorRT version, GPU
compute capability, ONNX hashes, engine hashes), and every call's shapes against the engine's profile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..artifacts import Artifacts, read_manifest
from ..errors import AceStepError, ArtifactError, BackendError
from ..specs import COVER_BLEND, DIT_STEP, GraphSpec
from ..trt.libs import NO_GPU, check_cuda, gpu_info, import_cudart, import_tensorrt, is_lean
from ..trt.manifest import (ENGINE_MANIFEST, EngineManifest, default_engine_dir, engine_graphs, missing_audio_engines,
                            rebuild_remedy, verify_engines)
from ..trt.profiles import GraphProfile, rebuild_args
from ..vae import DEFAULT_VAE_WINDOW

log = logging.getLogger(__name__)

SHAPE_CACHE = 4  # buffer sets kept per engine (one per distinct input shape)
ALIGN = 256  # bytes; cudaMalloc returns 256-byte-aligned memory, offsets into it keep that alignment


# ---------------------------------------------------------------------------------------------- CUDA


class CudaStream:
    """One CUDA stream and the copies the backend needs (cuda-bindings runtime API)."""

    def __init__(self, cudart, device: int = 0):
        self.cudart = cudart
        check_cuda(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        self.stream = check_cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)  # what execute_async_v3 takes
        self._pinned: list[np.ndarray] = []  # host arrays referenced by queued copies, until synchronize

    def malloc(self, nbytes: int) -> int:
        return int(check_cuda(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.cudart.cudaFree(ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        """Host -> device, queued on the stream. ``array`` is kept alive until :meth:`synchronize`."""
        array = np.ascontiguousarray(array)
        self._pinned.append(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        check_cuda(self.cudart, self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind,
                                                            self.stream), "cudaMemcpyAsync(H2D)")

    def download(self, array: np.ndarray, ptr: int) -> None:
        """Device -> host into the contiguous ``array``; valid after :meth:`synchronize`."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._pinned.append(array)
        check_cuda(self.cudart, self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind,
                                                            self.stream), "cudaMemcpyAsync(D2H)")

    def synchronize(self) -> None:
        check_cuda(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._pinned.clear()


class DeviceBuffer:
    """``nbytes`` of device memory for one tensor of ``shape``/``dtype``; freed with :meth:`free`."""

    def __init__(self, cuda: CudaStream, shape: tuple[int, ...], dtype: np.dtype):
        self.cuda, self.shape, self.dtype = cuda, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = cuda.malloc(self.nbytes)

    def free(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0


# ---------------------------------------------------------------------------------------------- engines


def _numpy_dtype(trt, dtype) -> np.dtype:
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
             "INT8": np.int8, "UINT8": np.uint8}
    for name, np_type in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return np.dtype(np_type)
    raise BackendError(f"engine I/O type {dtype} has no NumPy equivalent.", "export graphs with fp32 I/O.")


class TrtGraph:
    """One deserialized engine with its execution context; ``run(feeds) -> outputs`` on host arrays."""

    providers = ["TensorRT"]

    def __init__(self, trt, runtime, cuda: CudaStream, path: Path, spec: GraphSpec, profile: GraphProfile,
                 hint, latents_per_second: float):
        self.trt, self.cuda, self.spec, self.profile = trt, cuda, spec, profile
        self.name = spec.name
        self._hint, self._lps = hint, latents_per_second
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {path} (see the TensorRT log above).",
                                "rebuild the engines on this machine with `acestep-trt build ARTIFACTS_DIR`.")
        self.context = self.engine.create_execution_context()
        self.inputs = [t.name for t in spec.inputs]
        self.outputs = [t.name for t in spec.outputs]
        self.dtypes = self._io_dtypes()
        self._sets: OrderedDict[tuple, dict[str, DeviceBuffer]] = OrderedDict()
        self._bound: tuple | None = None
        self.out_shapes: dict[str, tuple[int, ...]] = {}

    def _io_dtypes(self) -> dict[str, np.dtype]:
        trt, engine = self.trt, self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(self.inputs + self.outputs):
            raise ArtifactError(f"{self.name} engine has tensors {sorted(names)}, the spec says "
                                f"{sorted(self.inputs + self.outputs)}.", "rebuild the engines.")
        for name in self.inputs:
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                raise ArtifactError(f"{self.name}.{name} is not an input of the engine.", "rebuild the engines.")
        return {name: _numpy_dtype(trt, engine.get_tensor_dtype(name)) for name in names}

    def check(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Spec check (names, dtypes, ranks) then profile check (ranges); returns the bound dims."""
        bound = self.spec.check_feeds(feeds)
        self.profile.check(bound, self._hint, self._lps)
        return bound

    def check_dims(self, dims: dict[str, int]) -> None:
        """Profile check of dims known before any work (batch, latent_len); others are skipped."""
        self.profile.check(dims, self._hint, self._lps)

    def set_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Set the context's input shapes (within the profile: checked before) and read the output shapes."""
        for name in self.inputs:
            if not self.context.set_input_shape(name, tuple(shapes[name])):
                raise BackendError(f"TensorRT refused shape {shapes[name]} for {self.name}.{name}.",
                                   "rebuild the engines with a profile that covers it, or use --backend ort.")
        self.out_shapes = {o: tuple(int(d) for d in self.context.get_tensor_shape(o)) for o in self.outputs}
        self._bound = None  # addresses must be set again for these shapes

    def bind(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, DeviceBuffer]:
        """Set input shapes and tensor addresses for ``shapes``; buffers are allocated once per shape."""
        key = tuple((n, tuple(shapes[n])) for n in self.inputs)
        if key == self._bound:
            return self._sets[key]
        self.set_shapes(shapes)
        if key not in self._sets:
            self._sets[key] = {n: DeviceBuffer(self.cuda, shapes[n], self.dtypes[n]) for n in self.inputs}
            self._sets[key].update({o: DeviceBuffer(self.cuda, s, self.dtypes[o]) for o, s in self.out_shapes.items()})
            while len(self._sets) > SHAPE_CACHE:
                _, old = self._sets.popitem(last=False)
                self.cuda.synchronize()
                for buf in old.values():
                    buf.free()
        self._sets.move_to_end(key)
        for name, buf in self._sets[key].items():
            self.context.set_tensor_address(name, buf.ptr)
        self._bound = key
        return self._sets[key]

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise BackendError(f"TensorRT failed to run {self.name} (see the TensorRT log above).", NO_GPU)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host feeds -> host outputs (same contract as ``OrtGraph.run``)."""
        self.check(feeds)
        buffers = self.bind({n: feeds[n].shape for n in self.inputs})
        for name in self.inputs:
            self.cuda.upload(buffers[name].ptr, feeds[name])
        self.enqueue()
        outputs = {o: np.empty(self.out_shapes[o], self.dtypes[o]) for o in self.outputs}
        for name, array in outputs.items():
            self.cuda.download(array, buffers[name].ptr)
        self.cuda.synchronize()
        return outputs

    def close(self) -> None:
        for buffers in self._sets.values():
            for buf in buffers.values():
                buf.free()
        self._sets.clear()
        self._bound = None


class TrtDitGraph(TrtGraph):
    """dit_step with :meth:`denoise`: the whole Euler loop with the latents on the GPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop: dict[tuple, DeviceBuffer] = {}  # latents shape -> second latent buffer (ping-pong)
        self._tables: dict[tuple, tuple[DeviceBuffer, DeviceBuffer]] = {}  # (steps, slot) -> timesteps, dts
        self._blend: dict[tuple, tuple] = {}  # (latents, condition 2 shape) -> condition 2, plain latents, strength
        self.mixer: TrtGraph | None = None  # the cover_blend engine, set by load_engines when it exists

    def set_weights(self, values: dict[str, np.ndarray], original: bool = False) -> None:
        """Refit the engine's weights {initializer: array} in place (LoRA; needs `build --refit`).

        ``original``: ``values`` are the exported weights being restored (refit writes them like any other).
        """
        from ..trt.refit import refit

        refit(self.trt, self.engine, values)

    def denoise(self, latents: np.ndarray, condition: np.ndarray, context: np.ndarray, timesteps: np.ndarray,
                sigmas: np.ndarray, blend=None) -> np.ndarray:
        """Euler loop without guidance; mirrors ``AceStepRuntime.denoise_host``.

        latents [B, T, 64], condition [B, C, H], context [B, T, 128], timesteps [N], sigmas [N + 1]
        -> latents [B, T, 64] after N steps of ``x = dit_step(x, t[i], dt=sigma[i+1] - sigma[i]).next_latents``.
        ``blend`` = (audio_cover_strength, text2music condition [B, C2, H]): each step runs ``dit_step`` with
        both conditions from the same latents and the ``cover_blend`` engine (:attr:`mixer`) mixes the two
        next_latents, ``s * cover + (1 - s) * text2music`` (diffusers' velocity blend, see the cover_blend spec).
        Uploads latents, conditions, context and the per-step tables once; downloads the result once.
        """
        batch, steps = latents.shape[0], len(timesteps)
        # per-step tables, one 256-byte-aligned slot per step (I/O addresses must be aligned)
        slot = -(-batch * 4 // ALIGN) * ALIGN // 4  # floats per slot
        ts = np.zeros((steps, slot), np.float32)  # [N, slot]: t[i] repeated for the batch
        ts[:, :batch] = np.asarray(timesteps, np.float32)[:, None]
        dts = np.zeros((steps, slot), np.float32)  # [N, slot]: dt[i] repeated for the batch
        dts[:, :batch] = (np.asarray(sigmas[1:], np.float32) - np.asarray(sigmas[:-1], np.float32))[:, None]
        feeds = {"latents": latents.astype(np.float32), "timestep": ts[0, :batch],
                 "encoder_hidden_states": condition.astype(np.float32), "context_latents": context.astype(np.float32),
                 "dt": dts[0, :batch]}
        self.check(feeds)
        mix = self._blend_setup(feeds, blend) if blend else None  # checked before any buffer is touched
        dit = self.bind({n: feeds[n].shape for n in self.inputs})
        ping, pong = dit["latents"], self._pong(latents.shape)
        ts_dev, dts_dev = self._step_tables(ts.shape, dts.shape)
        try:
            for name in ("encoder_hidden_states", "context_latents"):
                self.cuda.upload(dit[name].ptr, feeds[name])
            self.cuda.upload(ping.ptr, feeds["latents"])
            self.cuda.upload(ts_dev.ptr, ts)
            self.cuda.upload(dts_dev.ptr, dts)
            if mix:
                self._blend_upload(mix)
            for i in range(steps):
                for name, ptr in (("latents", ping.ptr), ("timestep", ts_dev.ptr + i * slot * 4),
                                  ("dt", dts_dev.ptr + i * slot * 4), ("next_latents", pong.ptr)):
                    self.context.set_tensor_address(name, ptr)
                self.enqueue()  # velocity -> dit["velocity"], next_latents -> pong
                if mix:  # same latents, text2music condition -> plain; cover_blend(pong, plain) -> ping
                    self._blend_step(mix, dit, ping, pong)
                else:
                    ping, pong = pong, ping
            result = np.empty(latents.shape, np.float32)
            self.cuda.download(result, ping.ptr)
            self.cuda.synchronize()
        finally:
            self._bound = None  # addresses were moved: rebind on the next run
            if mix:
                self.mixer._bound = None
        return result

    def _blend_setup(self, feeds: dict[str, np.ndarray], blend) -> dict:
        """Check the text2music condition against the DiT profile and the blend against cover_blend's; allocate
        (once per shape) the second condition, the text2music next_latents and the strength on the device."""
        if self.mixer is None:
            raise BackendError("cover strength on the TensorRT loop needs the cover_blend engine.",
                               "rebuild the engines with `acestep-trt build ARTIFACTS_DIR` (it builds cover_blend).")
        strength, second = blend
        second = np.ascontiguousarray(second, dtype=np.float32)
        self.check({**feeds, "encoder_hidden_states": second})
        shape = feeds["latents"].shape
        mixing = {"cover_latents": feeds["latents"], "text2music_latents": feeds["latents"],
                  "strength": np.array([strength], np.float32)}
        self.mixer.check(mixing)
        key = (shape, second.shape)
        if key not in self._blend:
            self._free(self._blend)
            self._blend = {key: (DeviceBuffer(self.cuda, second.shape, np.float32),
                                 DeviceBuffer(self.cuda, shape, np.float32), DeviceBuffer(self.cuda, (1,), np.float32))}
        cond2, plain, strength_dev = self._blend[key]
        return {"condition": second, "strength": mixing["strength"], "cond2": cond2, "plain": plain,
                "strength_dev": strength_dev, "shapes": {n: feeds[n].shape for n in self.inputs}}

    def _blend_upload(self, mix: dict) -> None:
        self.cuda.upload(mix["cond2"].ptr, mix["condition"])
        self.cuda.upload(mix["strength_dev"].ptr, mix["strength"])
        shape = mix["shapes"]["latents"]
        self.mixer.set_shapes({"cover_latents": shape, "text2music_latents": shape, "strength": (1,)})

    def _blend_step(self, mix: dict, dit: dict, ping: DeviceBuffer, cover: DeviceBuffer) -> None:
        """Second DiT evaluation of the step (text2music condition, its own cond_len) and the blend into ``ping``."""
        shapes = mix["shapes"]
        self._set_condition(mix["condition"].shape, mix["cond2"].ptr)
        self.context.set_tensor_address("next_latents", mix["plain"].ptr)
        self.enqueue()  # next_latents of the text2music condition -> plain
        self._set_condition(shapes["encoder_hidden_states"], dit["encoder_hidden_states"].ptr)
        for name, ptr in (("cover_latents", cover.ptr), ("text2music_latents", mix["plain"].ptr),
                          ("strength", mix["strength_dev"].ptr), ("latents", ping.ptr)):
            self.mixer.context.set_tensor_address(name, ptr)
        self.mixer.enqueue()  # the step's latents, blended, -> ping (the DiT has read it already)

    def _set_condition(self, shape: tuple[int, ...], ptr: int) -> None:
        if not self.context.set_input_shape("encoder_hidden_states", tuple(shape)):
            raise BackendError(f"TensorRT refused shape {tuple(shape)} for {self.name}.encoder_hidden_states.",
                               "rebuild the engines with a profile that covers it, or use --backend ort.")
        self.context.set_tensor_address("encoder_hidden_states", ptr)

    def _pong(self, shape: tuple[int, ...]) -> DeviceBuffer:
        """The second latent buffer for ``shape``, allocated once per shape (the last one is kept)."""
        key = tuple(shape)
        if key not in self._loop:
            self._free(self._loop)
            self._loop = {key: DeviceBuffer(self.cuda, key, np.float32)}
        return self._loop[key]

    def _step_tables(self, ts_shape, dts_shape) -> tuple[DeviceBuffer, DeviceBuffer]:
        key = (tuple(ts_shape), tuple(dts_shape))
        if key not in self._tables:
            self._free(self._tables)
            self._tables = {key: (DeviceBuffer(self.cuda, ts_shape, np.float32),
                                  DeviceBuffer(self.cuda, dts_shape, np.float32))}
        return self._tables[key]

    def _free(self, table: dict) -> None:
        self.cuda.synchronize()
        for value in table.values():
            for buf in value if isinstance(value, tuple) else (value,):
                buf.free()

    def close(self) -> None:
        super().close()
        self._free(self._loop)
        self._free(self._tables)
        self._free(self._blend)
        self._loop, self._tables, self._blend = {}, {}, {}


# ---------------------------------------------------------------------------------------------- loading


def load_engines(artifacts: Artifacts, engine_dir: str | Path | None = None, vae_window: int = DEFAULT_VAE_WINDOW,
                 device: int = 0, full_hash: bool = True) -> dict[str, TrtGraph]:
    """Verify and deserialize every engine for ``artifacts``; graph name -> runner.

    ``full_hash=False`` checks engine sizes but not their SHA-256 (for engines this process has just built).

    Raises :class:`BackendError` (no TensorRT, cuda-bindings or GPU) or :class:`ArtifactError` (stale,
    foreign or corrupted engines), each with the remedy.
    """
    try:
        trt = import_tensorrt(lean_ok=True)
        cudart = import_cudart()
        gpu = gpu_info(cudart, device)
    except BackendError as err:
        raise BackendError(err.problem, f"{err.remedy} Or use --backend ort (ONNX Runtime).") from None
    engine_dir = Path(engine_dir) if engine_dir is not None else default_engine_dir(artifacts.root)
    manifest = verify_engines(engine_dir, artifacts.root, artifacts.manifest, None, str(trt.__version__),
                              gpu.compute_capability, full_hash=full_hash)  # core + audio graphs built
    _check_runtime_fits(trt, manifest, vae_window, artifacts.root, engine_dir)
    cuda = CudaStream(cudart, device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if manifest.version_compatible and hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True  # the plan embeds the lean runtime (trusted: we built it)
    out = None if engine_dir == default_engine_dir(artifacts.root) else str(engine_dir)
    tok = artifacts.audio_tokenizer

    def hint(graph, dim, size):
        return rebuild_args(str(artifacts.root), manifest.request, artifacts.config, graph, dim, size, out,
                            tok.pool_window if tok else None)

    def open_graph(cls, name, spec, **extra):
        return cls(trt, runtime, cuda, manifest.engine_path(name), spec, manifest.profile(name), hint,
                   artifacts.config.latents_per_second, **extra)

    runners = {name: open_graph(TrtDitGraph if name == DIT_STEP else TrtGraph, name, artifacts.spec(name))
               for name in engine_graphs(manifest, artifacts.manifest)}
    runners[DIT_STEP].mixer = runners.get(COVER_BLEND)  # cover strength on the device loop
    missing = missing_audio_engines(manifest, artifacts.manifest)
    if missing:
        log.warning("%s has no TensorRT engines for %s (built by an earlier acestep-trt): they run in ONNX "
                    "Runtime%s. To run them on TensorRT, %s", engine_dir, ", ".join(missing),
                    ", and cover strength on the host loop" if COVER_BLEND in missing else "",
                    rebuild_remedy(artifacts.root, engine_dir).replace(" (or use --backend ort)", ""))
    log.info("TensorRT %s engines from %s on %s (compute capability %s)", trt.__version__, engine_dir, gpu.name,
             gpu.compute_capability)
    return runners


def _check_runtime_fits(trt, manifest: EngineManifest, vae_window: int, artifacts_dir, engine_dir) -> None:
    """The lean runtime runs only version-compatible engines; the VAE engine fixes the largest window."""
    if is_lean(trt) and not manifest.version_compatible:
        raise ArtifactError(
            f"only the TensorRT lean runtime is installed, and the engines in {engine_dir} are not "
            "version-compatible.", "rebuild them with `acestep-trt build ARTIFACTS_DIR --version-compatible`, or "
            "install the full TensorRT (`pip install tensorrt-cu13`).")
    built = manifest.request.vae_window
    if vae_window > built:
        raise BackendError(
            f"vae_window {vae_window} is larger than the window the VAE engine was built for ({built}).",
            f"load with vae_window <= {built}, or rebuild the engines with "
            f"`acestep-trt build {artifacts_dir} --vae-window {vae_window}` (and the other options as before).")


def engines_usable(artifacts_dir: str | Path, engine_dir: str | Path | None = None) -> str | None:
    """For ``backend="auto"``: None when TensorRT engines exist and may run here, else the reason why not.

    Cheap: checks libraries, GPU, versions and ONNX hashes, and engine file sizes (not their hashes).
    """
    engine_dir = Path(engine_dir) if engine_dir is not None else default_engine_dir(artifacts_dir)
    if not (engine_dir / ENGINE_MANIFEST).is_file():
        return f"no TensorRT engines at {engine_dir}"
    try:
        trt = import_tensorrt(lean_ok=True)
        gpu = gpu_info(import_cudart())
        manifest = verify_engines(engine_dir, artifacts_dir, read_manifest(artifacts_dir), None,  # audio ones too
                                  str(trt.__version__), gpu.compute_capability, full_hash=False)
        if is_lean(trt) and not manifest.version_compatible:
            return "only the lean TensorRT runtime is installed and the engines are not version-compatible"
    except AceStepError as err:
        return err.problem
    return None

