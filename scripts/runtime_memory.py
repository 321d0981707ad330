#!/usr/bin/env python
"""Where the runtime's resident memory goes: per graph at session creation and at its first run.

    .venv/bin/python scripts/runtime_memory.py ARTIFACTS_DIR --duration 10 [--config KEY=VALUE ...] [--no-arena]

One process: import ONNX Runtime, then create each graph's session in turn, noting the resident set (RSS)
after each; load the constants; generate once (batch 1, 8 steps) while a thread samples RSS every 2 ms and
note each graph's growth across its first run. ``--config`` adds ONNX Runtime session config entries to
every session (e.g. ``session.disable_prepacking=1``) and ``--no-arena`` turns the CPU arena off, to measure
what a setting saves; the default is what the runtime does. Prints one JSON object (MiB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

MIB = 1 << 20


def _patch_options(config: list[str], no_arena: bool) -> None:
    """Make every ``SessionOptions`` the runtime creates carry ``config`` (and no arena if asked)."""
    import onnxruntime as ort

    original = ort.SessionOptions

    def options():
        opts = original()
        for entry in config:
            key, value = entry.split("=", 1)
            opts.add_session_config_entry(key, value)
        if no_arena:
            opts.enable_cpu_mem_arena = False
        return opts

    ort.SessionOptions = options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-arena", action="store_true")
    parser.add_argument("--runs", type=int, default=1, help="generations after the first, timed (median)")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime  # noqa: F401  (its import is part of the baseline)

    from acestep_trt.export.bench import PeakSampler, rss_bytes as _rss  # torch-free
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.backends import ort as ort_backend

    _patch_options(args.config, args.no_arena)
    out: dict = {"baseline": _rss() / MIB, "load": {}, "first_run": {}}
    created = ort_backend.OrtGraph.__init__

    def measured_init(self, path, spec, *a, **k):
        before = _rss()
        created(self, path, spec, *a, **k)
        out["load"][spec.name] = (_rss() - before) / MIB
        run = self.run

        def first_run(feeds):
            before = _rss()
            result = run(feeds)
            out["first_run"].setdefault(spec.name, (_rss() - before) / MIB)
            return result

        self.run = first_run

    ort_backend.OrtGraph.__init__ = measured_init
    started = time.perf_counter()
    rt = AceStepRuntime.load(args.artifacts)
    out["load_seconds"] = time.perf_counter() - started
    out["loaded"] = _rss() / MIB
    kwargs = dict(prompt="upbeat synth-pop", lyrics="[verse]\nHello there", audio_duration=args.duration, seed=1,
                  show_progress=None)
    with PeakSampler(interval=0.002) as sampler:
        audio = rt(**kwargs).audios
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            rt(**kwargs)
            seconds.append(time.perf_counter() - started)
    out.update(peak=(sampler.base + sampler.peak) / MIB, after_run=_rss() / MIB,
               run_seconds=float(np.median(seconds)) if seconds else None,
               audio_sha=hashlib.sha256(np.ascontiguousarray(audio).tobytes()).hexdigest()[:16])
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else
                          {n: round(x, 1) for n, x in v.items()} if isinstance(v, dict) else v)
                      for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
