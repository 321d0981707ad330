"""The ``int8`` CPU recipe (``export --precision int8``): int8 matrix products in the encoders and the DiT.

The ``int8`` fixture is the tiny checkpoint exported with that recipe. Its graphs run natively on ONNX
Runtime's CPU provider (no emulation) and are compared with the fp32 export of the same checkpoint.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from acestep_trt.export import precision as prec
from acestep_trt.runtime.errors import BackendError, ExportValidationError, InputError
from acestep_trt.runtime.precision import MIN_SNR_DB, snr_db

from .conftest import Model, noise
from .test_cli_errors import assert_refused, run_cli

QUANTIZED = ("text_encoder", "condition_encoder", "dit_step")


@pytest.fixture(scope="module")
def int8(tiny, tmp_path_factory) -> Model:
    from acestep_trt.export.exporter import export_artifacts

    out = tmp_path_factory.mktemp("int8") / "artifacts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_artifacts(tiny.checkpoint, out, precision="int8", progress=False)
    return Model(tiny.checkpoint, out)


def _graph(model: Model, name: str):
    return onnx.load(str(model.artifacts / f"{name}.onnx"))


def test_int8_recipe_as_data():
    plan = prec.plan("int8")
    assert plan.graphs == {"text_encoder": "int8", "condition_encoder": "int8", "dit_step": "int8",
                           "vae_decoder": "fp32"}
    assert plan.min_snr_db("dit_step") == MIN_SNR_DB["int8"] and plan.min_snr_db("vae_decoder") is None
    assert prec.plan("fp32", {"dit_step": "int8"}).graphs["dit_step"] == "int8"
    with pytest.raises(InputError, match="the VAE has none"):
        prec.plan("int8", {"vae_decoder": "int8"})


def test_export_quantizes_the_weight_products(int8):
    manifest = json.loads((int8.artifacts / "manifest.json").read_text())
    assert manifest["precision"]["recipe"] == "int8"
    for name in QUANTIZED:
        model = _graph(int8, name)
        inits = {t.name: t for t in model.graph.initializer}
        ops = {n.op_type for n in model.graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, name
        assert any(t.data_type == TensorProto.INT8 for t in inits.values()), name
        # no weight product is left in fp32 but the DiT's time-embedding islands (attention's activation
        # products have no constant operand)
        float_weights = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(
            i in inits and inits[i].data_type == TensorProto.FLOAT and "time_embed" not in i for i in n.input)]
        assert not float_weights, (name, float_weights)
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL)
    vae = _graph(int8, "vae_decoder")
    assert not any(t.data_type == TensorProto.INT8 for t in vae.graph.initializer)
    rows = [r for r in manifest["validation"] if r["graph"] in QUANTIZED and r["output"] != "encoder_attention_mask"]
    assert rows and all(r["ok"] and r["min_snr_db"] == MIN_SNR_DB["int8"] <= r["snr_db"] for r in rows), rows


def test_dit_time_embeddings_stay_fp32(int8):
    """The fp32 islands of the bf16 recipe: the time-embedding MLPs keep fp32 weights and products."""
    model = _graph(int8, "dit_step")
    inits = {t.name: t for t in model.graph.initializer}
    island = [name for name in inits if name.startswith(("dit.time_embed.", "dit.time_embed_r."))
              and ".weight" in name]
    assert len(island) == 6  # linear_1, linear_2, time_proj of both embeddings
    assert all(inits[name].data_type == TensorProto.FLOAT for name in island), island
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeLinear"):
            assert not any("time_embed" in i for i in node.input), node.name


def test_int8_runs_natively_on_the_cpu_close_to_fp32(int8, runtime):
    from acestep_trt.runtime import AceStepRuntime

    kwargs = dict(prompt=["piano", "rock, drums"], lyrics="[verse]\nla la", audio_duration=21 / 25,
                  latents=noise(2, 21, seed=5), output_type="latent")  # the tiny VAE hides small differences
    want = runtime(**kwargs).audios
    with AceStepRuntime.load(int8.artifacts) as rt:  # no emulate_precision: int8 is native on the CPU
        got = rt(**kwargs).audios
    assert np.all(np.isfinite(got)) and got.shape == want.shape
    assert 30.0 < snr_db(got, want) < 90.0  # quantised (measured 59 dB), but close


def test_generate_cli_runs_int8(int8, tmp_path):
    out = tmp_path / "x.wav"
    result = run_cli("generate", int8.artifacts, "--prompt", "piano", "--duration", "0.5", "--seed", "1",
                     "--out", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_int8_is_refused_on_cuda():
    from acestep_trt.runtime.backends.ort import _check_precision

    with pytest.raises(BackendError, match="CPU deployment recipe"):
        _check_precision("dit_step", "int8", "cuda", emulate=False)
    assert _check_precision("dit_step", "int8", "cpu", emulate=False) is False


def test_build_refuses_int8_exports_before_tensorrt(int8):
    assert_refused(run_cli("build", int8.artifacts), 2, "int8 CPU recipe", "--precision bf16")


def test_int8_below_its_floor_writes_nothing(tiny, tmp_path, monkeypatch):
    from acestep_trt.export.exporter import export_artifacts

    monkeypatch.setitem(MIN_SNR_DB, "int8", 200.0)
    out = tmp_path / "out"
    with warnings.catch_warnings(), pytest.raises(ExportValidationError):
        warnings.simplefilter("ignore")
        export_artifacts(tiny.checkpoint, out, graph_precision={"text_encoder": "int8"}, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_lora_at_generate_time_is_refused_on_int8(int8):
    """The int8 DiT's weights are quantised, so the export keeps no weight map; adapters are fused at export."""
    from acestep_trt.runtime.lora import parameter_map

    manifest = json.loads((int8.artifacts / "manifest.json").read_text())
    assert "parameters" not in manifest["graphs"]["dit_step"]
    with pytest.raises(InputError, match="--precision int8 --lora PATH"):
        parameter_map(manifest)


def test_quantiser_advice_stays_out_of_the_log(tiny, tmp_path, caplog):
    """quantize_dynamic logs advice to pre-process on the root logger; the export drops that one record (the
    recipe is validated as written), and the root logger keeps no filter of ours afterwards."""
    import logging
    import shutil

    from acestep_trt.export.quantize import quantize_int8

    for suffix in ("", ".data"):
        source = tiny.artifacts / f"text_encoder.onnx{suffix}"
        if source.exists():
            shutil.copy(source, tmp_path / source.name)
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        result = quantize_int8(tmp_path / "text_encoder.onnx", "text_encoder")
    assert result["quantized"] > 0
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()], caplog.text
    assert logging.getLogger().filters == filters
