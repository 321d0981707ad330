"""The benchmark runs both sides on the same noise and reports medians; no timing is asserted here."""

from __future__ import annotations

import json

from click.testing import CliRunner

from acestep_trt.cli import main


def test_bench_reports_both_sides(tiny, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), "--duration", "0.6",
                                       "--runs", "2", "--steps", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for side in ("ours", "diffusers"):
        assert report[side]["runs"] == 2
        assert report[side]["end_to_end_s"] > 0 and report[side]["dit_step_s"] > 0
    assert set(report["speedup"]) >= {"end_to_end_s", "dit_step_s", "decode_s"}
    assert report["max_abs_audio_diff"] < 1e-4  # same noise, same audio
    assert report["audio_snr_db"] > 80.0
    assert report["precision"]["recipe"] == "fp32"
    assert report["ours"]["gpu_peak_mb"] is None and report["diffusers"]["gpu_peak_mb"] is None  # CPU run
    assert "speed-up" in result.output


def test_bench_refuses_bad_arguments(tiny, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), "--runs", "0"])
    assert result.exit_code == 2 and "--runs" in result.output
    result = CliRunner().invoke(main, ["bench", str(tmp_path), str(tiny.artifacts)])
    assert result.exit_code == 4


def test_bench_repaint_times_the_vae_encode(tiny, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(tiny.checkpoint), str(tiny.artifacts), "--duration", "0.5",
                                       "--runs", "1", "--warmup", "0", "--steps", "2", "--task", "repaint",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["task"] == "repaint"
    for side in ("ours", "diffusers"):
        assert report[side]["audio_encode_s"] > 0
    assert report["max_abs_audio_diff"] < 1e-4  # same noise, posterior mean on both sides
    assert "VAE encode of the source" in result.output
