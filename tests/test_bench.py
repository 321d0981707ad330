"""The benchmark runs every side on the same noise and reports medians; no timing is asserted here."""

from __future__ import annotations

import json

from click.testing import CliRunner

from acestep_trt.cli import main

SHORT = ["--duration", "0.6", "--steps", "3"]


def _bench(tiny, tmp_path, *extra):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), *SHORT, "--json",
                                       str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


def test_bench_reports_every_side(tiny, tmp_path):
    """On the CPU the default diffusers sides are fp32 and bf16, alternating with ours in one process."""
    report, output = _bench(tiny, tmp_path, "--runs", "2")
    assert report["config"]["diffusers_dtypes"] == ["fp32", "bf16"]
    assert not report["mode"]["separate_processes"]
    for side in (report["ours"], *report["diffusers"].values()):
        assert side["runs"] == 2
        assert side["end_to_end_s"] > 0 and side["dit_step_s"] > 0
        assert side["gpu_peak_mb"] is None  # CPU run
    for dtype in ("fp32", "bf16"):
        assert set(report["speedup"][dtype]) >= {"end_to_end_s", "dit_step_s", "decode_s"}
    assert report["audio"]["fp32"]["max_abs_diff"] < 1e-4  # same noise, same audio
    assert report["audio"]["fp32"]["snr_db"] > 80.0
    assert 5.0 < report["audio"]["bf16"]["snr_db"] < 80.0  # diffusers in bf16 is close, not equal
    assert report["precision"]["recipe"] == "fp32"
    assert "diffusers bf16" in output and "ratio" in output
    assert "cpu_flags" in output  # the kernels a figure was measured with


def test_bench_in_separate_processes(tiny, tmp_path):
    report, output = _bench(tiny, tmp_path, "--runs", "1", "--warmup", "0", "--diffusers-dtype", "fp32",
                            "--separate-processes")
    mode = report["mode"]
    assert mode["separate_processes"] and "one process per side" in output
    assert set(mode["process_peak_mb"]) == {"acestep-trt", "diffusers fp32"}
    assert all(mb > 50 for mb in mode["process_peak_mb"].values())
    assert report["audio"]["fp32"]["max_abs_diff"] < 1e-4


def test_memory_plan_counts_parameters_per_dtype(tiny):
    from acestep_trt.export.bench import _checkpoint_parameters, memory_plan

    params = _checkpoint_parameters(tiny.checkpoint)
    assert params > 0
    fits, reason = memory_plan(tiny.checkpoint, tiny.artifacts, ("fp32", "bf16"))
    assert fits and "GB available" in reason


def test_bench_refuses_bad_arguments(tiny, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), "--runs", "0"])
    assert result.exit_code == 2 and "--runs" in result.output
    result = CliRunner().invoke(main, ["bench", str(tmp_path), str(tiny.artifacts)])
    assert result.exit_code == 4


def test_bench_repaint_times_the_vae_encode(tiny, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), "--duration", "0.5",
                                       "--runs", "1", "--warmup", "0", "--steps", "2", "--task", "repaint",
                                       "--diffusers-dtype", "fp32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["task"] == "repaint"
    for side in (report["ours"], report["diffusers"]["fp32"]):
        assert side["audio_encode_s"] > 0
    assert "audio_encode_s" in report["speedup"]["fp32"]
    assert report["audio"]["fp32"]["max_abs_diff"] < 1e-4  # same noise, posterior mean on both sides
    assert "VAE encode of the source" in result.output


def test_parallel_vae_windows_are_timed_by_the_wall_clock(tiny):
    """The CPU VAE decodes several windows at once: the decode stage is the runtime's wall time of the stage,
    not the sum of the overlapping window runs (which would exceed it)."""
    from acestep_trt.export.bench import OursSide
    from acestep_trt.runtime.specs import VAE_DECODER

    side = OursSide(tiny.artifacts, "ort", "cpu")
    side.rt.vae_workers[VAE_DECODER] = 2
    runs, timed = [], side.rt.runners[VAE_DECODER].run

    def counting(feeds):
        runs.append(feeds["latents"].shape[-1])
        return timed(feeds)

    side.rt.runners[VAE_DECODER].run = counting
    side("piano", "", 6.0, None, 1, 3.0)  # 150 latent frames: two windows at once
    assert len(runs) >= 2
    assert len(side.timer.stages["decode"]) == 1  # one wall-clock figure for the stage


def test_hardware_names_the_cpu_features_that_pick_kernels():
    """The report names the CPU and which of the int8/bf16 kernel features it has (AMX decides torch's bf16)."""
    from acestep_trt.export.bench import CPU_FLAGS, cpu_info, hardware

    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f amx_bf16 "
            "amx_int8 avx512_vnni\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert cpu_info(text) == {"cpu": "Intel(R) Xeon(R) Processor",
                              "cpu_flags": ["avx2", "avx512f", "avx512_vnni", "amx_bf16", "amx_int8"]}
    assert cpu_info("flags\t: sse2\n") == {"cpu_flags": []}
    info = hardware()
    assert info["cores"] >= 1 and set(info.get("cpu_flags", [])) <= set(CPU_FLAGS)
