"""The ``int8`` CPU recipe (``export --precision int8``): int8 matrix products in the encoders and the DiT.

The ``int8`` fixture is the tiny checkpoint exported with that recipe. Its graphs run natively on ONNX
Runtime's CPU provider (no emulation) and are compared with the fp32 export of the same checkpoint.
"""

from __future__ import annotations

import json
import os
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
    """The recipe used to call quantize_dynamic, which logs advice to pre-process on the root logger (it does
    not apply: the recipe is validated as written); our quantiser logs no such record and leaves the root
    logger's filters alone."""
    import logging

    from acestep_trt.export.quantize import quantize_int8

    _copy_graph(tiny.artifacts, "text_encoder", tmp_path)
    filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        result = quantize_int8(tmp_path / "text_encoder.onnx", "text_encoder")
    assert result["quantized"] > 0
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()], caplog.text
    assert logging.getLogger().filters == filters


# --- the streaming quantiser (export/quantize.py) against ONNX Runtime's quantize_dynamic --------------------

def _copy_graph(artifacts, name: str, directory):
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".data"):
        source = artifacts / f"{name}.onnx{suffix}"
        if source.exists():
            shutil.copy(source, directory / source.name)
    return directory / f"{name}.onnx"


def _initializers(path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _node_set(path) -> list:
    """Nodes as comparable records, order aside (quantize_dynamic sorts them topologically)."""
    return sorted(n.SerializeToString() for n in onnx.load(str(path), load_external_data=False).graph.node)


def _run(path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread: the same kernels give the same bits
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same_int8_graph(ours, theirs, feeds: dict) -> None:
    """Same nodes, bit-identical initializers (int8 weights, scales, zero points), identical outputs."""
    got, want = _initializers(ours), _initializers(theirs)
    assert got.keys() == want.keys(), set(got) ^ set(want)
    int8 = [name for name, value in want.items() if value.dtype == np.int8 and value.ndim == 2]
    assert int8, "quantize_dynamic quantised nothing: the comparison would be empty"
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name
    assert _node_set(ours) == _node_set(theirs)
    for a, b in zip(_run(ours, feeds), _run(theirs, feeds)):
        np.testing.assert_array_equal(a, b)


def test_streaming_quantiser_equals_quantize_dynamic_on_the_dit(tiny, tmp_path):
    """The tiny DiT quantised both ways: same graph, bit for bit, and the same outputs at an off-trace shape
    (batch 3, an odd latent length beyond the sliding window); the time-embedding islands stay fp32 MatMuls."""
    from acestep_trt.export.quantize import quantize_int8, quantize_with_ort
    from acestep_trt.export.validate import make_inputs
    from acestep_trt.runtime.artifacts import load_artifacts

    ours = _copy_graph(tiny.artifacts, "dit_step", tmp_path / "ours")
    theirs = _copy_graph(tiny.artifacts, "dit_step", tmp_path / "theirs")
    result = quantize_int8(ours, "dit_step")
    quantize_with_ort(theirs, "dit_step")
    artifacts = load_artifacts(tiny.artifacts, verify=False)
    dims = {"batch": 3, "cond_len": 13, "latent_len": 2 * artifacts.config.sliding_window + 5}
    feeds = make_inputs(artifacts.spec("dit_step"), dims, artifacts.config, seed=3)
    _assert_same_int8_graph(ours, theirs, feeds)

    model = onnx.load(str(ours), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert result["quantized"] == ops.count("MatMulInteger") > 0
    inits = {t.name: t.data_type for t in model.graph.initializer}
    kept = [n for n in model.graph.node if n.name in result["kept_fp32"] and n.op_type == "MatMul"]
    assert len(kept) == 6 and all(inits[n.input[1]] == TensorProto.FLOAT for n in kept)
    assert not list(tmp_path.glob("*/.dit_step.int8-*"))  # the temporary directory is gone


def _synthetic_graph(directory, weights: list[np.ndarray], extra: bool = False):
    """x [B, K] through a chain of MatMuls with ``weights`` (each [K, K]), saved with external data.

    ``extra`` adds the rarer cases: a Gemm (transB, bias) that is quantised, one under a KEEP_FP32 scope that
    is not, a weight shared by two MatMuls (one activation feeding both), an all-zero output column, and a
    MatMul of two activations (left alone).
    """
    from onnx import helper, numpy_helper

    k = weights[0].shape[0]
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    if extra:
        rng = np.random.default_rng(7)
        gemm_w = rng.standard_normal((k, k)).astype(np.float32)
        gemm_w[3] = 0.0  # [N, K] under transB: output channel 3
        inits += [numpy_helper.from_array(gemm_w, "gemm_w"), numpy_helper.from_array(gemm_w[0], "gemm_b"),
                  numpy_helper.from_array(rng.standard_normal((k, k)).astype(np.float32), "emb_w")]
        nodes += [helper.make_node("Gemm", [x, "gemm_w", "gemm_b"], ["g"], name="gemm", transB=1),
                  helper.make_node("Gemm", ["g", "emb_w", "gemm_b"], ["e"], name="emb", transB=1),
                  helper.make_node("MatMul", ["e", "w0"], ["s1"], name="shared1"),
                  helper.make_node("MatMul", ["e", "w0"], ["s2"], name="shared2"),
                  helper.make_node("Transpose", ["s2"], ["s2t"], name="t"),
                  helper.make_node("MatMul", ["s1", "s2t"], ["y"], name="activations")]
        scope = nodes[-5].metadata_props.add()  # the second Gemm sits in the DiT's time embedding
        scope.key, scope.value = "pkg.torch.onnx.name_scopes", "['', 'dit.time_embed', 'dit.time_embed.linear_1']"
    else:
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dit_step.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="dit_step.onnx.data", size_threshold=0)
    return path


def test_streaming_quantiser_equals_quantize_dynamic_on_rare_cases(tmp_path):
    """Gemm rewritten and quantised (transposed weight), a Gemm kept fp32 by scope, a shared weight quantised
    once, a zero column (scale 1), a product of activations: as quantize_dynamic, bit for bit."""
    from acestep_trt.export.quantize import quantize_int8, quantize_with_ort

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2)]
    ours = _synthetic_graph(tmp_path / "ours", weights, extra=True)
    theirs = _synthetic_graph(tmp_path / "theirs", weights, extra=True)
    result = quantize_int8(ours, "dit_step")
    quantize_with_ort(theirs, "dit_step")
    _assert_same_int8_graph(ours, theirs, {"x": rng.standard_normal((5, 16)).astype(np.float32)})
    assert result == {"quantized": 5, "kept_fp32": ["emb", "emb_MatMul"]}
    scale = _initializers(ours)["gemm_w_Transposed_scale"]
    assert scale[3] == 1.0 and np.count_nonzero(scale == 1.0) == 1  # the zero channel's scale


def test_quantize_weight_is_per_output_channel_and_symmetric():
    from acestep_trt.export.quantize import quantize_weight

    w = np.array([[0.5, -2.0, 0.0], [-1.0, 1.0, 0.0], [0.25, 0.5, 0.0]], np.float32)  # [K=3, N=3]
    q, scale = quantize_weight(w)
    np.testing.assert_array_equal(scale, np.float32([1.0 / 127, 2.0 / 127, 1.0]))
    np.testing.assert_array_equal(q, [[64, -127, 0], [-127, 64, 0], [32, 32, 0]])  # 63.5 and 31.75 round to even
    assert q.dtype == np.int8


_MEMORY_CHILD = """
import sys
from pathlib import Path
import onnx, onnx.numpy_helper  # imported before the measurement starts
from acestep_trt.export.quantize import quantize_int8

def status(key):  # kB
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM (the peak resident set) to the current resident set
before = status("VmRSS")
quantize_int8(Path(sys.argv[1]), "dit_step")
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak RSS through Linux's /proc")
def test_quantiser_holds_about_one_weight(tmp_path):
    """40 MatMuls of 4 MiB fp32 weights (160 MiB) quantised in a fresh process: its peak resident memory grows
    by a few weights' worth (measured: +9 MiB), not by the graph's (quantize_dynamic, measured the same way: +489 MiB).

    The peak is the kernel's high-water mark of this process alone, reset after the imports (``ru_maxrss``
    would not do: it keeps the peak of the pytest process that forked the child).
    """
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((1024, 1024)).astype(np.float32) for _ in range(40)]
    path = _synthetic_graph(tmp_path, weights)
    del weights
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(path)], capture_output=True, text=True, check=True)
    growth_mib = int(out.stdout.split()[-1]) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.0f} MiB quantising 160 MiB of weights"
    model = onnx.load(str(path), load_external_data=False)
    assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == 40
    assert (tmp_path / "dit_step.onnx.data").stat().st_size == 40 * 1024 * 1024  # int8: a quarter of the fp32


def test_quantiser_failure_leaves_the_fp32_graph(tmp_path, monkeypatch):
    """An error halfway (here: the third weight) and a truncated data file leave the fp32 files as they were
    and nothing beside them; the truncated file is an ArtifactError that names the remedy."""
    from acestep_trt.export import quantize
    from acestep_trt.runtime.errors import ArtifactError

    rng = np.random.default_rng(0)
    path = _synthetic_graph(tmp_path, [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(4)])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing(weight):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(weight)

    real = quantize.quantize_weight
    monkeypatch.setattr(quantize, "quantize_weight", failing)
    with pytest.raises(OSError, match="No space"):
        quantize.quantize_int8(path, "dit_step")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(quantize, "quantize_weight", real)
    data = tmp_path / "dit_step.onnx.data"
    data.write_bytes(before[data.name][:-100])
    with pytest.raises(ArtifactError, match="export the fp32 graph again"):
        quantize.quantize_int8(path, "dit_step")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
