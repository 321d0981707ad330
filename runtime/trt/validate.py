"""Engine vs ONNX: run each TensorRT engine and the same ONNX graph in ONNX Runtime on the same random feeds
at the profile's opt shapes, and compare every output (the "engine vs ONNX" validation layer).

Gates, per precision as the export's are (runtime/precision.py): a float output passes when it is finite and
its signal-to-error ratio against ONNX Runtime is at least the floor of the engine's precision
(:data:`ENGINE_MIN_SNR_DB`: the graph's ONNX dtype when reduced, else the build's ``fp32``/``tf32``); NaN or Inf
fails whatever the floor; bool outputs must match exactly. ``--validate-tolerance`` replaces the floors.

Integer outputs (the audio tokenizer's FSQ code indices) are compared as the fraction of codes that differ,
at most :data:`MAX_CODE_MISMATCH`: the FSQ rounds with ``floor``, so a value at a bin edge may land in either
neighbour bin on a correct engine (the same last-bit caveat as the export's against PyTorch); the tokenizer's
float outputs are then compared on the patches whose codes agree (a flipped code moves its whole patch).

The fp32 and tf32 floors are NOT calibrated: no engine has been built on real TensorRT yet. They are set
where fp32 arithmetic in another summation order (fp32) or a 10-bit mantissa in matmuls (tf32) should land
on a deep network, with margin; the first GPU run must measure them (docs/tensorrt.md). The bf16/fp16 floors
are the export's, for ONNX Runtime running the same reduced graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..artifacts import Artifacts
from ..errors import ExportValidationError, InputError
from ..precision import MIN_SNR_DB, limit_text, snr_db, within_limit
from ..specs import AUDIO_GRAPH_NAMES, GRAPH_NAMES, GraphSpec
from .profiles import GraphProfile

log = logging.getLogger(__name__)

# Minimum engine-vs-ONNX Runtime SNR (dB) per engine precision. fp32/tf32: uncalibrated (see the module docstring).
ENGINE_MIN_SNR_DB = {"fp32": 60.0, "tf32": 40.0, **MIN_SNR_DB}
# Largest fraction of integer outputs (FSQ code indices) that may differ from ONNX Runtime. Uncalibrated: exact fp32
# kernels in another summation order move a value across a bin edge about once in 1e5 random codes (estimate:
# ~1e-6 relative error over bins ~0.3 wide), so 1% leaves room while still catching a wrong engine.
MAX_CODE_MISMATCH = 0.01
_GRAPHS = (*GRAPH_NAMES, *AUDIO_GRAPH_NAMES)  # graphs --validate-tolerance may name


def parse_tolerances(values: tuple[str, ...] | list[str]) -> dict[str, float]:
    """``--validate-tolerance`` values -> {graph or "*": dB}: ``"35"`` for every graph, ``"dit_step=35"`` for one.

    Raises :class:`InputError` for anything else.
    """
    out = {}
    for value in values:
        graph, _, number = value.rpartition("=")
        try:
            db = float(number)
        except ValueError:
            db = float("nan")
        if db != db or (graph and graph not in _GRAPHS):
            raise InputError(f"--validate-tolerance {value!r} is not DB or GRAPH=DB.",
                             f"pass a minimum SNR in dB, e.g. 35 or dit_step=35 (graphs: {', '.join(_GRAPHS)}).")
        out[graph or "*"] = db
    return out


def engine_floor(graph: str, onnx_precision: str, build_precision: str, overrides: dict[str, float]) -> float:
    """The SNR floor (dB) one engine's float outputs must reach: an override, else by precision."""
    if graph in overrides or "*" in overrides:
        return overrides.get(graph, overrides.get("*"))
    return ENGINE_MIN_SNR_DB[onnx_precision if onnx_precision in MIN_SNR_DB else build_precision]


@dataclass(frozen=True)
class EngineComparison:
    graph: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    limit: float
    snr_db: float = float("inf")
    min_snr_db: float | None = None  # the SNR floor (float outputs); ``limit`` is then shown, not applied

    @property
    def ok(self) -> bool:
        return within_limit(self.max_abs, self.limit, self.snr_db, self.min_snr_db)

    @property
    def bound(self) -> str:
        return limit_text(self.limit, self.min_snr_db)

    def row(self) -> str:
        return (f"{self.graph:<18} {self.output:<24} {str(self.shape):<20} {self.max_abs:>10.2e} "
                f"{self.snr_db:>7.1f} {self.bound:>10}  {'ok' if self.ok else 'FAIL'}")


TABLE_HEADER = f"{'graph':<18} {'output':<24} {'shape':<20} {'max|err|':>10} {'SNR dB':>7} {'limit':>10}  status"


def random_feeds(spec: GraphSpec, profile: GraphProfile, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds at the profile's opt shapes: normal floats, token ids below ``vocab``, masks with a padded tail."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = profile.inputs[tensor.name].opt
        if tensor.dtype == "bool":  # item b keeps a prefix of random length (at least one position)
            lengths = rng.integers(1, shape[-1] + 1, size=shape[0])
            feeds[tensor.name] = np.arange(shape[-1])[None, :] < lengths[:, None]
        elif tensor.dtype == "int64":
            feeds[tensor.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
    return feeds


def compare_engines(artifacts: Artifacts, trt_runners: dict, ort_runners: dict, precision: str,
                    overrides: dict[str, float] | None = None, precisions: dict[str, str] | None = None
                    ) -> list[EngineComparison]:
    """One :class:`EngineComparison` per graph output, at each engine's profile; bool outputs must match exactly,
    integer outputs up to :data:`MAX_CODE_MISMATCH`.

    ``precision`` is the build's (fp32/tf32), ``precisions`` per-engine exceptions (engines.json records' own
    ``precision``, e.g. the audio tokenizer's exact fp32); ``overrides`` come from :func:`parse_tolerances`.
    """
    rows = []
    for name, ort_runner in ort_runners.items():
        spec = artifacts.spec(name)
        feeds = random_feeds(spec, trt_runners[name].profile, artifacts.config.vocab_size)
        got, ref = trt_runners[name].run(feeds), ort_runner.run(feeds)
        tol = spec.tolerance  # shown for reference (the export's max-abs bound); the gate is the SNR floor
        floor = engine_floor(name, artifacts.precision(name), (precisions or {}).get(name, precision), overrides or {})
        agree = _agreeing_codes(spec, got, ref)
        for out in spec.outputs:
            a, b = got[out.name], ref[out.name]
            if a.dtype == np.bool_:
                rows.append(EngineComparison(name, out.name, tuple(b.shape), float(np.count_nonzero(a != b)), 0.0))
                continue
            if np.issubdtype(b.dtype, np.integer):  # fraction of codes that differ
                wrong = float(np.mean(a != b)) if a.shape == b.shape and b.size else float("inf")
                rows.append(EngineComparison(name, out.name, tuple(b.shape), wrong, MAX_CODE_MISMATCH))
                continue
            if agree is not None and a.shape[:agree.ndim] == agree.shape:
                a, b = a[agree], b[agree]  # patches whose codes agree (module docstring)
            err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape and b.size else float("inf")
            limit = tol.bound(float(np.max(np.abs(b))) if b.size else 0.0)
            snr = snr_db(a, b) if a.shape == b.shape else float("nan")
            rows.append(EngineComparison(name, out.name, tuple(got[out.name].shape), err, limit, snr, floor))
            log.debug(rows[-1].row())
    return rows


def _agreeing_codes(spec: GraphSpec, got: dict, ref: dict) -> np.ndarray | None:
    """[B, P] bool: positions whose integer outputs (code indices [B, P, Q]) agree, for graphs that have them."""
    codes = [t.name for t in spec.outputs if np.issubdtype(np.dtype(t.dtype), np.integer)]
    if not codes or any(got[c].shape != ref[c].shape for c in codes):
        return None
    return np.all([np.all(got[c] == ref[c], axis=-1) for c in codes], axis=0)


def raise_on_failure(rows: list[EngineComparison]) -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        raise ExportValidationError(
            "TensorRT engines differ from ONNX Runtime beyond tolerance: "
            + "; ".join(f"{r.graph}.{r.output} max|err| {r.max_abs:.2e}, SNR {r.snr_db:.1f} dB (limit {r.bound})"
                        for r in bad) + ".",
            "rebuild with --precision fp32; if it persists, report the table printed above. The floors are not "
            "calibrated on real TensorRT yet: if the engine is otherwise good (listen, or `acestep-trt compare`), "
            "`--validate-tolerance DB` (or GRAPH=DB) lowers them; see docs/tensorrt.md.")
