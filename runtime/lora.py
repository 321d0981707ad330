"""LoRA adapters for the DiT at generate time, in NumPy: read, check, merge; the backend swaps the weights.

Keys, alpha and scaling follow diffusers 0.42.1 (``AceStepLoraLoaderMixin.lora_state_dict``,
``_convert_non_diffusers_ace_step_lora_to_diffusers`` and peft 0.21's ``LoraLayer``), measured with a tiny
checkpoint (README, "LoRA adapters", has the table; ``tests/test_lora.py`` compares the audio):

- diffusers files (``transformer.layers.N.self_attn.to_q.lora_A.weight``): alpha from the header's
  ``lora_adapter_metadata`` (peft ``LoraConfig``: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``) when
  present, else alpha = r (scale 1), as ``_create_lora_config`` without metadata.
- the official trainer's PEFT directory (``base_model.model.layers.N.self_attn.q_proj.lora_A.weight``):
  renamed like diffusers (``q_proj`` -> ``to_q``, ..., ``o_proj`` -> ``to_out.0``); diffusers never reads
  ``adapter_config.json``, so alpha = r here too, with a warning when the trainer's alpha differs.
- ComfyUI single files (``diffusion_model.`` prefix, ``lora_down``/``lora_up``, per-module ``.alpha``),
  which diffusers 0.42.1 refuses for ACE-Step: ComfyUI's rule, scale = alpha / r (1 without ``.alpha``).

Every active adapter contributes ``W += scale * weight * (alpha / r) * B @ A`` (peft's scaling, times the
``set_adapters`` weight, times ``attention_kwargs["scale"]`` as ``scale_lora_layers``), merged in float32
and stored in the initializer's dtype. Any Linear of the DiT that the manifest's parameter map lists
(``export/weight_map.py``) may be targeted.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError

log = logging.getLogger(__name__)

# ONNX TensorProto data types of the DiT's Linear initializers (fp32 export; bf16 export, see export/precision.py)
ONNX_DTYPES = {1: "fp32", 16: "bf16", 10: "fp16"}
_STORED = {"fp32": np.float32, "bf16": np.uint16, "fp16": np.float16}  # bf16 as its raw bits
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# diffusers' _convert_non_diffusers_ace_step_lora_to_diffusers renames the official trainer's projections
_PROJ_RENAMES = {".q_proj.": ".to_q.", ".k_proj.": ".to_k.", ".v_proj.": ".to_v.", ".o_proj.": ".to_out.0."}
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
             ".alpha": "alpha"}
_REEXPORT = ("re-run `acestep-trt export MODEL_DIR ARTIFACTS_DIR --overwrite` with this toolkit: the manifest then "
             "maps every DiT weight to its initializer.")


# ------------------------------------------------------------------ dtypes


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values given as uint16 bits -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even as torch's ``.to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def to_f32(stored: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(stored) if dtype == "bf16" else stored.astype(np.float32)


def from_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    return f32_to_bf16(values) if dtype == "bf16" else values.astype(_STORED[dtype])


# ------------------------------------------------------------------ reading files


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors (float32) and the ``__metadata__`` of a safetensors file, with bf16 support.

    The format is an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}
    and the raw data; safetensors' own NumPy reader has no bf16 (NumPy lacks the type), which LoRAs often use.
    """
    bad = InputError(f"{path} is not a safetensors file.",
                     "pass a LoRA saved as .safetensors (diffusers' save_lora_weights or the trainer's PEFT directory).")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise bad
            size = struct.unpack("<Q", head)[0]
            if not 2 <= size <= 100_000_000:
                raise bad
            header = json.loads(fh.read(size).decode("utf-8"))
            data = fh.read()
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad from None
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror}).", "check the LoRA path.") from None
    if not isinstance(header, dict):
        raise bad
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            kind = _SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            array = np.frombuffer(data[start:end], dtype=kind).reshape(info["shape"])
        except KeyError:
            raise InputError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}; LoRA factors must be floats.",
                             "save the LoRA in fp32, fp16 or bf16.") from None
        except (TypeError, ValueError):
            raise bad from None
        tensors[name] = bf16_to_f32(array) if info["dtype"] == "BF16" else array.astype(np.float32)
    return tensors, metadata


def _resolve_files(path: Path) -> tuple[Path, Path | None, str]:
    """(weights file, adapter_config.json or None, format name) for a LoRA file or directory."""
    if not path.exists():
        raise InputError(f"LoRA {path} does not exist.", "pass a .safetensors file or a LoRA directory.")
    if path.is_file():
        config = path.parent / PEFT_CONFIG if path.name == PEFT_FILE else None
        return path, config if config and config.is_file() else None, "file"
    if (path / PEFT_FILE).is_file():
        return path / PEFT_FILE, path / PEFT_CONFIG if (path / PEFT_CONFIG).is_file() else None, "peft"
    if (path / DIFFUSERS_FILE).is_file():
        return path / DIFFUSERS_FILE, None, "diffusers"
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0], None, "file"
    raise InputError(f"{path} holds {len(found)} .safetensors files and neither {DIFFUSERS_FILE} nor {PEFT_FILE}.",
                     "pass the LoRA file itself.")


# ------------------------------------------------------------------ keys and scaling


@dataclass
class LoraLayer:
    """One targeted Linear: ``A`` [r, in], ``B`` [out, r] (float32) and ``scale`` = alpha / r (peft's scaling)."""

    A: np.ndarray
    B: np.ndarray
    scale: float


@dataclass
class LoraAdapter:
    name: str
    path: Path
    layers: dict[str, LoraLayer]  # parameter name ("layers.0.self_attn.to_q.weight") -> factors
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(layer.A.nbytes + layer.B.nbytes for layer in self.layers.values())


def _split_key(key: str) -> tuple[str, str] | None:
    """``transformer.layers.0.self_attn.q_proj.lora_A.weight`` -> (``layers.0.self_attn.to_q.weight``, ``A``)."""
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return None
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    module = module + "."
    for old, new in _PROJ_RENAMES.items():
        module = module.replace(old, new)
    return module[:-1] + ".weight", kind


def _peft_alpha(metadata: dict) -> tuple[float | None, dict, bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' ``lora_adapter_metadata`` header entry, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None, {}, False
    config = {k.removeprefix("transformer."): v for k, v in config.items()}
    if config.get("use_dora"):
        raise InputError("this LoRA is a DoRA adapter (use_dora), which the runtime does not merge.",
                         "use a plain LoRA adapter.")
    return config.get("lora_alpha"), dict(config.get("alpha_pattern") or {}), bool(config.get("use_rslora"))


def _pattern_alpha(module: str, patterns: dict, default: float) -> float:
    """peft's ``get_pattern_key``: a pattern matches a module name ending in it (``(.*\\.)?pattern$``)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return float(default)


def parse_adapter(path: str | Path, parameters: dict[str, dict], name: str) -> LoraAdapter:
    """Read and check a LoRA against the DiT's parameter map; raises :class:`InputError` naming the problem."""
    path = Path(path)
    weights_file, config_file, kind = _resolve_files(path)
    tensors, metadata = read_safetensors(weights_file)
    if not tensors:
        raise InputError(f"{weights_file} holds no tensors.", "pass a LoRA file.")
    factors: dict[str, dict[str, np.ndarray]] = {}
    unknown, unmatched = [], []
    for key, array in tensors.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
        elif split[0] not in parameters:
            unmatched.append(key)
        else:
            factors.setdefault(split[0], {})[split[1]] = array
    if unknown:
        raise InputError(
            f"{weights_file.name}: {len(unknown)} key(s) are not LoRA factors ({', '.join(unknown[:3])}); DoRA, "
            "LoKr and LoRA biases are not supported.",
            "pass a LoRA with lora_A/lora_B (or lora_down/lora_up) weights only.")
    if unmatched:
        raise InputError(
            f"{weights_file.name}: {len(unmatched)} key(s) match no DiT module ({', '.join(unmatched[:3])}).",
            "pass a LoRA trained for the ACE-Step 1.5 DiT (keys such as "
            "transformer.layers.0.self_attn.to_q.lora_A.weight).")
    alpha, patterns, rslora = _peft_alpha(metadata)
    adapter = LoraAdapter(name, path, {})
    if config_file is not None:
        _note_trainer_alpha(config_file, adapter)
    for param, parts in sorted(factors.items()):
        adapter.layers[param] = _layer(weights_file.name, param, parts, parameters[param]["shape"], alpha,
                                       patterns, rslora)
    return adapter


def _layer(fname: str, param: str, parts: dict, shape: list[int], alpha, patterns, rslora) -> LoraLayer:
    module = param.removesuffix(".weight")
    if "A" not in parts or "B" not in parts:
        raise InputError(f"{fname}: {module} has only one of its two LoRA factors.", "pass a complete LoRA file.")
    A, B = parts["A"], parts["B"]
    out_features, in_features = shape
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise InputError(f"{fname}: {module} has factors of shapes {list(B.shape)} @ {list(A.shape)}, not a rank-r "
                         "product.", "pass an intact LoRA file.")
    if A.shape[1] != in_features or B.shape[0] != out_features:
        raise InputError(
            f"{fname}: {module} is {in_features} -> {out_features} in this DiT but the LoRA's factors are "
            f"{A.shape[1]} -> {B.shape[0]} (rank {A.shape[0]}): it was trained for another model size.",
            "use a LoRA trained for this checkpoint.")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        raise InputError(f"{fname}: {module} holds NaN or Inf.", "pass a LoRA with finite weights.")
    rank = A.shape[0]
    if "alpha" in parts:  # ComfyUI / kohya: per-module alpha, scale alpha / r
        scale = float(parts["alpha"].reshape(-1)[0]) / rank
    elif alpha is not None:  # diffusers' header metadata (peft LoraConfig): lora_alpha / r, or / sqrt(r)
        value = _pattern_alpha(module, patterns, alpha)
        scale = value / math.sqrt(rank) if rslora else value / rank
    else:  # diffusers' default without metadata: lora_alpha = r
        scale = 1.0
    if not math.isfinite(scale):
        raise InputError(f"{fname}: {module} has a non-finite alpha.", "pass a LoRA with finite weights.")
    return LoraLayer(np.ascontiguousarray(A), np.ascontiguousarray(B), scale)


def _note_trainer_alpha(config_file: Path, adapter: LoraAdapter) -> None:
    """diffusers ignores adapter_config.json (alpha = r); say so when the trainer meant another scaling."""
    try:
        config = json.loads(config_file.read_text())
        r, alpha = float(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if alpha != r:
        note = (f"{config_file} sets lora_alpha={alpha:g} for r={r:g}; like diffusers 0.42.1 the adapter is applied "
                f"at scale 1 (alpha = r). For the trainer's scaling pass adapter weight {alpha / r:g} "
                f"(set_adapters, or --lora PATH:{alpha / r:g}).")
        adapter.notes.append(note)
        log.warning("%s", note)


# ------------------------------------------------------------------ merging


def parameter_map(manifest: dict) -> dict[str, dict]:
    """The DiT's {parameter: initializer record} map from the manifest; older artifacts lack it."""
    dit = manifest.get("graphs", {}).get("dit_step", {})
    if dit.get("precision") == "int8":
        raise InputError("LoRA adapters cannot be applied at generate time to an int8 DiT (export --precision int8): "
                         "its weights are quantised.",
                         "fuse the adapter at export (acestep-trt export MODEL_DIR OUT --precision int8 --lora PATH), "
                         "or use an fp32 export for adapters at generate time.")
    parameters = dit.get("parameters")
    if not parameters:
        raise ArtifactError("these artifacts have no map from DiT weights to ONNX initializers (exported before LoRA "
                            "support), so LoRA adapters cannot be applied.", _REEXPORT)
    return parameters


def read_base(root: Path, graph: Path, record: dict) -> np.ndarray:
    """The stored (initializer-layout) base value of one mapped weight, read from its byte range only."""
    shape = record["shape"][::-1] if record["transposed"] else record["shape"]
    kind = _STORED[record["dtype"]]
    if record.get("location"):
        with open(root / record["location"], "rb") as fh:
            fh.seek(record["offset"])
            raw = fh.read(record["length"])
    else:  # a small initializer stored inside the .onnx file
        import onnx

        model = onnx.load(str(graph), load_external_data=False)
        raw = next(i.raw_data for i in model.graph.initializer if i.name == record["initializer"])
    if len(raw) != record["length"]:
        raise ArtifactError(f"{graph.name}: the bytes of {record['initializer']} are truncated.", _REEXPORT)
    return np.frombuffer(raw, dtype=kind).reshape(shape)


def delta(layer: LoraLayer, factor: float, transposed: bool) -> np.ndarray:
    """``factor * scale * B @ A`` in float32, [out, in] (or [in, out] when ``transposed``)."""
    s = np.float32(factor * layer.scale)
    return (layer.A.T @ (layer.B.T * s)) if transposed else ((layer.B * s) @ layer.A)


class LoraState:
    """Loaded adapters, the active mix and the base values of every weight an adapter targets.

    ``merged(scale)`` returns {initializer: stored array} for the active mix at ``scale``; ``base_values()``
    the untouched values of every weight ever changed (what unloading writes back). Base values are read
    once per weight from its byte range of the DiT's data file and kept, so switching adapters or scales
    never reads the DiT again.
    """

    def __init__(self, root: Path, graph: Path, parameters: dict[str, dict]):
        self.root, self.graph, self.parameters = root, graph, parameters
        self.adapters: dict[str, LoraAdapter] = {}
        self.active: list[tuple[str, float]] = []
        self.base: dict[str, np.ndarray] = {}  # parameter -> stored base value
        self.base_reads = 0  # byte ranges read from the DiT (tests check they happen once per weight)
        self._shared = _shared_initializers(parameters)

    def add(self, path, name: str | None) -> LoraAdapter:
        """Parse ``path`` as adapter ``name`` (``default_N`` like diffusers when None); state changes only on success."""
        if name is None:
            name = next(f"default_{i}" for i in range(len(self.adapters) + 1) if f"default_{i}" not in self.adapters)
        if name in self.adapters:
            raise InputError(f"adapter name {name!r} is already loaded.", "choose another adapter_name.")
        adapter = parse_adapter(path, self.parameters, name)
        shared = sorted(p for p in adapter.layers if p in self._shared)
        if shared:
            raise InputError(f"{', '.join(shared[:3])} share one initializer with another weight in dit_step.onnx "
                             "(identical weights), so a LoRA cannot change one of them alone.",
                             "export from a checkpoint without tied Linear weights.")
        for param in adapter.layers:
            if param not in self.base:
                self.base[param] = read_base(self.root, self.graph, self.parameters[param])
                self.base_reads += 1
        self.adapters[name] = adapter
        return adapter

    def check_active(self, names, weights) -> list[tuple[str, float]]:
        """diffusers' ``set_adapters`` arguments -> [(name, weight)]; raises :class:`InputError`."""
        names = [names] if isinstance(names, str) else list(names)
        if weights is None or isinstance(weights, (int, float)):
            weights = [1.0 if weights is None else weights] * len(names)
        weights = [1.0 if w is None else w for w in weights]
        if len(weights) != len(names):
            raise InputError(f"{len(names)} adapter names but {len(weights)} weights.", "pass one weight per adapter.")
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise InputError(f"adapter(s) {missing} are not loaded (loaded: {sorted(self.adapters)}).",
                             "load them first with load_lora_weights(path, adapter_name=...).")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise InputError(f"adapter weight {w!r} is not a finite number.", "pass numbers such as 0.5.")
        return [(n, float(w)) for n, w in zip(names, weights)]

    def touched(self) -> list[str]:
        """Parameters any loaded adapter targets (sorted)."""
        return sorted(self.base)

    def merged(self, scale: float) -> dict[str, np.ndarray]:
        """{initializer: stored merged value} for every touched weight (base where no active adapter targets it)."""
        out = {}
        for param in self.touched():
            record = self.parameters[param]
            value = None
            for name, weight in self.active:
                layer = self.adapters[name].layers.get(param)
                if layer is not None and weight * scale != 0.0:
                    d = delta(layer, weight * scale, record["transposed"])
                    if value is None:
                        value = d
                    else:
                        value += d
            if value is None:
                out[record["initializer"]] = self.base[param]
            elif record["dtype"] == "fp32":
                value += self.base[param]  # in place: one new array per weight, no temporaries
                out[record["initializer"]] = value
            else:
                value += to_f32(self.base[param], record["dtype"])
                out[record["initializer"]] = from_f32(value, record["dtype"])
        return out

    def base_values(self) -> dict[str, np.ndarray]:
        return {self.parameters[p]["initializer"]: self.base[p] for p in self.touched()}

    def targeted_bytes(self) -> int:
        return sum(array.nbytes for array in self.base.values())


def _shared_initializers(parameters: dict[str, dict]) -> set[str]:
    """Parameters whose initializer another parameter also maps to (the exporter deduplicated equal weights)."""
    by_init: dict[str, list[str]] = {}
    for param, record in parameters.items():
        by_init.setdefault(record["initializer"], []).append(param)
    return {p for params in by_init.values() if len(params) > 1 for p in params}


def parse_lora_option(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (CLI ``--lora``) -> (path, scale); a trailing ``:number`` is the scale."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise InputError(f"--lora {text!r}: the scale is not finite.", "write PATH or PATH:SCALE, e.g. style:0.8.")
        return head, scale
    return text, 1.0


# ------------------------------------------------------------------ the runtime's LoRA API


def lora_scale(attention_kwargs: dict | None) -> float:
    """``attention_kwargs={"scale": s}`` -> s (diffusers' ``apply_lora_scale``: default 1.0)."""
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
        raise InputError(f"attention_kwargs {attention_kwargs!r} is not supported.",
                         'pass attention_kwargs={"scale": s} (the LoRA scale) or nothing.')
    scale = attention_kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f'attention_kwargs["scale"] must be a finite number, got {scale!r}.', "pass e.g. 0.8.")
    return float(scale)


class LoraController:
    """diffusers' LoRA methods for one runtime: parses into a :class:`LoraState`, pushes merged weights to the
    DiT runner (``runner.set_weights``: ONNX Runtime session re-creation or TensorRT refit).

    Every method leaves the runtime as it was when it raises: a bad file changes nothing, and a failed weight
    update rolls the adapter set back.
    """

    def __init__(self, root: Path, graph: Path, manifest: dict, runner):
        if not hasattr(runner, "set_weights"):
            raise InputError(f"the {type(runner).__name__} backend cannot change DiT weights.",
                             "use the ONNX Runtime backend, or TensorRT engines built with `build --refit`.")
        self.state = LoraState(root, graph, parameter_map(manifest))
        self.runner = runner
        self.applied: tuple | None = None  # (active mix, scale) the runner holds; None = the graph's own weights

    def load(self, path, adapter_name: str | None = None) -> str:
        """Load one adapter and make it the only active one at weight 1 (as diffusers' load_lora_weights)."""
        before = list(self.state.active)
        adapter = self.state.add(path, adapter_name)
        try:
            self.state.active = [(adapter.name, 1.0)]
            self.sync(1.0)
        except Exception:
            del self.state.adapters[adapter.name]
            self.state.active = before
            raise
        log.info("LoRA %s: %d weights from %s", adapter.name, len(adapter.layers), adapter.path)
        return adapter.name

    def set_adapters(self, names, adapter_weights=None) -> None:
        active = self.state.check_active(names, adapter_weights)
        before, self.state.active = self.state.active, active
        try:
            self.sync(1.0)
        except Exception:
            self.state.active = before
            raise

    def unload(self) -> None:
        """Back to the exported weights; forget every adapter and its base copies."""
        if self.applied is not None:
            self.runner.set_weights(self.state.base_values(), original=True)
        self.applied = None
        self.state = LoraState(self.state.root, self.state.graph, self.state.parameters)

    def sync(self, scale: float) -> None:
        """Make the runner hold the active mix at ``scale`` (nothing to do when it already does)."""
        key = (tuple(self.state.active), scale) if self.state.active and scale != 0.0 else None
        if key == self.applied:
            return
        values = self.state.merged(scale) if key is not None else self.state.base_values()
        self.runner.set_weights(values)
        self.applied = key
