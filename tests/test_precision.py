"""Reduced-precision export recipes (``export --precision``, ``--graph-precision``) and their CPU emulation.

The ``reduced`` fixture is the tiny checkpoint exported with the bf16 recipe plus fp16 text encoder and
VAE, so bf16 and fp16 graphs are both covered. ONNX Runtime's CPU provider has no bf16 kernels: these
graphs run here through :mod:`acestep_trt.runtime.precision`'s emulation (fp32 arithmetic, every
reduced value rounded), which is itself checked against NumPy with ml_dtypes rounding.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from acestep_trt.export import precision as prec
from acestep_trt.runtime.errors import BackendError, InputError
from acestep_trt.runtime.precision import MIN_SNR_DB, emulate, emulated_copy, snr_db
from acestep_trt.runtime.specs import GRAPH_NAMES

from .conftest import REDUCED_OVERRIDES, noise
from .test_cli_errors import assert_refused, run_cli

EXPECTED = {"text_encoder": "fp16", "condition_encoder": "bf16", "dit_step": "bf16", "vae_decoder": "fp16"}


# ------------------------------------------------------------------ emulation, against NumPy


def reduced_types(model) -> set[str]:
    """Names of the reduced float types (``"bf16"``, ``"fp16"``) held anywhere in ``model``'s main graph."""
    names = {TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT16: "fp16"}
    found = {names[t.data_type] for t in model.graph.initializer if t.data_type in names}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i in names:
                found.add(names[attr.i])
    return found


def _matmul_graph(low: int):
    """x [2, 3] fp32 -> Cast(low) -> MatMul(w low) -> Add(b low) -> Cast(fp32)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    np_low = _np_low(low)
    nodes = [
        helper.make_node("Cast", ["x"], ["xl"], to=low),
        helper.make_node("MatMul", ["xl", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["s"]),
        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [_low_tensor(w.astype(np_low), "w", low), _low_tensor(b.astype(np_low), "b", low)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), w, b


def _np_low(low: int):
    import ml_dtypes

    return ml_dtypes.bfloat16 if low == TensorProto.BFLOAT16 else np.float16


def _low_tensor(values: np.ndarray, name: str, low: int):
    if low == TensorProto.FLOAT16:
        return numpy_helper.from_array(values, name)
    raw = values.view(np.uint16).tobytes()
    return helper.make_tensor(name, low, values.shape, raw, raw=True)


@pytest.mark.parametrize("low", [TensorProto.BFLOAT16, TensorProto.FLOAT16], ids=["bf16", "fp16"])
def test_emulation_rounds_like_the_reduced_type(low):
    import onnxruntime as ort

    model, w, b = _matmul_graph(low)
    emulate(model)
    assert reduced_types(model) == {"bf16" if low == TensorProto.BFLOAT16 else "fp16"}
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    t = _np_low(low)
    r = lambda a: a.astype(t).astype(np.float32)  # noqa: E731  round to the reduced type
    want = r(r(r(x) @ r(w)) + r(b))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, x @ w + b)  # the rounding is really there


def test_emulation_refuses_a_reduced_interface():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])])
    with pytest.raises(ValueError, match="fp32 I/O"):
        emulate(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_snr_db():
    ref = np.ones(100)
    assert snr_db(ref, ref) == float("inf")
    assert snr_db(ref * 1.1, ref) == pytest.approx(20.0)
    assert np.isnan(snr_db(np.full(100, np.nan), ref))


# ------------------------------------------------------------------ recipes as data


def test_recipes_and_overrides():
    assert prec.plan("fp32").graphs == {n: "fp32" for n in GRAPH_NAMES}
    bf16 = prec.plan("bf16")
    assert bf16.graphs == {"text_encoder": "bf16", "condition_encoder": "bf16", "dit_step": "bf16",
                           "vae_decoder": "fp32"}
    assert bf16.min_snr_db("dit_step") == MIN_SNR_DB["bf16"] and bf16.min_snr_db("vae_decoder") is None
    mixed = prec.plan("bf16", REDUCED_OVERRIDES)
    assert mixed.graphs == EXPECTED
    assert mixed.min_snr_db("vae_decoder") == prec.VAE_MIN_SNR_DB == 40.0
    assert prec.parse_overrides(("text_encoder=fp16", " dit_step = bf16 ")) == {"text_encoder": "fp16",
                                                                               "dit_step": "bf16"}


@pytest.mark.parametrize(
    "recipe, overrides, needle",
    [
        ("fp16", {}, "unknown precision recipe"),
        ("bf16", {"dit_step": "fp16"}, "overflows"),
        ("bf16", {"vae_decoder": "bf16"}, "ConvTranspose"),
        ("bf16", {"unet": "fp16"}, "unknown graph"),
    ],
)
def test_bad_plans_are_refused(recipe, overrides, needle):
    with pytest.raises(InputError, match=needle):
        prec.plan(recipe, overrides)


@pytest.mark.parametrize("item", ["dit_step", "dit_step=int4", "=bf16x"])
def test_bad_override_syntax(item):
    with pytest.raises(InputError, match="GRAPH=DTYPE"):
        prec.parse_overrides((item,))


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--precision", "fp16"), "fp16"),
        (("--graph-precision", "dit_step=fp16"), "overflows"),
        (("--graph-precision", "vae_decoder"), "GRAPH=DTYPE"),
    ],
)
def test_export_cli_refuses_bad_precision(tiny, tmp_path, args, needle):
    out = tmp_path / "out"
    result = run_cli("export", tiny.checkpoint, out, *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not out.exists()


# ------------------------------------------------------------------ the exported graphs


def _manifest(model):
    return json.loads((model.artifacts / "manifest.json").read_text())


def test_manifest_records_the_precision(reduced):
    manifest = _manifest(reduced)
    assert manifest["precision"] == {"recipe": "bf16", "graphs": EXPECTED}
    for name, dtype in EXPECTED.items():
        assert manifest["graphs"][name]["precision"] == dtype
    rows = [r for r in manifest["validation"] if r["min_snr_db"] is not None]
    assert {r["graph"] for r in rows} == set(GRAPH_NAMES)
    for row in rows:
        assert row["ok"] and row["snr_db"] >= row["min_snr_db"], row
    vae = [r for r in rows if r["graph"] == "vae_decoder"]
    assert vae and all(r["min_snr_db"] == 40.0 for r in vae)


def test_graphs_hold_reduced_weights_behind_an_fp32_interface(reduced):
    for name, dtype in EXPECTED.items():
        model = onnx.load(str(reduced.artifacts / f"{name}.onnx"), load_external_data=False)
        assert dtype in reduced_types(model), name
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL)


def test_dit_keeps_its_fp32_islands(reduced):
    """Convolutions (patch embedding in, ConvTranspose out), the time-embedding MLPs (Gemm) and the
    RMSNorm statistics compute in fp32; the matmuls of the stream run in bf16."""
    from acestep_trt.runtime.precision import _value_types

    model = onnx.load(str(reduced.artifacts / "dit_step.onnx"), load_external_data=False)
    types = _value_types(model)
    by_op: dict[str, set] = {}
    for node in model.graph.node:
        by_op.setdefault(node.op_type, set()).add(types.get(node.output[0]))
    assert by_op["Conv"] == {TensorProto.FLOAT} and by_op["ConvTranspose"] == {TensorProto.FLOAT}
    assert by_op["Gemm"] == {TensorProto.FLOAT}
    assert by_op["ReduceMean"] == {TensorProto.FLOAT}
    assert by_op["Sin"] == {TensorProto.FLOAT} and by_op["Cos"] == {TensorProto.FLOAT}
    assert TensorProto.BFLOAT16 in by_op["MatMul"] and TensorProto.BFLOAT16 in by_op["Softmax"]


def test_cast_dit_keeps_island_weights_exact(tiny):
    import torch

    from acestep_trt.export.checkpoint import load_component

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dit = load_component(tiny.checkpoint, "transformer")
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    prec.cast_dit(dit, "bf16")
    after = {k.replace(".inner.", "."): v for k, v in dit.state_dict().items()}
    assert after.keys() == before.keys()
    island = ("time_embed.", "time_embed_r.", "proj_in_conv.", "proj_out_conv.", "scale_shift_table", "norm")
    for key, value in after.items():
        if any(part in key for part in island):
            assert value.dtype == torch.float32 and torch.equal(value, before[key]), key
        else:
            assert value.dtype == torch.bfloat16, key
    assert any("mlp" in k for k in after) and any("norm_q" in k for k in after)


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_emulated_graph_matches_pytorch_in_the_same_precision(reduced, name, tmp_path):
    """The exported graph is as close to fp32 as the PyTorch module cast by the same recipe (within 1.5 dB).

    A graph that lost an fp32 island, or rounded where PyTorch does not, would fall visibly short. The
    two reduced-precision results are not compared with each other: their rounding noise is independent
    and as large as each one's distance to fp32.
    """
    import onnxruntime as ort
    import torch

    from acestep_trt.export import exporter as ex
    from acestep_trt.export import validate as val
    from acestep_trt.export.checkpoint import inspect_checkpoint, load_component
    from acestep_trt.runtime.specs import all_specs

    cfg = inspect_checkpoint(reduced.checkpoint)
    spec, recipe = all_specs(cfg)[name], ex._recipes()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = load_component(reduced.checkpoint, recipe.component)
    fp32_cases = ex.reference_outputs(module, recipe, spec, cfg)
    low = prec.prepare(name, recipe.adapter(module), EXPECTED[name])
    path = emulated_copy(reduced.artifacts / f"{name}.onnx", tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for dims, feeds, ref in fp32_cases:
        got = dict(zip([o.name for o in spec.outputs], session.run(None, feeds)))
        with torch.no_grad():
            out = low(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs])
        out = dict(zip([o.name for o in spec.outputs], out if isinstance(out, tuple) else (out,)))
        for o in spec.outputs:
            if o.dtype == "bool":
                np.testing.assert_array_equal(got[o.name], out[o.name].numpy())
                continue
            to_fp32 = snr_db(got[o.name], ref[o.name])
            torch_to_fp32 = snr_db(out[o.name].float().numpy(), ref[o.name])
            assert np.all(np.isfinite(got[o.name]))
            assert abs(to_fp32 - torch_to_fp32) < 1.5, (name, o.name, dims, to_fp32, torch_to_fp32)
            assert val.Comparison(name, o.name, "", (), 0.0, 1.0, 1.0, to_fp32,
                                  MIN_SNR_DB[EXPECTED[name]]).ok


# ------------------------------------------------------------------ the runtime with reduced graphs


def test_cpu_refuses_reduced_graphs_without_emulation(reduced, tmp_path):
    from acestep_trt.runtime import AceStepRuntime

    with pytest.raises(BackendError, match="does not run reduced-precision graphs"):
        AceStepRuntime.load(reduced.artifacts)
    out = tmp_path / "x.wav"
    result = run_cli("generate", reduced.artifacts, "--prompt", "piano", "--duration", "0.5", "--out", out)
    assert_refused(result, 6, "--emulate-precision", "--precision fp32")
    assert not out.exists()


def test_emulated_generation_is_close_to_fp32(tiny, reduced, runtime):
    from acestep_trt.runtime import AceStepRuntime

    latents = noise(2, 13, seed=3)
    kwargs = dict(prompt=["piano", "rock, drums"], lyrics="[verse]\nla la", audio_duration=13 / 25,
                  latents=latents, output_type="latent")
    want = runtime(**kwargs).audios
    with AceStepRuntime.load(reduced.artifacts, emulate_precision=True) as rt:
        got = rt(**kwargs).audios
    assert np.all(np.isfinite(got))
    assert 35.0 < snr_db(got, want) < 120.0  # reduced precision, but close


def test_generate_cli_with_emulation(reduced, tmp_path):
    out = tmp_path / "x.wav"
    result = run_cli("generate", reduced.artifacts, "--prompt", "piano", "--duration", "0.5", "--seed", "1",
                     "--out", out, "--emulate-precision")
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_compare_command(tiny, reduced, tmp_path):
    report_path = tmp_path / "compare.json"
    result = run_cli("compare", tiny.artifacts, reduced.artifacts, "--duration", "0.6", "--steps", "3",
                     "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["precision"]["graphs"] == EXPECTED and len(report["cases"]) == 3
    assert report["summary"]["all_finite"]
    assert all(30.0 < c["latents_snr_db"] < 120.0 for c in report["cases"])
    gated = run_cli("compare", tiny.artifacts, reduced.artifacts, "--duration", "0.6", "--steps", "3",
                    "--min-audio-snr-db", "500")
    assert_refused(gated, 5, "below --min-audio-snr-db 500")


def test_compare_refuses_exports_of_different_models(tiny, variant):
    assert_refused(run_cli("compare", tiny.artifacts, variant.artifacts), 2, "different model configurations")


def test_bench_refuses_to_time_emulation(reduced):
    result = run_cli("bench", reduced.checkpoint, reduced.artifacts, "--duration", "0.6", "--runs", "1")
    assert_refused(result, 6, "text_encoder was exported in fp16")
