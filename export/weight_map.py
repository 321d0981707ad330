"""Map every Linear weight of the DiT to its initializer in ``dit_step.onnx``, by exact bytes.

torch's dynamo exporter renames most Linear weights to anonymous initializers (``val_85``), stored
transposed ``[in, out]`` when they feed a MatMul and as ``[out, in]`` when they feed a Gemm; only norms,
tables, convolutions and Gemm weights keep their module names (DESIGN.md section 8). LoRA at generate
time needs to know which initializer holds which weight, so the map is built here, right after the
trace, while the traced module is still in memory: each weight is looked up by its exact bytes in both
orientations, in the dtype it was traced in (bf16 exports hold bf16 Linear weights). Norm-based
fingerprints misroute weights of equal statistics; exact bytes cannot, and a weight that matches no
initializer, or several, fails the export instead of loading the wrong tensor later.

The map lands in the manifest as ``graphs.dit_step.parameters``::

    {"layers.0.self_attn.to_q.weight": {"initializer": "val_131", "transposed": true, "dtype": "fp32",
     "shape": [64, 64], "location": "dit_step.onnx.data", "offset": 518144, "length": 16384}, ...}

``shape`` is the parameter's torch shape ``[out, in]``; the initializer holds it transposed when
``transposed``. ``location``/``offset``/``length`` say where its bytes are (``location`` null when the
initializer is stored inside the ``.onnx`` file), so the runtime reads only the tensors a LoRA targets.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from acestep_trt.runtime.errors import ExportValidationError
from acestep_trt.runtime.lora import ONNX_DTYPES

_REMEDY = ("report this with the checkpoint's config: the exported graph no longer holds the module's weights "
           "as initializers (an exporter or optimizer change), so LoRA adapters could not be applied to it.")


def linear_weights(transformer) -> dict[str, np.ndarray]:
    """Every ``nn.Linear`` weight of the DiT as raw-bytes NumPy arrays, keyed by parameter name.

    bf16 tensors come back as uint16 arrays of the same bits (NumPy has no bf16).
    """
    import torch

    out = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach().contiguous()
            raw = weight.view(torch.int16) if weight.dtype in (torch.bfloat16, torch.float16) else weight
            out[_clean(name) + ".weight"] = raw.numpy()
    return out


def _clean(name: str) -> str:
    """Module name without the fp32-island wrapper (``precision.fp32_island`` adds ``inner``)."""
    return ".".join(part for part in name.split(".") if part != "inner")


def _initializer_bytes(model, onnx_path: Path):
    """Yield (initializer, raw bytes view, location or None, offset, length) for every initializer."""
    from onnx import TensorProto

    maps: dict[str, mmap.mmap] = {}
    try:
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                location = info["location"]
                if location not in maps:
                    with open(onnx_path.parent / location, "rb") as fh:
                        maps[location] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                view = memoryview(maps[location])[offset:offset + length]
                yield init, view, location, offset, length
                view.release()  # the consumer dropped its arrays over it; the map can close at the end
                _drop_pages(maps[location], offset, length)
            elif init.raw_data:
                yield init, memoryview(init.raw_data), None, None, len(init.raw_data)
    finally:
        for handle in maps.values():
            handle.close()


def _drop_pages(handle: mmap.mmap, offset: int, length: int) -> None:
    """Unmap the pages of one compared initializer from this process (they stay in the page cache).

    Comparing every weight reads the whole data file through the map (6 GB for the full-size DiT); without
    this, all of it would stay resident in the tracing child beside the module's own weights, doubling its
    peak RSS (12.35 GiB measured at full size, against 6.6 GiB for the trace itself).
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or length <= 0:
        return
    start = offset - offset % mmap.PAGESIZE
    handle.madvise(advice, start, min(offset + length, len(handle)) - start)


_PREFIX = 64  # elements of a tensor's first stored row used as a lookup key before the exact comparison


def _key(shape: tuple, first_row: np.ndarray) -> tuple:
    return shape, np.ascontiguousarray(first_row[:_PREFIX]).tobytes()


def build_map(transformer, onnx_path: Path) -> dict[str, dict]:
    """{parameter name: record} for every Linear weight of ``transformer`` (see the module docstring).

    Each weight is looked up by shape and the bits of its first stored row in both layouts ([out, in], and
    [in, out] whose first row is the weight's first column), then compared bit for bit with every candidate
    initializer; no transposed copies and no digests of the gigabytes involved.
    Raises :class:`ExportValidationError` when a weight matches no initializer, or several.
    """
    import onnx

    weights = {name: _bits(array) for name, array in linear_weights(transformer).items()}
    wanted: dict[tuple, list[tuple[str, bool]]] = {}
    for name, bits in weights.items():
        wanted.setdefault(_key(bits.shape, bits[0]), []).append((name, False))
        wanted.setdefault(_key(bits.shape[::-1], bits[:, 0]), []).append((name, True))
    model = onnx.load(str(onnx_path), load_external_data=False)
    found: dict[str, list[dict]] = {name: [] for name in weights}
    for init, raw, location, offset, length in _initializer_bytes(model, onnx_path):
        if len(init.dims) != 2 or init.data_type not in ONNX_DTYPES:
            continue
        dims = tuple(init.dims)
        kind = np.uint32 if ONNX_DTYPES[init.data_type] == "fp32" else np.uint16
        if length != dims[0] * dims[1] * np.dtype(kind).itemsize:
            continue
        stored = np.frombuffer(raw, dtype=kind).reshape(dims)
        for name, transposed in wanted.get(_key(dims, stored[0]), ()):
            bits = weights[name]
            if bits.dtype != stored.dtype or not np.array_equal(stored, bits.T if transposed else bits):
                continue  # same first row, other tensor
            found[name].append({
                "initializer": init.name, "transposed": transposed, "dtype": ONNX_DTYPES[init.data_type],
                "shape": list(bits.shape), "location": location, "offset": offset, "length": length,
            })
        del stored
    return _resolve(found)


def _bits(array: np.ndarray) -> np.ndarray:
    """The raw bits of a weight as unsigned integers, so comparisons are exact (NaN, -0.0)."""
    return array.view(np.uint32) if array.dtype == np.float32 else array.view(np.uint16)


def _resolve(found: dict[str, list[dict]]) -> dict[str, dict]:
    """One record per weight; a symmetric square weight matches itself transposed: keep the plain one."""
    missing = sorted(name for name, hits in found.items() if not hits)
    if missing:
        raise ExportValidationError(
            f"dit_step.onnx holds no initializer with the bytes of {len(missing)} DiT Linear weight(s) "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}).", _REMEDY)
    out = {}
    for name, hits in found.items():
        names = {hit["initializer"] for hit in hits}
        if len(names) > 1:
            raise ExportValidationError(
                f"the DiT weight {name} matches several initializers of dit_step.onnx ({', '.join(sorted(names))}).",
                _REMEDY)
        out[name] = min(hits, key=lambda hit: hit["transposed"])
    return out


def fuse_loras(transformer, loras: list[tuple[str, float]]) -> list[dict]:
    """Add each LoRA (path, scale) into the fp32 DiT's weights before tracing (``export --lora``).

    The same reader and merge as the runtime (``runtime/lora.py``: keys, alpha and scaling as diffusers);
    returns the manifest records [{"path", "sha256", "scale", "weights"}].
    """
    import torch

    from acestep_trt.runtime.artifacts import sha256_file
    from acestep_trt.runtime.lora import _resolve_files, delta, parse_adapter

    shapes = {name: {"shape": list(array.shape)} for name, array in linear_weights(transformer).items()}
    records = []
    for i, (path, scale) in enumerate(loras):
        adapter = parse_adapter(path, shapes, f"fused_{i}")
        for param, layer in adapter.layers.items():
            weight = transformer.get_parameter(param)
            with torch.no_grad():
                weight += torch.from_numpy(delta(layer, scale, False)).to(weight.dtype)
        weights_file = _resolve_files(Path(path))[0]
        records.append({"path": str(Path(path).resolve()), "sha256": sha256_file(weights_file), "scale": scale,
                        "weights": len(adapter.layers), "notes": adapter.notes})
    return records
