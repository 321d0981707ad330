"""tests/fake_trt.py held against the real TensorRT 11.4 and cuda-bindings modules (no GPU needed).

Every class, method, property and enum member the fakes implement (they implement what our code calls,
with the parameter names TensorRT uses) must exist in the real modules and accept the fake's parameters:
- in the real ``tensorrt_lean_bindings`` (runtime, engine, context, profile, timing cache, enums) and
  ``cuda.bindings.runtime``, by their signatures;
- in the full ``tensorrt_bindings`` (builder, network, parser, config too), which cannot be imported here, by
  the string literals of its extension module: the name is there, and a docstring lists the parameters in
  that order (constructors, which TensorRT documents without ``:arg`` lists: each parameter name is there).
What this cannot tell is said in docs/tensorrt.md: return values, behaviour, anything needing a GPU.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from . import fake_trt
from .conftest import has_gpu
from .real_trt import TRT_VERSION, accepts, bindings_strings, import_lean, signatures

# fake class -> the TensorRT class it stands for
REAL_CLASS = {
    "Logger": "Logger", "OptimizationProfile": "IOptimizationProfile", "TimingCache": "ITimingCache",
    "Runtime": "Runtime", "Engine": "ICudaEngine", "Context": "IExecutionContext", "Builder": "Builder",
    "BuilderConfig": "IBuilderConfig", "Network": "INetworkDefinition", "Tensor": "ITensor", "Layer": "ILayer",
    "OnnxParser": "OnnxParser", "Refitter": "Refitter", "Weights": "Weights",
}
ENUMS = ("NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "DataType", "TensorIOMode",
         "ElementWiseOperation")
TEST_ONLY = {"Engine": {"session"}}  # fake helpers that are not TensorRT API
CONSTRUCTED = {"Logger", "Builder", "OnnxParser", "Runtime", "Refitter", "Weights"}  # our code creates these; TensorRT returns the rest
# attributes the fakes set per instance (real: properties)
INSTANCE_ATTRIBUTES = {"Runtime": ("engine_host_code_allowed",), "Tensor": ("name", "dtype", "shape")}


def fake_members(cls) -> dict[str, tuple]:
    """name -> ("method", params, defaults) | ("property",) | ("attribute",) for the fake TensorRT class."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    members = {}
    for name, value in vars(cls).items():
        if (name.startswith("_") and name != "__init__") or name in fields or name in TEST_ONLY.get(cls.__name__, ()):
            continue
        if isinstance(value, property):
            members[name] = ("property",)
        elif inspect.isfunction(value):
            if name == "__init__" and cls.__name__ not in CONSTRUCTED:
                continue  # the real objects come from TensorRT calls, never from our constructor calls
            params = [p for p in inspect.signature(value).parameters.values() if p.name != "self"]
            members[name] = ("method", tuple(p.name for p in params),
                             frozenset(p.name for p in params if p.default is not inspect.Parameter.empty))
        elif isinstance(value, int):
            members[name] = ("attribute",)  # Logger.WARNING and the other severities
    members.update({name: ("property",) for name in INSTANCE_ATTRIBUTES.get(cls.__name__, ())})
    return members


def test_every_fake_class_is_mapped():
    fake = fake_trt.FakeTrt()
    exposed = {name for name in vars(fake) if isinstance(getattr(fake, name), type)}
    unmapped = {name for name in exposed if name not in ENUMS and name not in REAL_CLASS}
    assert not unmapped, f"map {sorted(unmapped)} in REAL_CLASS or ENUMS so they are checked against the real modules"
    assert set(REAL_CLASS) <= {name for name, value in vars(fake_trt).items() if isinstance(value, type)}


def test_fake_tensorrt_matches_the_real_lean_module():
    """Runtime, engine, context, profile, timing cache, logger and enums: real signatures, real members."""
    trt = import_lean()
    assert trt.__version__ == TRT_VERSION
    problems = []
    for fake_name, real_name in REAL_CLASS.items():
        real = getattr(trt, real_name, None)
        if real is None:
            continue  # builder-side class: checked against the full bindings below
        for name, member in fake_members(getattr(fake_trt, fake_name)).items():
            attr = getattr(real, name, None)
            if attr is None:
                problems.append(f"{real_name}.{name} does not exist")
            elif member[0] == "method" and not accepts(signatures(attr, name), member[1]):
                problems.append(f"{real_name}.{name}{member[1]} does not match {signatures(attr, name)}")
            elif member[0] == "property" and not isinstance(attr, property):
                problems.append(f"{real_name}.{name} is not a property")
    for enum in ENUMS:
        real = getattr(trt, enum, None)
        if real is not None:
            missing = set(getattr(fake_trt, enum).__members__) - set(real.__members__)
            problems += [f"{enum}.{m} does not exist" for m in sorted(missing)]
    assert problems == []
    assert not hasattr(trt, "Builder") and not hasattr(trt, "OnnxParser")  # the fake's lean mode says the same


def test_fake_tensorrt_matches_the_full_bindings_strings():
    """Builder, config, network, parser (and everything else): names and documented parameters in tensorrt.so."""
    so = bindings_strings()
    problems = []
    for fake_name, real_name in REAL_CLASS.items():
        if not so.has_name(real_name):
            problems.append(f"class {real_name} not in tensorrt.so")
        for name, member in fake_members(getattr(fake_trt, fake_name)).items():
            if name != "__init__" and not so.has_name(name):
                problems.append(f"{real_name}.{name} not in tensorrt.so")
            if member[0] != "method" or not member[1]:
                continue
            documented = so.documents_args(member[1])
            if name == "__init__" and not documented:  # constructors carry no :arg list; their py::arg names
                documented = all(so.has_name(p) for p in member[1])
            if not documented:
                problems.append(f"{real_name}.{name}{member[1]}: no docstring lists these parameters")
    for enum in ENUMS:
        problems += [f"{enum}.{m} not in tensorrt.so" for m in [enum, *getattr(fake_trt, enum).__members__]
                     if not so.has_name(m)]
    assert problems == [], f"{so.wheel.name} (sha256 of tensorrt.so {so.sha256[:12]}): {problems}"


def test_string_check_can_fail():
    """The strings check is not vacuous: a made-up method, parameter order or enum member is not found."""
    so = bindings_strings()
    assert not so.has_name("build_serialized_network_v7") and not so.has_name("STRONGLY_TYPED_V2")
    assert so.documents_args(("cache", "ignore_mismatch")) and not so.documents_args(("ignore_mismatch", "cache"))
    assert so.documents_args(("pool", "pool_size")) and not so.documents_args(("pool", "size"))


def test_fake_cudart_matches_cuda_bindings():
    """Functions with cuda-bindings' parameter names, error and copy-kind members with the same values."""
    from cuda.bindings import runtime as cudart

    problems = []
    for name, member in fake_members(fake_trt.FakeCudart).items():
        if not name.startswith("cuda"):
            continue  # count / check_device: test helpers
        real = getattr(cudart, name, None)
        if real is None or not accepts(signatures(real, name), member[1]):
            problems.append(f"{name}{member[1]} vs {signatures(real, name) if real else 'missing'}")
    for fake_enum, real_enum in ((fake_trt.CudaError, cudart.cudaError_t), (fake_trt.MemcpyKind, cudart.cudaMemcpyKind)):
        for member in fake_enum:
            real = getattr(real_enum, member.name, None)
            if real is None or int(real) != member.value:
                problems.append(f"{real_enum.__name__}.{member.name} = {member.value} vs {real}")
    props = cudart.cudaDeviceProp()
    problems += [f"cudaDeviceProp.{f.name} missing" for f in dataclasses.fields(fake_trt.Props)
                 if not hasattr(props, f.name)]
    assert isinstance(props.name, bytes)  # the fake's Props.name is bytes too; gpu_info decodes both
    assert int(cudart.cudaStream_t()) == 0  # int(stream) is what execute_async_v3 gets
    assert problems == []


@pytest.mark.skipif(has_gpu(), reason="checks the no-GPU path of the real modules")
def test_our_loaders_on_the_real_modules_without_a_gpu():
    """import_tensorrt finds the real lean bindings; gpu_info reports the real driver error."""
    from cuda.bindings import runtime as cudart

    from acestep_trt.runtime.errors import BackendError
    from acestep_trt.runtime.trt.libs import gpu_info, import_tensorrt, is_lean, version_tuple

    lean = import_tensorrt(lean_ok=True)
    assert lean.__name__ == "tensorrt_lean_bindings" and is_lean(lean)
    assert version_tuple(lean.__version__) == (11, 4, 0, 106)
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        import_tensorrt()  # the lean runtime cannot build
    with pytest.raises(BackendError, match=r"no NVIDIA GPU is available \(cudaError"):
        gpu_info(cudart)
