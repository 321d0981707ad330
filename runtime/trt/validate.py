"""Engine vs ONNX: run each TensorRT engine and the same ONNX graph in ONNX Runtime (CPU) on the same
random feeds at the profile's opt shapes, and compare every output (the "engine vs ONNX" validation layer).

Tolerances: the graph spec's for ``--precision fp32`` engines; ``TF32_TOL`` for ``tf32`` engines; for graphs
exported in bf16/fp16, a signal-to-error ratio of at least ``MIN_SNR_DB[dtype]`` against ONNX Runtime running
the same reduced-precision graph. These thresholds have not been calibrated on real TensorRT yet
(see docs/tensorrt.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..artifacts import Artifacts
from ..errors import ExportValidationError
from ..precision import MIN_SNR_DB, limit_text, snr_db, within_limit
from ..specs import GraphSpec, Tolerance
from .profiles import GraphProfile

log = logging.getLogger(__name__)

TF32_TOL = Tolerance(atol=1e-2, rtol=1e-2)


@dataclass(frozen=True)
class EngineComparison:
    graph: str
    output: str
    shape: tuple[int, ...]
    max_abs: float
    limit: float
    snr_db: float = float("inf")
    min_snr_db: float | None = None  # set for reduced-precision graphs: the SNR floor replaces ``limit``

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


def compare_engines(artifacts: Artifacts, trt_runners: dict, ort_runners: dict,
                    precision: str) -> list[EngineComparison]:
    """One :class:`EngineComparison` per graph output, at each engine's profile; bool outputs must match exactly."""
    rows = []
    for name, ort_runner in ort_runners.items():
        spec = artifacts.specs[name]
        feeds = random_feeds(spec, trt_runners[name].profile, artifacts.config.vocab_size)
        got, ref = trt_runners[name].run(feeds), ort_runner.run(feeds)
        tol = spec.tolerance if precision == "fp32" else TF32_TOL
        floor = MIN_SNR_DB.get(artifacts.precision(name))
        for out in spec.outputs:
            a, b = got[out.name], ref[out.name]
            if a.dtype == np.bool_:
                rows.append(EngineComparison(name, out.name, tuple(b.shape), float(np.count_nonzero(a != b)), 0.0))
                continue
            err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.shape == b.shape else float("inf")
            limit = tol.bound(float(np.max(np.abs(b))) if b.size else 0.0)
            snr = snr_db(a, b) if a.shape == b.shape else float("nan")
            rows.append(EngineComparison(name, out.name, tuple(b.shape), err, limit, snr, floor))
            log.debug(rows[-1].row())
    return rows


def raise_on_failure(rows: list[EngineComparison]) -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        raise ExportValidationError(
            "TensorRT engines differ from ONNX Runtime beyond tolerance: "
            + "; ".join(f"{r.graph}.{r.output} max|err| {r.max_abs:.2e}, SNR {r.snr_db:.1f} dB (limit {r.bound})"
                        for r in bad) + ".",
            "rebuild with --precision fp32; if it persists, report the table printed above.")
