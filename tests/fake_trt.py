"""Fake ``tensorrt`` and ``cuda.bindings.runtime`` modules for CPU tests of the TensorRT code paths.

They implement only the API names the toolkit uses, with the real signatures, and record every call.
They are faithful where it matters for our logic:

- "device memory" is real host memory (NumPy buffers); pointers are real addresses, and every copy and
  every engine I/O address is checked to lie inside one allocation of sufficient size;
- ``build_serialized_network`` fails (returns None, as TensorRT does) when a dynamic input has no
  profile entry, or a profile's min/opt/max do not fit the input's rank and fixed dims;
- a serialized "plan" is JSON describing the network and its profile; executing it runs the ONNX graph
  with ONNX Runtime (or the Euler network in NumPy) on the bytes found at the bound addresses, after
  checking the shapes against the profile, as TensorRT's ``set_input_shape`` does.

Install with :func:`install` (monkeypatching ``sys.modules``).
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------------------------------------- cuda


class CudaError(enum.Enum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class MemcpyKind(enum.Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self):
        return self.handle


@dataclass
class Props:
    name: bytes
    major: int
    minor: int


class FakeCudart(types.ModuleType):
    """``cuda.bindings.runtime`` on host memory. ``gpus=0`` behaves like a machine without a driver."""

    def __init__(self, gpus: int = 1, capability=(9, 0), name=b"NVIDIA H100 80GB HBM3"):
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t = CudaError
        self.cudaMemcpyKind = MemcpyKind
        self.gpus, self.capability, self.gpu_name = gpus, capability, name
        self.allocations: dict[int, np.ndarray] = {}
        self.calls: list[tuple] = []
        self.mallocs = 0

    def cudaGetDeviceCount(self):
        if not self.gpus:
            return CudaError.cudaErrorInsufficientDriver, None
        return CudaError.cudaSuccess, self.gpus

    def cudaGetDeviceProperties(self, device):
        return CudaError.cudaSuccess, Props(self.gpu_name, *self.capability)

    def cudaSetDevice(self, device):
        return (CudaError.cudaSuccess,)

    def cudaStreamCreate(self):
        self.calls.append(("cudaStreamCreate",))
        return CudaError.cudaSuccess, FakeStream(0xC0FFEE)

    def cudaMalloc(self, size):
        raw = np.zeros(int(size) + 256, np.uint8)
        offset = -raw.ctypes.data % 256  # cudaMalloc returns 256-byte-aligned memory
        buf = raw[offset: offset + int(size)]
        ptr = buf.ctypes.data
        self.allocations[ptr] = buf
        self.mallocs += 1
        self.calls.append(("cudaMalloc", int(size)))
        return CudaError.cudaSuccess, ptr

    def cudaFree(self, devPtr):  # noqa: N803 - cuda-bindings' parameter names
        self.calls.append(("cudaFree", devPtr))
        if self.allocations.pop(int(devPtr), None) is None:
            return (CudaError.cudaErrorInvalidValue,)
        return (CudaError.cudaSuccess,)

    def check_device(self, ptr: int, nbytes: int) -> None:
        """Raise unless [ptr, ptr + nbytes) lies inside one allocation."""
        for base, buf in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                return
        raise AssertionError(f"device range {ptr:#x}+{nbytes} is outside every allocation")

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert isinstance(stream, FakeStream)
        if kind in (MemcpyKind.cudaMemcpyHostToDevice, MemcpyKind.cudaMemcpyDeviceToDevice):
            self.check_device(int(dst), count)
        if kind in (MemcpyKind.cudaMemcpyDeviceToHost, MemcpyKind.cudaMemcpyDeviceToDevice):
            self.check_device(int(src), count)
        ctypes.memmove(int(dst), int(src), int(count))
        self.calls.append(("cudaMemcpyAsync", kind.name, int(count)))
        return (CudaError.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("cudaStreamSynchronize",))
        return (CudaError.cudaSuccess,)

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)


# ---------------------------------------------------------------------------------------------- tensorrt


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    TF32 = 1
    VERSION_COMPATIBLE = 2
    EXCLUDE_LEAN_RUNTIME = 3
    REFIT = 4


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    INT8 = "int8"
    UINT8 = "uint8"
    BF16 = "bfloat16"  # weights only (refit); engine I/O stays fp32


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ElementWiseOperation(enum.Enum):
    SUM = 0
    PROD = 1


class Logger:
    VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1

    def __init__(self, min_severity=2):
        self.severity = min_severity


@dataclass
class Tensor:
    name: str
    dtype: DataType
    shape: tuple


@dataclass
class Layer:
    op: ElementWiseOperation
    a: Tensor
    b: Tensor
    out: Tensor

    def get_output(self, index):
        return self.out


@dataclass
class Network:
    flags: int
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    onnx_path: str | None = None

    @property
    def num_inputs(self):
        return len(self.inputs)

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]

    def add_input(self, name, dtype, shape):
        tensor = Tensor(name, dtype, tuple(shape))
        self.inputs.append(tensor)
        return tensor

    def add_elementwise(self, input1, input2, op):
        layer = Layer(op, input1, input2, Tensor(f"layer{len(self.layers)}", input1.dtype, input1.shape))
        self.layers.append(layer)
        return layer

    def mark_output(self, tensor):
        self.outputs.append(tensor)


_ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 9: DataType.BOOL}


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, model):
        import onnx

        path = model
        FakeTrt.current.calls.append(("parse_from_file", path))
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"cannot read {path}: {exc}")
            return False
        for value in model.graph.input:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self.network.add_input(value.name, _ONNX_TYPES[value.type.tensor_type.elem_type], dims)
        for value in model.graph.output:
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)
            self.network.mark_output(Tensor(value.name, _ONNX_TYPES[value.type.tensor_type.elem_type], dims))
        self.network.onnx_path = path
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's keyword names
        FakeTrt.current.calls.append(("set_shape", input, tuple(min), tuple(opt), tuple(max)))
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class TimingCache:
    """``fake-timing-cache:N`` (N entries); any other bytes stand for a cache of another TensorRT or GPU,
    which ``set_timing_cache(cache, ignore_mismatch=False)`` refuses (returns False), as TensorRT does."""

    def __init__(self, data: bytes):
        text = data.decode(errors="replace")
        self.valid = not data or (text.startswith("fake-timing-cache:") and text.split(":")[1].isdigit())
        self.entries = int(text.split(":")[1]) if data and self.valid else 0

    def serialize(self):
        return f"fake-timing-cache:{self.entries}".encode()


class BuilderConfig:
    def __init__(self):
        self.flags = {BuilderFlag.TF32}  # TensorRT enables TF32 by default
        self.profiles: list[OptimizationProfile] = []
        self.timing_cache = None
        self.pool_limits = {}

    def set_flag(self, flag):
        self.flags.add(flag)

    def clear_flag(self, flag):
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, pool_size):
        self.pool_limits[pool] = pool_size

    def create_timing_cache(self, serialized_timing_cache):
        FakeTrt.current.calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
        return TimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        if not (cache.valid or ignore_mismatch):
            return False
        self.timing_cache = cache
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        FakeTrt.current.calls.append(("create_network", flags))
        return Network(flags)

    def create_builder_config(self):
        return BuilderConfig()

    def create_optimization_profile(self):
        return OptimizationProfile()

    def build_serialized_network(self, network, config):
        trt = FakeTrt.current
        trt.builds.append((network, config))
        if len(config.profiles) != 1 or config.timing_cache is None:
            return None
        shapes = config.profiles[0].shapes
        for tensor in network.inputs:
            if -1 in tensor.shape and tensor.name not in shapes:
                return None  # "network has dynamic inputs but no profile for them"
            for s in shapes.get(tensor.name, ()):
                if len(s) != len(tensor.shape) or any(d != -1 and d != v for d, v in zip(tensor.shape, s)):
                    return None
            if tensor.name in shapes:
                lo, opt, hi = shapes[tensor.name]
                if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                    return None
        config.timing_cache.entries += 1
        plan = {
            "fake_plan": 1, "tensorrt_version": trt.__version__, "onnx": network.onnx_path,
            "inputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.inputs],
            "outputs": [[t.name, t.dtype.name, list(t.shape)] for t in network.outputs],
            "profile": {k: [list(x) for x in v] for k, v in shapes.items()},
            "flags": sorted(f.name for f in config.flags), "network_flags": network.flags,
        }
        return json.dumps(plan).encode()


class Runtime:
    def __init__(self, logger):
        self.logger = logger
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, serialized_engine):
        trt = FakeTrt.current
        trt.calls.append(("deserialize_cuda_engine", len(serialized_engine)))
        try:
            plan = json.loads(bytes(serialized_engine))
        except ValueError:
            return None
        if "VERSION_COMPATIBLE" in plan["flags"] and not self.engine_host_code_allowed:
            return None  # TensorRT refuses plans with host code unless allowed
        return Engine(plan)


class Engine:
    def __init__(self, plan):
        self.plan = plan
        self.io = [(n, TensorIOMode.INPUT, DataType[d], s) for n, d, s in plan["inputs"]] + \
                  [(n, TensorIOMode.OUTPUT, DataType[d], s) for n, d, s in plan["outputs"]]
        self._session = None
        self.refitted: dict[str, np.ndarray] = {}  # initializer -> value set by a Refitter

    @property
    def refittable(self):
        return "REFIT" in self.plan["flags"]

    @property
    def num_io_tensors(self):
        return len(self.io)

    def get_tensor_name(self, index):
        return self.io[index][0]

    def _tensor(self, name):
        return next(t for t in self.io if t[0] == name)

    def get_tensor_mode(self, name):
        return self._tensor(name)[1]

    def get_tensor_dtype(self, name):
        return self._tensor(name)[2]

    def get_tensor_profile_shape(self, name, profile_index):
        return self.plan["profile"][name]

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.refitted:  # refitted weights replace the ONNX initializers, as on the GPU
                options.add_external_initializers(
                    list(self.refitted),
                    [ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v, 16) if v.dtype == np.uint16
                     else ort.OrtValue.ortvalue_from_numpy(v) for v in self.refitted.values()])
            self._session = ort.InferenceSession(self.plan["onnx"], options, providers=["CPUExecutionProvider"])
        return self._session

    def create_execution_context(self):
        return Context(self)


class Context:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self._out_shapes: dict[tuple, dict] = {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.plan["profile"][name]
        ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        if ok:
            self.shapes[name] = tuple(int(s) for s in shape)
        return ok

    def _inputs(self, reader):
        return {n: reader(n, self.shapes[n], np.dtype(DataType[d].value)) for n, d, _ in self.engine.plan["inputs"]}

    def _compute(self, feeds):
        names = [n for n, _, _ in self.engine.plan["outputs"]]
        return dict(zip(names, self.engine.session().run(names, feeds)))

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        key = tuple(sorted(self.shapes.items()))
        if key not in self._out_shapes:  # shape inference: run on dummy inputs of the set shapes
            dummy = self._inputs(lambda n, s, dt: np.ones(s, dt) if dt == np.bool_ else np.zeros(s, dt))
            self._out_shapes[key] = {k: v.shape for k, v in self._compute(dummy).items()}
        return self._out_shapes[key][name]

    def set_tensor_address(self, name, memory):
        assert int(memory) % 256 == 0, f"{name}: address {int(memory):#x} is not 256-byte aligned"  # conservative
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        trt = FakeTrt.current
        trt.calls.append(("execute_async_v3", self.engine.plan["onnx"]))
        cuda = trt.cudart
        names = [n for n, _, _ in self.engine.plan["inputs"]] + [n for n, _, _ in self.engine.plan["outputs"]]
        if any(n not in self.addresses for n in names) or len(self.shapes) != len(self.engine.plan["inputs"]):
            return False

        def read(name, shape, dtype):
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            cuda.check_device(self.addresses[name], nbytes)
            raw = (ctypes.c_char * nbytes).from_address(self.addresses[name])
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

        outputs = self._compute(self._inputs(read))
        for name, value in outputs.items():
            value = np.ascontiguousarray(value)
            assert tuple(value.shape) == tuple(self.get_tensor_shape(name))
            cuda.check_device(self.addresses[name], value.nbytes)
            ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
        return True


class Weights:
    """``trt.Weights(type, ptr, count)``: a view of host memory (read when the refit runs)."""

    def __init__(self, type, ptr, count):  # noqa: A002 - TensorRT's parameter name
        self.dtype, self.ptr, self.count = type, int(ptr), int(count)


_WEIGHT_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 16: DataType.BF16}
_NUMPY_WEIGHTS = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.BF16: np.uint16}


class Refitter:
    """``trt.Refitter``: refittable weights are the ONNX graph's float initializers (the parser names
    weights after them); set values must match each initializer's element count and type."""

    def __init__(self, engine, logger):
        import onnx

        FakeTrt.current.calls.append(("Refitter", engine.plan["onnx"]))
        self.engine, self.pending = engine, {}
        model = onnx.load(engine.plan["onnx"], load_external_data=False)
        self.weights = {i.name: (tuple(i.dims), _WEIGHT_TYPES[i.data_type]) for i in model.graph.initializer
                        if i.data_type in _WEIGHT_TYPES} if engine.refittable else {}

    def get_all_weights(self):
        return list(self.weights)

    def set_named_weights(self, name, weights):
        if name not in self.weights:
            return False
        dims, dtype = self.weights[name]
        if weights.dtype != dtype or weights.count != int(np.prod(dims, dtype=np.int64)):
            return False
        kind = _NUMPY_WEIGHTS[dtype]
        raw = (ctypes.c_char * (weights.count * np.dtype(kind).itemsize)).from_address(weights.ptr)
        self.pending[name] = np.frombuffer(raw, dtype=kind).reshape(dims).copy()
        return True

    def get_missing_weights(self):
        return []

    def refit_cuda_engine(self):
        FakeTrt.current.calls.append(("refit_cuda_engine", sorted(self.pending)))
        self.engine.refitted.update(self.pending)
        self.engine._session = None  # the next execution runs with the new weights
        return True


class FakeTrt(types.ModuleType):
    """The ``tensorrt`` module. ``FakeTrt.current`` is the installed instance (for the classes above)."""

    current: "FakeTrt" = None

    def __init__(self, version: str = "10.13.0.35", cudart: FakeCudart | None = None, name: str = "tensorrt"):
        super().__init__(name)
        self.__version__ = version
        self.cudart = cudart
        self.calls: list[tuple] = []
        self.builds: list[tuple] = []
        lean = name.split(".")[0] in LEAN_NAMES
        for obj in (BuilderFlag, MemoryPoolType, DataType, TensorIOMode, Logger, Runtime, Refitter, Weights):
            setattr(self, obj.__name__, obj)
        if not lean:  # the lean runtime has no builder, network or parser (as tensorrt_lean_bindings 11.4)
            for obj in (NetworkDefinitionCreationFlag, ElementWiseOperation, Builder, OnnxParser):
                setattr(self, obj.__name__, obj)

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)


FULL_NAMES = ("tensorrt", "tensorrt_bindings")  # as runtime/trt/libs.py looks them up
LEAN_NAMES = ("tensorrt_lean", "tensorrt_lean_bindings")


def block_tensorrt(monkeypatch) -> None:
    """Make every TensorRT module unimportable (the real lean bindings are installed in the test venv)."""
    import sys

    for name in FULL_NAMES + LEAN_NAMES:
        monkeypatch.setitem(sys.modules, name, None)


def install(monkeypatch, version="10.13.0.35", gpus=1, capability=(9, 0), lean=False, name=None):
    """Put a fake TensorRT (``tensorrt``, or only the lean ``tensorrt_lean``; ``name`` picks another module name,
    e.g. ``tensorrt_bindings``) and cuda-bindings in ``sys.modules``; every other TensorRT name is blocked."""
    import sys

    name = name or ("tensorrt_lean" if lean else "tensorrt")
    cudart = FakeCudart(gpus=gpus, capability=capability)
    trt = FakeTrt(version, cudart, name=name)
    FakeTrt.current = trt
    block_tensorrt(monkeypatch)
    monkeypatch.setitem(sys.modules, name, trt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart
