"""``acestep-trt compare``: end-to-end error of one artifact directory against another.

Typical use: a reduced-precision export (``--precision bf16``) against the fp32 export of the same
checkpoint. Both generate the same fixed prompts from the same noise; for every case we report the
signal-to-error ratio (dB) of the final latents and of the audio (after the usual -1 dBFS
normalisation), with the fp32 directory as the signal. The two directories are loaded one after the
other, so a full-size pair never sits in memory at once.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .artifacts import read_manifest
from .errors import InputError
from .precision import json_number, snr_db
from .vae import normalize_peak

log = logging.getLogger(__name__)

CASES = (
    ("upbeat electronic dance track with piano and a catchy synth lead",
     "[verse]\nSoft notes in the morning light\n[chorus]\nMusic fills the air tonight"),
    ("slow acoustic folk ballad, fingerpicked guitar, warm male vocals", "[verse]\nDown by the river I wait"),
    ("instrumental cinematic orchestral score, strings and brass", ""),
)


@dataclass
class CaseResult:
    prompt: str
    seed: int
    latents_snr_db: float
    audio_snr_db: float
    finite: bool


@dataclass
class CompareReport:
    reference: str
    candidate: str
    precision: dict
    duration: float
    steps: int
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def min_audio_snr_db(self) -> float:
        return min(c.audio_snr_db for c in self.cases)

    @property
    def all_finite(self) -> bool:
        return all(c.finite for c in self.cases)

    def summary(self) -> dict:
        return {"audio_snr_db_median": statistics.median(c.audio_snr_db for c in self.cases),
                "audio_snr_db_min": self.min_audio_snr_db,
                "latents_snr_db_median": statistics.median(c.latents_snr_db for c in self.cases),
                "all_finite": self.all_finite}

    def to_dict(self) -> dict:
        """JSON-ready (inf/nan SNRs as strings)."""
        out = asdict(self)
        for case in out["cases"]:
            case["latents_snr_db"], case["audio_snr_db"] = (json_number(case["latents_snr_db"]),
                                                           json_number(case["audio_snr_db"]))
        out["summary"] = {k: json_number(v) if isinstance(v, float) else v for k, v in self.summary().items()}
        return out


def _check_pair(reference: Path, candidate: Path) -> dict:
    """Both directories must come from the same model; returns the candidate's precision record."""
    ref, cand = read_manifest(reference), read_manifest(candidate)
    if ref.get("model") != cand.get("model") or ref.get("scheduler") != cand.get("scheduler"):
        raise InputError(
            f"{reference} and {candidate} were exported from different model configurations.",
            "compare two exports of the same checkpoint (e.g. --precision fp32 and --precision bf16).",
        )
    return cand.get("precision", {"recipe": "fp32"})


def _generate(artifacts: Path, cases: list[tuple], duration: float, steps: int, load_kwargs: dict):
    """Latents [B, T, 64] and audio [B, 2, S] of every case, with one runtime that is closed afterwards."""
    from .pipeline import AceStepRuntime

    outputs = []
    with AceStepRuntime.load(artifacts, **load_kwargs) as rt:
        frames = rt.config.latent_length(duration)
        for prompt, lyrics, seed in cases:
            noise = np.random.default_rng(seed).standard_normal((1, frames, rt.config.latent_channels),
                                                                dtype=np.float32)
            latents = rt(prompt=prompt, lyrics=lyrics, audio_duration=duration, latents=noise,
                         num_inference_steps=steps, output_type="latent", show_progress=False).audios
            outputs.append((latents, normalize_peak(rt.decode(latents))))
    gc.collect()
    return outputs


def compare_artifacts(reference: str | Path, candidate: str | Path, duration: float = 10.0, steps: int = 8,
                      seeds: int = 1, backend: str = "ort", device: str = "cpu") -> CompareReport:
    """Generate :data:`CASES` x ``seeds`` with both directories and measure the candidate's error."""
    reference, candidate = Path(reference), Path(candidate)
    precision = _check_pair(reference, candidate)
    cases = [(p, lyr, seed) for seed in range(seeds) for p, lyr in CASES]
    load = {"backend": backend, "device": device, "emulate_precision": True}
    log.info("generating %d case(s) with %s", len(cases), reference)
    ref = _generate(reference, cases, duration, steps, load)
    log.info("generating %d case(s) with %s", len(cases), candidate)
    got = _generate(candidate, cases, duration, steps, load)
    report = CompareReport(str(reference), str(candidate), precision, duration, steps)
    for (prompt, _, seed), (ref_lat, ref_audio), (lat, audio) in zip(cases, ref, got):
        finite = bool(np.all(np.isfinite(lat)) and np.all(np.isfinite(audio)))
        report.cases.append(CaseResult(prompt, seed, snr_db(lat, ref_lat), snr_db(audio, ref_audio), finite))
    return report


def format_report(report: CompareReport) -> str:
    lines = [f"{report.candidate} against {report.reference}: {report.duration:g} s clips, {report.steps} steps, "
             f"precision {report.precision}",
             f"{'prompt':<48} {'seed':>4} {'latents SNR dB':>15} {'audio SNR dB':>13}  finite"]
    for c in report.cases:
        lines.append(f"{c.prompt[:48]:<48} {c.seed:>4} {c.latents_snr_db:>15.1f} {c.audio_snr_db:>13.1f}  {c.finite}")
    median = report.summary()["audio_snr_db_median"]
    lines.append(f"median audio SNR {median:.1f} dB, minimum {report.min_audio_snr_db:.1f} dB")
    return "\n".join(lines)
