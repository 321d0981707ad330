"""Graph validation: ONNX Runtime against PyTorch at shapes other than the traced ones.

Inputs are generated from the graph spec (so they follow the contract): ids in the vocabulary, masks
with real padding on both sides, timesteps in [0, 1], Gaussian states. Each graph is checked at several
dim bindings: batch 1 and 3, odd latent lengths, and sequences longer than the sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from acestep_trt.runtime.errors import ExportValidationError
from acestep_trt.runtime.precision import limit_text, snr_db, within_limit
from acestep_trt.runtime.specs import GraphSpec, ModelConfig


def trace_dims(cfg: ModelConfig) -> dict[str, int]:
    """Small dims used for tracing (batch 2: a traced 1 would be specialised by the exporter)."""
    return {"batch": 2, "text_len": 7, "lyric_len": 9, "timbre_len": 10, "cond_len": 17, "latent_len": 12,
            "audio_len": 4 * cfg.hop_length + 100, "patches": 3}


def validation_dims(cfg: ModelConfig) -> list[dict[str, int]]:
    """Dim bindings unlike the traced ones: odd latent lengths, beyond the sliding window, batch 1 and 3."""
    beyond = cfg.patch_size * cfg.sliding_window + 7  # odd, and > window in patched tokens
    # audio lengths that are not multiples of the hop; patch counts unlike the traced 3
    return [
        {"batch": 1, "text_len": 13, "lyric_len": cfg.sliding_window + 5, "timbre_len": cfg.sliding_window + 3,
         "cond_len": 23, "latent_len": beyond, "audio_len": 7 * cfg.hop_length + 1234, "patches": 7},
        {"batch": 3, "text_len": 5, "lyric_len": 4, "timbre_len": 6, "cond_len": 11, "latent_len": 9,
         "audio_len": 2 * cfg.hop_length + 5, "patches": 1},
    ]


def make_inputs(spec: GraphSpec, dims: dict[str, int], cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that satisfy ``spec`` with symbolic dims bound by ``dims``."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in t.dims)
        if t.dtype == "int64":
            feeds[t.name] = rng.integers(0, cfg.vocab_size, size=shape, dtype=np.int64)
        elif t.dtype == "bool":
            feeds[t.name] = _padding_mask(shape, rng)
        elif t.name == "timestep":
            feeds[t.name] = rng.uniform(0.05, 1.0, size=shape).astype(np.float32)
        elif t.name == "dt":
            feeds[t.name] = -rng.uniform(0.05, 0.5, size=shape).astype(np.float32)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _padding_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[B, L] masks with at least one valid token; rows alternate right and left padding."""
    batch, length = shape
    mask = np.zeros(shape, dtype=bool)
    for b in range(batch):
        valid = length if b == 0 else int(rng.integers(1, length + 1))
        if b % 2:
            mask[b, length - valid:] = True
        else:
            mask[b, :valid] = True
    return mask


@dataclass
class Comparison:
    """One output at one dim binding against the fp32 PyTorch reference.

    fp32 graphs must stay within ``bound`` (max abs). Reduced-precision graphs (``min_snr_db`` set) must
    keep a signal-to-error ratio ``10 log10(sum ref^2 / sum (got - ref)^2)`` of at least ``min_snr_db``;
    any NaN or Inf fails either way.
    """

    graph: str
    output: str
    dims: str
    shape: tuple[int, ...]
    max_abs: float
    ref_scale: float
    bound: float
    snr_db: float = float("inf")
    min_snr_db: float | None = None

    @property
    def ok(self) -> bool:
        return within_limit(self.max_abs, self.bound, self.snr_db, self.min_snr_db)

    @property
    def limit(self) -> str:
        return limit_text(self.bound, self.min_snr_db)

    def row(self) -> str:
        status = "ok" if self.ok else "FAIL"
        return (f"{self.graph:<18} {self.output:<24} {str(self.shape):<18} {self.max_abs:>10.2e} "
                f"{self.ref_scale:>9.2e} {self.snr_db:>7.1f} {self.limit:>10}  {status}  [{self.dims}]")

    def to_dict(self) -> dict:
        return {"graph": self.graph, "output": self.output, "dims": self.dims, "max_abs": self.max_abs,
                "limit": self.bound, "snr_db": _json_float(self.snr_db), "min_snr_db": self.min_snr_db,
                "ok": self.ok}


TABLE_HEADER = (f"{'graph':<18} {'output':<24} {'shape':<18} {'max|err|':>10} {'max|ref|':>9} {'SNR dB':>7} "
                f"{'limit':>10}  status")


def _json_float(value: float):
    """JSON has no Infinity: an exact match (infinite SNR) is written as null."""
    return float(value) if np.isfinite(value) else None


def compare(spec: GraphSpec, dims: dict[str, int], got: dict[str, np.ndarray], ref: dict[str, np.ndarray],
            min_snr_db: float | None = None):
    """One :class:`Comparison` per output; bool outputs must match exactly."""
    rows = []
    label = ",".join(f"{k}={v}" for k, v in dims.items() if any(k in t.dims for t in spec.inputs))
    for out in spec.outputs:
        a, b = np.asarray(got[out.name]), np.asarray(ref[out.name])
        if a.shape != b.shape:
            raise ExportValidationError(
                f"{spec.name}.{out.name}: ONNX Runtime returned shape {a.shape}, PyTorch {b.shape} at {label}.",
                "report this with the checkpoint config: the graph does not generalise to these shapes.",
            )
        if out.dtype == "bool":
            err, scale, bound = float(np.count_nonzero(a != b)), 1.0, 0.0
            rows.append(Comparison(spec.name, out.name, label, a.shape, err, scale, bound))
            continue
        err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        rows.append(Comparison(spec.name, out.name, label, a.shape, err, scale, spec.tolerance.bound(scale),
                               snr_db(a, b) if a.size else float("inf"), min_snr_db))
    return rows


def raise_on_failure(rows: list[Comparison]) -> None:
    bad = [r for r in rows if not r.ok]
    if bad:
        if any(not np.isfinite(r.max_abs) for r in bad):
            worst = next(r for r in bad if not np.isfinite(r.max_abs))
            raise ExportValidationError(
                f"{worst.graph}.{worst.output} produces NaN or Inf at {worst.dims}.",
                f"export {worst.graph} in fp32 (--graph-precision {worst.graph}=fp32, or --precision fp32); "
                "nothing was written.",
            )
        reduced = [r for r in bad if r.min_snr_db is not None]
        if reduced:
            worst = min(reduced, key=lambda r: r.snr_db)
            raise ExportValidationError(
                f"{worst.graph}.{worst.output} in reduced precision keeps only {worst.snr_db:.1f} dB SNR against "
                f"fp32 (needs {worst.min_snr_db:g} dB; max |err| {worst.max_abs:.3e}) at {worst.dims}.",
                f"export {worst.graph} in fp32 (--graph-precision {worst.graph}=fp32, or --precision fp32); "
                "nothing was written.",
            )
        worst = max(bad, key=lambda r: r.max_abs / max(r.bound, 1e-30))
        raise ExportValidationError(
            f"{worst.graph}.{worst.output} differs from PyTorch by {worst.max_abs:.3e} (limit {worst.bound:.3e}) "
            f"at {worst.dims}.",
            "the export is not faithful for this checkpoint; keep the previous artifacts and report the table "
            "above (use --no-validate only to inspect the graphs).",
        )
