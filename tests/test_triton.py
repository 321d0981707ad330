"""Triton model repositories against a real Triton server started here on 127.0.0.1.

The server is ``tritonserver`` 2.51 from ``nvidia-pytriton`` (python backend only), run in ``.venv-triton``
(created by ``scripts/setup.sh``; override with ``ACESTEP_TRITON_PYTHON``). The orchestrator ``acestep`` and
its BLS calls run for real; the graph models run through their python ONNX shims, whose configs are the
generated ``onnxruntime_onnx`` configs with only the platform line changed (checked below, with the real
configs parsed by Triton's own protobuf schema). See docs/triton.md.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from acestep_trt.cli import main
from acestep_trt.runtime.errors import BackendError, InputError
from acestep_trt.runtime.specs import AUDIO_DETOKENIZER, AUDIO_TOKENIZER, DIT_STEP, GRAPH_NAMES, VAE_ENCODER
from acestep_trt.runtime.triton import config as tc
from acestep_trt.runtime.triton.client import request_audio
from acestep_trt.runtime.triton.repository import SHIM_CONFIG_NAME, RepositoryOptions, write_repository
from acestep_trt.runtime.triton.serving import request_kwargs

REPO_ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = Path(os.environ.get("ACESTEP_TRITON_PYTHON", REPO_ROOT / ".venv-triton" / "bin" / "python"))
MAX_BATCH = 4
REQUEST = {"prompt": "calm lo-fi piano with rain", "lyrics": "[verse]\nsoft light", "audio_duration": 1.0,
           "num_inference_steps": 4, "shift": 3.0, "bpm": 90, "keyscale": "C major", "timesignature": "4"}


def _platform_blocker() -> str | None:
    """Why pytriton's server binary cannot run here at all (it is a manylinux_2_35 x86_64 build), or None."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"nvidia-pytriton's tritonserver is built for Linux x86_64, not {sys.platform}/{platform.machine()}"
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    parts = libc.split()[-1].split(".") if libc.startswith("glibc") else []
    if not parts or tuple(int(p) for p in parts[:2]) < (2, 35):
        return f"nvidia-pytriton's tritonserver needs glibc >= 2.35, this system has {libc or 'no glibc'}"
    return None


@pytest.fixture(scope="module")
def repository(tiny, tmp_path_factory) -> Path:
    options = RepositoryOptions(instances=2, max_batch=MAX_BATCH, python_onnx_shim=True)
    return write_repository(tiny.artifacts, tmp_path_factory.mktemp("triton") / "repo", options)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    """The real server on free 127.0.0.1 ports; always stopped (process group killed) at teardown."""
    from acestep_trt.runtime.triton.server import LocalTritonServer

    blocker = _platform_blocker()
    if blocker:
        pytest.skip(blocker)
    srv = LocalTritonServer(repository, TRITON_PYTHON, tmp_path_factory.mktemp("tritonserver"), SHIM_CONFIG_NAME)
    srv.start(timeout=240)
    try:
        yield srv
    finally:
        srv.stop()


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# ------------------------------------------------------------------------------------ generated configs


def test_graph_configs_follow_specs(repository, tiny):
    """Each real config.pbtxt parses with Triton's schema and states exactly the spec's tensors."""
    from acestep_trt.runtime.artifacts import load_artifacts

    from tritonclient.grpc import model_config_pb2 as pb

    artifacts = load_artifacts(tiny.artifacts)
    dtypes = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64, "bool": pb.TYPE_BOOL}
    for graph in GRAPH_NAMES:
        spec, config = artifacts.specs[graph], _parse(repository / graph / "config.pbtxt")
        assert (config.name, config.platform, config.backend) == (graph, "onnxruntime_onnx", "")
        assert config.max_batch_size == MAX_BATCH  # tiny is turbo: no doubled DiT batch
        assert config.HasField("dynamic_batching")
        for tensors, declared in ((spec.inputs, config.input), (spec.outputs, config.output)):
            assert [t.name for t in tensors] == [d.name for d in declared]
            for t, d in zip(tensors, declared):
                assert d.data_type == dtypes[t.dtype]
                expected = [-1 if isinstance(x, str) else x for x in t.dims[1:]]
                if expected:
                    assert list(d.dims) == expected and not d.HasField("reshape")
                else:  # [batch] -> dims [1] reshaped to []
                    assert list(d.dims) == [1] and d.HasField("reshape") and list(d.reshape.shape) == []
        assert (repository / graph / "1" / "model.onnx").is_file()


def test_shim_configs_differ_only_in_backend(repository):
    """The python shims the server runs carry the real configs with only the platform line swapped."""
    for graph in GRAPH_NAMES:
        real_text = (repository / graph / "config.pbtxt").read_text()
        shim_text = (repository / graph / "configs" / f"{SHIM_CONFIG_NAME}.pbtxt").read_text()
        diff = [(a, b) for a, b in zip(real_text.splitlines(), shim_text.splitlines()) if a != b]
        assert diff == [(tc.ONNX_PLATFORM, tc.PYTHON_BACKEND)]
        real, shim = _parse(repository / graph / "config.pbtxt"), _parse(
            repository / graph / "configs" / f"{SHIM_CONFIG_NAME}.pbtxt")
        real.platform, shim.backend = "", ""
        assert real == shim


def test_orchestrator_config(repository):
    config = _parse(repository / "acestep" / "config.pbtxt")
    assert (config.backend, config.max_batch_size) == ("python", 0)
    assert [i.name for i in config.input if not i.optional] == ["prompt"]
    assert {o.name: list(o.dims) for o in config.output} == {"audio": [2, -1], "sample_rate": [1]}


def test_engine_repository_configs(tiny, tmp_path, monkeypatch):
    """--engines writes tensorrt_plan models on KIND_GPU with the engines' batch and VAE window (engines.json).

    Configs only: the engines come from the fake TensorRT (tests/fake_trt.py), no TensorRT server here.
    """
    import json
    import shutil

    from acestep_trt.runtime.errors import ArtifactError
    from acestep_trt.runtime.trt.builder import build_engines
    from acestep_trt.runtime.trt.profiles import ProfileRequest

    from . import fake_trt

    fake_trt.install(monkeypatch)
    engines = tmp_path / "engines"
    request = ProfileRequest(min_duration=0.5, opt_duration=1.0, max_duration=4.0, max_batch=2, max_lyric_len=64,
                             vae_window=64)
    build_engines(tiny.artifacts, engines, request)
    repo = write_repository(tiny.artifacts, tmp_path / "repo", RepositoryOptions(engines=engines))
    for graph in GRAPH_NAMES:
        config = _parse(repo / graph / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and config.max_batch_size == 2  # the engines' --max-batch
        assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
        assert (repo / graph / "1" / "model.plan").read_bytes() == (engines / f"{graph}.plan").read_bytes()
        assert not (repo / graph / "1" / "model.onnx").exists()
    assert json.loads((repo / "acestep" / "1" / "orchestrator.json").read_text())["vae_window"] == 64
    smaller = write_repository(tiny.artifacts, tmp_path / "repo1", RepositoryOptions(engines=engines, max_batch=1))
    assert _parse(smaller / DIT_STEP / "config.pbtxt").max_batch_size == 1
    result = CliRunner().invoke(main, ["triton", str(tiny.artifacts), str(tmp_path / "repo2"), "--engines",
                                       str(engines), "--max-batch", "3"])
    assert result.exit_code == InputError.exit_code and not (tmp_path / "repo2").exists()
    assert "--max-batch 3 exceeds what the engines" in result.output and "(2)" in result.output
    with pytest.raises(InputError, match="--vae-window 128 exceeds"):
        write_repository(tiny.artifacts, tmp_path / "repo3", RepositoryOptions(engines=engines, vae_window=128))
    # the audio graphs' engines too, each model's batch capped by its engine's profile (one source clip)
    for graph, batch in ((VAE_ENCODER, 1), ("audio_tokenizer", 1), ("audio_detokenizer", 2)):
        config = _parse(repo / graph / "config.pbtxt")
        assert (config.platform, config.max_batch_size) == ("tensorrt_plan", batch), graph
        assert (repo / graph / "1" / "model.plan").read_bytes() == (engines / f"{graph}.plan").read_bytes()
    assert not (repo / "cover_blend").exists()  # the orchestrator runs no device loop
    old = tmp_path / "old_engines"  # an engine directory built before the audio graphs had engines: ONNX models
    shutil.copytree(engines, old)
    data = json.loads((old / "engines.json").read_text())
    data["graphs"] = {g: r for g, r in data["graphs"].items() if g in GRAPH_NAMES}
    (old / "engines.json").write_text(json.dumps(data))
    repo5 = write_repository(tiny.artifacts, tmp_path / "repo5", RepositoryOptions(engines=old))
    assert _parse(repo5 / VAE_ENCODER / "config.pbtxt").platform == "onnxruntime_onnx"
    assert (repo5 / VAE_ENCODER / "1" / "model.onnx").is_file() and not (repo5 / VAE_ENCODER / "1" / "model.plan").exists()
    assert _parse(repo5 / DIT_STEP / "config.pbtxt").platform == "tensorrt_plan"
    (engines / "engines.json").unlink()  # plans without a manifest: their profiles are unknown
    with pytest.raises(ArtifactError, match="engines.json is missing"):
        write_repository(tiny.artifacts, tmp_path / "repo4", RepositoryOptions(engines=engines))


def test_guided_checkpoint_doubles_dit_batch(variant, tmp_path):
    repo = write_repository(variant.artifacts, tmp_path / "repo", RepositoryOptions(max_batch=3))
    assert _parse(repo / DIT_STEP / "config.pbtxt").max_batch_size == 6
    assert _parse(repo / "vae_decoder" / "config.pbtxt").max_batch_size == 3


def test_cli_triton_errors(tiny, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["triton", str(tmp_path / "nope"), str(tmp_path / "r1")])
    assert missing.exit_code == 3 and "does not exist" in missing.output
    bad = runner.invoke(main, ["triton", str(tiny.artifacts), str(tmp_path / "r2"), "--instances", "0"])
    assert bad.exit_code == 2 and "instances" in bad.output
    no_engines = runner.invoke(main, ["triton", str(tiny.artifacts), str(tmp_path / "r3"), "--engines",
                                      str(tmp_path / "none")])
    assert no_engines.exit_code == 3 and not (tmp_path / "r3").exists()
    ok = runner.invoke(main, ["triton", str(tiny.artifacts), str(tmp_path / "r4")])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(main, ["triton", str(tiny.artifacts), str(tmp_path / "r4")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_orchestrator_refuses_tampered_artifacts(tiny, tmp_path):
    """The orchestrator verifies its copied files (not the graphs, which live in the graph models)."""
    from acestep_trt.runtime.errors import ArtifactError
    from acestep_trt.runtime.triton.serving import load_orchestrator_artifacts

    repo = write_repository(tiny.artifacts, tmp_path / "repo")
    files = repo / "acestep" / "1" / "artifacts"
    assert load_orchestrator_artifacts(files).config.is_turbo
    assert not list(files.glob("*.onnx*"))
    tokenizer = files / "tokenizer" / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated"):
        load_orchestrator_artifacts(files)


def test_request_parsing():
    arrays = {"prompt": np.array([b"piano"], dtype=object), "seed": np.array([3], np.int64),
              "audio_duration": np.array([2.5], np.float32)}
    kwargs = request_kwargs(arrays.get)
    assert kwargs == {"prompt": "piano", "seed": 3, "audio_duration": 2.5}
    with pytest.raises(InputError, match="prompt"):
        request_kwargs({}.get)
    with pytest.raises(InputError, match="seed"):
        request_kwargs({**arrays, "seed": np.array([-1], np.int64)}.get)
    with pytest.raises(InputError, match="exactly one"):
        request_kwargs({**arrays, "prompt": np.array([b"a", b"b"], dtype=object)}.get)
    task = {"prompt": np.array([b"piano"], dtype=object), "task_type": np.array([b"complete"], dtype=object),
            "complete_track_classes": np.array([b"bass, drums"], dtype=object),
            "repainting_end": np.array([-1.0], np.float32), "src_audio": np.zeros((2, 10), np.float32)}
    kwargs = request_kwargs(task.get)
    assert kwargs["complete_track_classes"] == ["bass", "drums"] and kwargs["repainting_end"] == -1.0
    assert kwargs["src_audio"].shape == (2, 10) and "audio_duration" not in kwargs  # the source sets the length


# ----------------------------------------------------------------------------------- the real server


def test_repository_loads(server, tiny):
    import tritonclient.http as http

    from acestep_trt.runtime.artifacts import load_artifacts

    client = http.InferenceServerClient(server.http_url)
    assert client.is_server_ready()
    for name in (*GRAPH_NAMES, VAE_ENCODER, AUDIO_TOKENIZER, AUDIO_DETOKENIZER, "acestep"):
        assert client.is_model_ready(name), name
    served = client.get_model_config(DIT_STEP)  # the server's parsed view of the generated config
    assert served["max_batch_size"] == MAX_BATCH and served["backend"] == "python"
    spec = load_artifacts(tiny.artifacts).specs[DIT_STEP]
    assert [i["name"] for i in served["input"]] == [t.name for t in spec.inputs]
    assert [o["name"] for o in served["output"]] == [t.name for t in spec.outputs]
    client.close()


SYMBOLIC_SIZES = {"batch": 2, "text_len": 7, "lyric_len": 5, "timbre_len": 9, "latent_len": 5, "cond_len": 13,
                  "audio_len": 5 * 1920 + 7, "patches": 3}


def _random_feeds(spec, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        shape = tuple(SYMBOLIC_SIZES[d] if isinstance(d, str) else d for d in t.dims)
        if t.dtype == "float32":
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32)
        elif t.dtype == "int64":
            feeds[t.name] = rng.integers(0, vocab, shape, dtype=np.int64)
        else:
            feeds[t.name] = np.ones(shape, dtype=bool)
    if "timestep" in feeds:
        feeds["timestep"] = np.full(feeds["timestep"].shape, 0.5, np.float32)
    return feeds


@pytest.mark.parametrize("graph", [*GRAPH_NAMES, VAE_ENCODER, AUDIO_TOKENIZER, AUDIO_DETOKENIZER])
def test_graph_models_direct(server, tiny, graph):
    """Each graph model, called through its generated config at batch 2, equals ONNX Runtime on the graph.

    Also checks the ``[batch]`` reshape contract: ``timestep`` goes over the wire as [B, 1] and [B] is refused.
    """
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.backends.ort import OrtGraph

    artifacts = load_artifacts(tiny.artifacts)
    spec = artifacts.spec(graph)
    feeds = _random_feeds(spec, artifacts.config.vocab_size)
    expected = OrtGraph(artifacts.graph_path(graph), spec).run(feeds)

    def send(shape_of):
        tensors = []
        for t in spec.inputs:
            array = shape_of(t, feeds[t.name])
            tensor = http.InferInput(t.name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return client.infer(graph, tensors)

    client = http.InferenceServerClient(server.http_url)
    try:
        result = send(tc.wire_shape)
        for t in spec.outputs:
            assert np.max(np.abs(result.as_numpy(t.name).astype(np.float32) - expected[t.name])) <= 1e-5, t.name
        if any(tc.is_batch_only(t) for t in spec.inputs):
            with pytest.raises(InferenceServerException, match="unexpected shape"):
                send(lambda t, a: a)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_audio_equals_runtime(server, runtime, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    audio, rate = request_audio(url, protocol, seed=7, **REQUEST)
    expected = runtime(seed=7, show_progress=False, **REQUEST)
    assert rate == expected.sample_rate == 48000
    assert audio.dtype == np.float32 and audio.shape == expected.audios[0].shape == (2, 48000)
    assert np.max(np.abs(audio - expected.audios[0])) <= 1e-4


def _server_rss(server) -> int:
    """Resident bytes of tritonserver and its python-backend stubs (its process group)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == server.process.pid:  # field 5: process group
                total += int((stat.parent / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


BAD_KINDS = [  # (inputs, what the error must say)
    ([("prompt", "BYTES", np.array([b"piano"], dtype=object)),
      ("audio_duration", "FP32", np.array([-3.0], np.float32))], "audio_duration"),
    ([("prompt", "BYTES", np.array([b"piano"], dtype=object)),
      ("audio_duration", "FP32", np.array([100000.0], np.float32))], "600 s limit"),
    ([("prompt", "BYTES", np.array([b"  "], dtype=object))], "prompt"),
    ([("prompt", "BYTES", np.array([b"piano"], dtype=object)),
      ("num_inference_steps", "INT64", np.array([10**6], np.int64))], "num_inference_steps"),
    ([("prompt", "BYTES", np.array([b"piano"], dtype=object)), ("bpm", "INT64", np.array([-5], np.int64))], "bpm"),
    ([("prompt", "BYTES", np.array([b"\xff\xfe"], dtype=object))], "UTF-8"),
    ([("prompt", "BYTES", np.array([b"piano"], dtype=object)), ("seed", "INT64", np.array([-1], np.int64))], "seed"),
    ([("prompt", "BYTES", np.array([b"piano", b"two"], dtype=object))], "Expected [1]"),  # Triton refuses it
]


def test_concurrent_clients_with_bad_requests(server, runtime):
    """8 clients x 5 requests, HTTP and gRPC mixed, one in five bad (mixed kinds): every good one equals the
    runtime's audio (same seeds, no cross-talk), every bad one gets its own clear error, and the server's
    resident memory afterwards is within 10% of its value before."""
    from tritonclient.utils import InferenceServerException

    barrier = threading.Barrier(8)

    def warm(index: int):
        barrier.wait(timeout=60)
        return request_audio(server.http_url, "http", seed=1, timeout=300, **REQUEST)[0]

    with ThreadPoolExecutor(8) as pool:  # every model instance has seen these shapes before measuring
        [f.result(timeout=600) for f in [pool.submit(warm, i) for i in range(8)]]
    before = _server_rss(server)

    def client(index: int) -> list:
        protocol = "grpc" if index % 2 else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_url
        barrier.wait(timeout=60)
        results = []
        for k in range(5):
            if k == index % 5:
                inputs, needle = BAD_KINDS[index % len(BAD_KINDS)]
                try:
                    _raw_infer(server, inputs)
                    results.append(("unexpected success", needle))
                except InferenceServerException as exc:
                    results.append((exc.message(), needle))
            else:
                results.append(request_audio(url, protocol, seed=100 + (index + k) % 3, timeout=300, **REQUEST)[0])
        return results

    with ThreadPoolExecutor(8) as pool:
        results = [f.result(timeout=600) for f in [pool.submit(client, i) for i in range(8)]]
    after = _server_rss(server)
    reference = {s: runtime(seed=s, show_progress=False, **REQUEST).audios[0] for s in (100, 101, 102)}
    good = bad = 0
    for index, items in enumerate(results):
        for k, item in enumerate(items):
            if k == index % 5:
                message, needle = item
                assert needle in message and "Traceback" not in message, (index, message)
                bad += 1
            else:
                assert np.max(np.abs(item - reference[100 + (index + k) % 3])) <= 1e-4
                good += 1
    assert (good, bad) == (32, 8)
    assert server.alive()
    assert abs(after - before) <= 0.10 * before, (before, after)


def test_request_past_its_time_limit_stops(server):
    """A request with Triton's own timeout (microseconds) stops at its next graph call, long before its end."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from acestep_trt.runtime.triton.client import build_inputs

    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        started = time.perf_counter()
        with pytest.raises(InferenceServerException, match="time limit of 0.5 s"):
            client.infer("acestep", build_inputs(grpc, **{**REQUEST, "num_inference_steps": 1000}), timeout=500_000)
        assert time.perf_counter() - started < 10  # 1000 steps take far longer
    finally:
        client.close()


def test_request_that_outlives_its_client_stops(server):
    """A gRPC client that gives up (deadline) cancels the request; the orchestrator stops and logs it."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from acestep_trt.runtime.triton.client import build_inputs

    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="(?i)deadline"):
            client.infer("acestep", build_inputs(grpc, **{**REQUEST, "num_inference_steps": 1000}),
                         client_timeout=1.0)
    finally:
        client.close()
    deadline = time.monotonic() + 30
    while "cancelled by its client" not in server.log_tail(20000):
        assert time.monotonic() < deadline, server.log_tail(3000)
        time.sleep(0.2)
    audio, _ = request_audio(server.http_url, "http", seed=1, **REQUEST)  # and the server carries on
    assert audio.shape == (2, 48000)


def _raw_infer(server, inputs: list[tuple[str, str, np.ndarray]]):
    """Send exactly ``inputs`` (name, Triton datatype, array) over HTTP; return the result or raise."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        tensors = []
        for name, wire, array in inputs:
            tensor = http.InferInput(name, list(array.shape), wire)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return client.infer("acestep", tensors)
    finally:
        client.close()


BAD_REQUESTS = {
    "missing prompt": [("audio_duration", "FP32", np.array([1.0], np.float32))],
    "negative duration": [("prompt", "BYTES", np.array([b"piano"], dtype=object)),
                          ("audio_duration", "FP32", np.array([-3.0], np.float32))],
    "duration as text": [("prompt", "BYTES", np.array([b"piano"], dtype=object)),
                         ("audio_duration", "BYTES", np.array([b"ten"], dtype=object))],
    "prompt as number": [("prompt", "FP32", np.array([1.0], np.float32))],
    "empty prompt": [("prompt", "BYTES", np.array([b"  "], dtype=object))],
    "zero steps": [("prompt", "BYTES", np.array([b"piano"], dtype=object)),
                   ("num_inference_steps", "INT64", np.array([0], np.int64))],
}


SRC = (0.3 * np.sin(np.linspace(0, 900, 2 * 9 * 1920 + 1234))).reshape(2, -1).astype(np.float32)  # 9 frames
_PIANO = ("prompt", "BYTES", np.array([b"piano"], dtype=object))
_REPAINT = ("task_type", "BYTES", np.array([b"repaint"], dtype=object))
BAD_REQUESTS.update({
    "three-channel src_audio": [_PIANO, _REPAINT, ("src_audio", "FP32", np.zeros((3, 4000), np.float32))],
    "NaN src_audio": [_PIANO, _REPAINT, ("src_audio", "FP32", np.full((2, 4000), np.nan, np.float32))],
    "src_audio as INT64": [_PIANO, _REPAINT, ("src_audio", "INT64", np.zeros((2, 4000), np.int64))],
})


@pytest.mark.parametrize("task", [
    dict(task_type="repaint", repainting_start=0.1, repainting_end=0.25),
    dict(task_type="cover", audio_cover_strength=0.6, complete_track_classes=None),
])
def test_task_request_equals_runtime(server, runtime, task):
    """Source audio through the server (VAE encoder, tokenizer graphs via BLS) equals the local runtime."""
    audio, _ = request_audio(server.http_url, "http", seed=3, prompt="piano", num_inference_steps=2,
                             src_audio=SRC, **{k: v for k, v in task.items() if v is not None})
    expected = runtime(prompt="piano", seed=3, num_inference_steps=2, src_audio=SRC, show_progress=False, **task)
    assert audio.shape == expected.audios[0].shape == (2, 9 * 1920)
    assert np.max(np.abs(audio - expected.audios[0])) <= 1e-4


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_error_and_server_keeps_serving(server, case):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        _raw_infer(server, BAD_REQUESTS[case])
    assert info.value.message()
    if case in ("negative duration", "empty prompt", "zero steps", "NaN src_audio"):  # refused with the fix
        assert "Fix:" in info.value.message()
    assert server.alive()
    audio, _ = request_audio(server.http_url, "http", seed=1, **REQUEST)
    assert audio.shape == (2, 48000) and np.isfinite(audio).all()


def test_client_raises_backend_error(server):
    with pytest.raises(BackendError, match="audio_duration"):
        request_audio(server.grpc_url, "grpc", prompt="piano", audio_duration=-1.0)


def test_cli_triton_client_writes_wav(server, runtime, tmp_path):
    import soundfile as sf

    out = tmp_path / "song.wav"
    result = CliRunner().invoke(main, ["triton-client", "--url", server.grpc_url, "--protocol", "grpc",
                                       "--prompt", REQUEST["prompt"], "--duration", "1", "--steps", "4",
                                       "--seed", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data, rate = sf.read(out, dtype="float32")
    assert rate == 48000 and data.shape == (48000, 2)
    refused = CliRunner().invoke(main, ["triton-client", "--url", server.http_url, "--prompt", "x",
                                        "--duration", "-2", "--out", str(tmp_path / "bad.wav")])
    assert refused.exit_code == BackendError.exit_code and not (tmp_path / "bad.wav").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_example_client_script(server, runtime, protocol, tmp_path):
    """scripts/triton_client_example.py (tritonclient only) writes the runtime's audio as 16-bit PCM."""
    import subprocess

    import soundfile as sf

    url = server.http_url if protocol == "http" else server.grpc_url
    out = tmp_path / f"{protocol}.wav"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "triton_client_example.py"), "--url", url, "--protocol",
           protocol, "--prompt", "warm jazz trio", "--duration", "1", "--seed", "3", "--steps", "4", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data, rate = sf.read(out, dtype="float32")
    expected = runtime(prompt="warm jazz trio", audio_duration=1.0, seed=3, num_inference_steps=4,
                       show_progress=False).audios[0]
    assert rate == 48000 and np.max(np.abs(data.T - expected)) <= 1.5 / 32767  # 16-bit quantisation
    bad = subprocess.run(cmd[:-2] + ["--duration", "-1", "--out", str(tmp_path / "bad.wav")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "audio_duration" in bad.stderr and not (tmp_path / "bad.wav").exists()
