"""The VAE's CPU speed work: folded Snake activations in the exported graphs, parallel windows in the runtime.

Audio parity with diffusers through these paths is covered by test_parity.py / test_tasks.py (the runtime
fixture decodes and encodes with parallel windows on the CPU); here: the pieces, exactly.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from acestep_trt.export.graphs.vae_blocks import FoldedSnake, fold_snakes
from acestep_trt.runtime.specs import VAE_DECODER, VAE_ENCODER
from acestep_trt.runtime.vae import (
    MIN_CORE_OVERLAPS,
    cpu_workers, decode_windowed, encode_windowed, window_cores, window_overlap,
)


@pytest.mark.parametrize("logscale", [True, False])
def test_folded_snake_is_bitwise_diffusers_snake(logscale):
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    torch.manual_seed(0)
    snake = Snake1d(24, logscale=logscale)
    with torch.no_grad():  # trained-like spread of alpha / beta (zeros at init would hide the folding)
        snake.alpha.copy_(torch.randn_like(snake.alpha) * (1.0 if logscale else 3.0))
        snake.beta.copy_(torch.randn_like(snake.beta) * (1.0 if logscale else 3.0))
    x = torch.randn(3, 24, 517) * 4
    with torch.no_grad():
        assert torch.equal(FoldedSnake(snake)(x), snake(x))


def test_fold_snakes_replaces_every_snake_of_the_vae(tiny):
    from diffusers import AutoencoderOobleck
    from diffusers.models.autoencoders.autoencoder_oobleck import Snake1d

    vae = AutoencoderOobleck.from_pretrained(tiny.checkpoint / "vae").eval()
    count = sum(isinstance(m, Snake1d) for m in vae.decoder.modules())
    from acestep_trt.export.graphs.vae_decoder import stripped_decoder

    folded = stripped_decoder(vae)
    assert not any(isinstance(m, Snake1d) for m in folded.modules())
    assert sum(isinstance(m, FoldedSnake) for m in folded.modules()) == count > 0
    assert fold_snakes(folded) == 0  # idempotent: nothing left to fold
    latents = torch.randn(2, vae.decoder.conv1.in_channels, 13)
    with torch.no_grad():
        assert torch.equal(folded(latents), vae.decoder(latents))  # weight norm removal is exact here too


@pytest.mark.parametrize("name", [VAE_DECODER, VAE_ENCODER])
def test_exported_vae_graphs_have_the_folded_snake(tiny, name):
    """Per activation one Sin and no Pow, Exp, Reciprocal or Reshape (diffusers' forward traced as is has all)."""
    graph = onnx.load(str(tiny.artifacts / f"{name}.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("Sin") > 0
    assert not {"Pow", "Exp", "Reciprocal", "Reshape"} & set(ops), sorted(set(ops))


@pytest.mark.parametrize("frames", [1, 2, 7, 40, 88, 131, 250, 251, 750, 2500])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_window_cores_cover_the_clip(frames, workers):
    window, overlap = 256, 11
    cores = window_cores(frames, window, overlap, workers)
    assert cores[0][0] == 0 and cores[-1][1] == frames
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))  # contiguous, no gap, no overlap
    assert all(end > start for start, end in cores)
    # fewer workers where a core would be shorter than MIN_CORE_OVERLAPS overlaps (mostly overlap work)
    used = min(workers, frames // (MIN_CORE_OVERLAPS * overlap))
    if used <= 1:  # unchanged: whole clip when it fits one window with its overlaps, else window-sized cores
        assert cores == ([(0, frames)] if frames <= window + 2 * overlap else
                         [(s, min(s + window, frames)) for s in range(0, frames, window)])
    else:
        sizes = [end - start for start, end in cores]
        assert max(sizes) <= -(-window // used)  # the windows in flight together hold about one window
        assert len(cores) >= used  # every worker used has a window


def test_cpu_workers():
    assert cpu_workers(3) == 3
    assert cpu_workers(None) >= 1


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_windowed_decode_equals_whole_decode(runtime, workers):
    runner = runtime.runners[VAE_DECODER]
    decode = lambda z: runner.run({"latents": z})["audio"]  # noqa: E731
    overlap = window_overlap(runtime.artifacts.vae_receptive_field)
    for frames in (2, 41, 140):  # 140: two or three windows at once (overlap 11)
        latents = np.random.default_rng(frames).standard_normal((2, 64, frames)).astype(np.float32)
        whole = decode(latents)
        for window in (8, 64):
            got = decode_windowed(decode, latents, 1920, window, overlap, workers)
            assert got.shape == whole.shape
            assert np.max(np.abs(got - whole)) < 1e-5, (frames, window, workers)


def test_parallel_windowed_encode_equals_serial(runtime):
    runner = runtime.runners[VAE_ENCODER]

    def encode(chunk):
        out = runner.run({"audio": chunk})
        return out["mean"], out["std"]

    overlap = window_overlap(runtime.artifacts.vae_encoder_receptive_field)
    audio = 0.3 * np.random.default_rng(0).standard_normal((1, 2, 110 * 1920 + 77)).astype(np.float32)
    serial = encode_windowed(encode, audio, 1920, 16, overlap)
    for workers in (2, 3):
        assert len(window_cores(110, 16, overlap, workers)) > 1  # really in parallel windows
        mean, std = encode_windowed(encode, audio, 1920, 16, overlap, workers)
        assert np.max(np.abs(mean - serial[0])) < 1e-5 and np.max(np.abs(std - serial[1])) < 1e-5


def test_cpu_runtime_runs_vae_windows_in_parallel(tiny):
    """On the CPU the VAE sessions are single-threaded and ``threads`` windows run at once; other graphs keep
    ``threads`` intra-op threads."""
    from acestep_trt.runtime import AceStepRuntime

    rt = AceStepRuntime.load(tiny.artifacts, threads=2)
    assert rt.vae_workers == {VAE_DECODER: 2, VAE_ENCODER: 2}
    assert rt.runners[VAE_DECODER]._threads == 1 and rt.runners["dit_step"]._threads == 2


# --------------------------------------------------------------------------- Snakes in NumPy (ort_snake.py)


def _whole_and_split(model, name):
    from acestep_trt.runtime.artifacts import load_artifacts
    from acestep_trt.runtime.backends.ort import OrtGraph
    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph

    artifacts = load_artifacts(model.artifacts)
    spec = {**artifacts.specs, **artifacts.audio_specs}[name]
    path = artifacts.graph_path(name)
    return OrtGraph(path, spec, "cpu", 1), SnakeSplitGraph.open(path, spec, 1)


@pytest.fixture(params=["compiled", "numpy"])
def vae_kernels(request, monkeypatch):
    """Runs a test with the compiled kernels (``_vae_kernels.c``: fused Snake, interleave) and with NumPy."""
    from acestep_trt.runtime.backends import ort_snake

    if request.param == "numpy":
        monkeypatch.setattr(ort_snake, "NATIVE", None)
    elif ort_snake.NATIVE is None:
        pytest.skip("the compiled VAE kernels are not built here (tested by test_fused_snake_is_built)")
    return request.param


def test_fused_snake_is_built():
    """On glibc x86-64 with GCC (CI, the README's machines) setup.py builds the kernel with a vectorised sin;
    a failed build would otherwise only show as a slower decode."""
    import platform
    import sysconfig

    from acestep_trt.runtime.backends import ort_snake

    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc"
            and "gcc" in (sysconfig.get_config_var("CC") or "")):
        pytest.skip("the fused kernel vectorises sin with GCC and glibc on x86-64 only")
    assert ort_snake.NATIVE is not None and ort_snake.NATIVE.VECTORISED


def test_compiled_interleave_rejects_what_it_cannot_compute():
    from acestep_trt.runtime.backends import ort_snake

    if ort_snake.NATIVE is None:
        pytest.skip("the compiled VAE kernels are not built here")
    a = np.zeros((1, 6, 10), np.float32)
    ort_snake.NATIVE.interleave(a, a, np.empty((1, 3, 40), np.float32), 4)
    with pytest.raises(ValueError, match="s even"):
        ort_snake.NATIVE.interleave(a, a, np.empty((1, 3, 30), np.float32), 3)
    with pytest.raises(ValueError, match="s even"):
        ort_snake.NATIVE.interleave(a, a, np.empty((1, 2, 40), np.float32), 4)
    with pytest.raises(ValueError, match="overlap"):
        big = np.zeros(240, np.float32)
        ort_snake.NATIVE.interleave(big[:60].reshape(1, 6, 10), a, big[:120].reshape(1, 3, 40), 4)


def test_fused_snake_rejects_what_it_cannot_compute():
    from acestep_trt.runtime.backends import ort_snake

    if ort_snake.NATIVE is None:
        pytest.skip("the fused Snake kernel is not built here")
    kernel = ort_snake.NATIVE.snake
    x, c = np.zeros((1, 3, 10), np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="float32"):
        kernel(x.astype(np.float64), c, c, np.empty((1, 3, 10)))
    with pytest.raises(TypeError, match="C-contiguous"):
        kernel(np.zeros((1, 10, 3), np.float32).transpose(0, 2, 1), c, c, x)
    with pytest.raises(ValueError, match="one value per channel"):
        kernel(x, c[:2], c, np.empty_like(x))
    with pytest.raises(ValueError, match="shifted"):
        flat = np.zeros(40, np.float32)
        kernel(flat[:30].reshape(1, 3, 10), c, c, flat[1:31].reshape(1, 3, 10))
    with pytest.raises(ValueError, match="together"):
        kernel(x, c, c, np.empty_like(x), residual=x)


def test_snake_kernel_matches_the_graph_formula_in_place_and_with_a_residual(vae_kernels):
    """NumPy: bitwise the graph's formula; the fused kernel: within sin's few ulp (glibc's vector sinf)."""
    from acestep_trt.runtime.backends import ort_snake
    from acestep_trt.runtime.backends.ort_snake import SNAKE_CHUNK, snake

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, SNAKE_CHUNK + 77)) * 3).astype(np.float32)  # rows longer than a chunk
    r = rng.standard_normal(x.shape).astype(np.float32)
    alpha, inv_beta = (rng.random(3) * 4).astype(np.float32), rng.random(3).astype(np.float32)

    def reference(y):
        s = np.sin(alpha[None, :, None] * y)
        return y + inv_beta[None, :, None] * (s * s)

    def close(got, want):
        if vae_kernels == "numpy" or not ort_snake.NATIVE.VECTORISED:
            np.testing.assert_array_equal(got, want)
        else:  # |d(y + b s^2)| <= 2 b |s| |ds|: a few float32 ulp of sin, scaled by inv_beta <= 1
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)

    scratch = np.empty(SNAKE_CHUNK, np.float32)
    out = np.empty_like(x)
    snake(x, alpha, inv_beta, out, scratch)
    close(out, reference(x))
    inplace = x.copy()
    snake(inplace, alpha, inv_beta, inplace, scratch)
    np.testing.assert_array_equal(inplace, out)
    a, res = x.copy(), r.copy()
    snake(a, alpha, inv_beta, res, scratch, residual=res, summed=a)  # both outputs over the inputs
    np.testing.assert_array_equal(a, x + r)
    close(res, reference(x + r))


def test_snake_step_with_a_broadcasting_residual(vae_kernels):
    """A residual add folded into a Snake that broadcasts (not Oobleck's) sums first, then runs the Snake."""
    from acestep_trt.runtime.backends.ort_snake import SNAKE_CHUNK, Snake

    rng = np.random.default_rng(1)
    a, r = rng.standard_normal((2, 3, 50)).astype(np.float32), rng.standard_normal((1, 3, 1)).astype(np.float32)
    alpha, inv_beta = rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)
    step = Snake("x", "y", alpha, inv_beta, a="a", residual="r")
    outs = [np.empty(shape, np.float32) for shape in step.shapes([a.shape, r.shape])]
    step.compute([a, r], outs, np.empty(SNAKE_CHUNK, np.float32))
    s = np.sin(alpha[None, :, None] * (a + r))
    np.testing.assert_array_equal(outs[0], a + r)
    np.testing.assert_allclose(outs[1], (a + r) + inv_beta[None, :, None] * (s * s), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("model", ["tiny", "wide"])  # wide: a decoder in the NCHWc layout too
@pytest.mark.parametrize("name", [VAE_DECODER, VAE_ENCODER])
def test_split_graph_equals_the_whole_graph(request, model, name, vae_kernels):
    """Every Snake leaves ONNX Runtime; the audio (latents) equal the whole graph's up to sin's last bits, at
    odd lengths and batch 2, call after call (recycled buffers), and from two threads at once. With the
    compiled kernels, every convolution whose channels are multiples of the NCHWc block runs blocked."""
    from concurrent.futures import ThreadPoolExecutor

    from acestep_trt.runtime.backends import ort_snake
    from acestep_trt.runtime.backends.ort_snake import Add, BlockedConv, Piece, Reorder, Snake, Upsample

    tiny = request.getfixturevalue(model)
    whole, split = _whole_and_split(tiny, name)
    graph = onnx.load(str(tiny.artifacts / f"{name}.onnx"), load_external_data=False).graph
    block = ort_snake.nchwc_block() if vae_kernels == "compiled" else 1
    assert split.block == block
    convs = [n for n in graph.node if n.op_type == "Conv"]
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    blockable = [n for n in convs if all(d % block == 0 for d in initializers[n.input[1]][:2])]
    blocked = [s for s in split._steps if isinstance(s, BlockedConv)]
    # the encoder's last convolution shares its piece with the posterior's split (not a piece of its own)
    assert len(blocked) == (len(blockable) - (name == VAE_ENCODER) if block > 1 else 0)
    if model == "wide" and block > 1:
        # all but the convolutions on 2 audio channels (the decoder's output, the encoder's input) and the
        # encoder's last one (in the posterior's piece)
        assert len(blocked) == len(convs) - (1 if name == VAE_DECODER else 2)
        assert all(s.block == block for s in split._steps if isinstance(s, (Snake, Upsample)))
        assert 0 < sum(isinstance(s, Reorder) for s in split._steps) <= 2  # into the layout and out, once each
    snakes = [s for s in split._steps if isinstance(s, Snake)]
    assert len(snakes) == [n.op_type for n in graph.node].count("Sin") > 0
    assert sum(s.residual is not None for s in snakes) > 0  # residual adds folded into the next Snake
    pieces = [s for s in split._steps if isinstance(s, Piece)]
    ops = {op for piece in pieces for op in piece.ops}
    assert ("Conv" in ops or blocked) and "Sin" not in ops, ops
    constants = {t.name for t in graph.initializer}
    residuals = [n for n in graph.node if n.op_type == "Add" and not set(n.input) & constants
                 and n.output[0] not in {s.y for s in snakes}]  # adds of two activations, not a Snake's own
    assert len(residuals) == sum(isinstance(s, Add) for s in split._steps) + sum(
        s.residual is not None for s in snakes) > 0  # every add of two activations is NumPy's
    assert all(isinstance(s, (Snake, Add, Piece, Upsample, BlockedConv, Reorder)) for s in split._steps)
    assert sum(isinstance(s, Upsample) for s in split._steps) == [n.op_type for n in graph.node].count(
        "ConvTranspose") and "ConvTranspose" not in ops  # every upsampling as two convolutions
    key, shapes = (("latents", [(2, 64, 13), (1, 64, 6)]) if name == VAE_DECODER else
                   ("audio", [(2, 2, 13 * 1920 + 301), (1, 2, 6 * 1920)]))
    # a longer then a shorter clip: the second's values live in views of the first's kept buffers
    feeds = [{key: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}
             for seed, shape in enumerate(shapes)]
    expected = [whole.run(f) for f in feeds]
    first = split.run(feeds[0])
    for _ in range(2):  # output shapes inferred once per input shape; buffers bound and recycled
        for feed, want in zip(feeds, expected):
            got = split.run(feed)
            for out, value in want.items():
                np.testing.assert_allclose(got[out], value, rtol=0, atol=1e-5 * np.max(np.abs(value)))
    for out, value in expected[0].items():  # a returned array is never a recycled buffer of a later call
        np.testing.assert_allclose(first[out], value, rtol=0, atol=1e-5 * np.max(np.abs(value)))
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(split.run, feeds * 2))
    for result, want in zip(got, expected * 2):
        for out, value in want.items():
            np.testing.assert_allclose(result[out], value, rtol=0, atol=1e-5 * np.max(np.abs(value)))
    held = split.held_bytes  # kept between runs: one set per run that was in flight at once, no more
    assert 0 < held and len(split._idle) <= 2
    split.run(feeds[1])
    assert split.held_bytes == held  # a shorter clip fits in what is kept
    split.release_buffers()
    assert split.held_bytes == 0


def _compiled_or_skip():
    from acestep_trt.runtime.backends import ort_snake

    if ort_snake.NATIVE is None:
        pytest.skip("the compiled VAE kernels are not built here")
    return ort_snake.NATIVE


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW [B, C, T] -> NCHWc [B, C, 1, T] (memory [B, C/block, T, block]), in NumPy."""
    b, c, t = x.shape
    return np.ascontiguousarray(x.reshape(b, c // block, block, t).transpose(0, 1, 3, 2)).reshape(b, c, 1, t)


@pytest.mark.parametrize("block", [8, 16])
def test_blocked_kernels_equal_nchw_ones(block):
    """Reorder both ways, Snake (with and without residual) and the upsampling's interleave in the NCHWc
    layout give the NCHW results in blocked memory, at a length that is not a multiple of the runs."""
    kernels = _compiled_or_skip()
    rng = np.random.default_rng(block)
    x = (rng.standard_normal((2, 2 * block, 777)) * 3).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    xb = np.empty((2, 2 * block, 1, 777), np.float32)
    kernels.reorder(x, xb, block, True)
    np.testing.assert_array_equal(xb, _blocked(x, block))
    back = np.empty_like(x)
    kernels.reorder(xb, back, block, False)
    np.testing.assert_array_equal(back, x)
    alpha, inv_beta = (rng.random(2 * block) * 4).astype(np.float32), rng.random(2 * block).astype(np.float32)
    want, got = np.empty_like(x), np.empty_like(xb)
    kernels.snake(x, alpha, inv_beta, want)
    kernels.snake(xb, alpha, inv_beta, got, block=block)
    # a block of 8 runs the 8-wide vector sinf, NCHW rows the 16-wide one: their last bits differ
    np.testing.assert_allclose(got, _blocked(want, block), rtol=2e-6, atol=2e-6)
    summed, got_sum = np.empty_like(x), np.empty_like(xb)
    kernels.snake(x, alpha, inv_beta, want, r, summed)
    kernels.snake(xb, alpha, inv_beta, got, _blocked(r, block), got_sum, block=block)
    np.testing.assert_allclose(got, _blocked(want, block), rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(got_sum, _blocked(summed, block))
    stride, cout = 6, block
    a = rng.standard_normal((2, cout * stride // 2, 777)).astype(np.float32)
    b = rng.standard_normal(a.shape).astype(np.float32)
    want = np.empty((2, cout, 777 * stride), np.float32)
    kernels.interleave(a, b, want, stride)
    got = np.empty((2, cout, 1, 777 * stride), np.float32)
    kernels.interleave(_blocked(a, block), _blocked(b, block), got, stride, block)
    np.testing.assert_array_equal(got, _blocked(want, block))
    with pytest.raises(ValueError, match="multiple of block"):
        kernels.reorder(x[:, :block - 1].copy(), np.empty((2, block - 1, 1, 777), np.float32), block, True)


def test_nchwc_probe_checks_the_filter_layout(monkeypatch):
    """The block comes from ONNX Runtime's own NCHWc rewrite of a probe convolution (16 on AVX-512 CPUs); a
    filter layout of ours that does not match what ONNX Runtime writes turns the blocked layout off."""
    from acestep_trt.runtime.backends import ort_snake

    block = ort_snake.nchwc_block()
    assert block in (1, 8, 16)
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    if " avx512f" in flags:
        assert block == 16
    monkeypatch.setattr(ort_snake, "blocked_filter", lambda weight, block: weight.reshape(*weight.shape[:2], 1, -1))
    ort_snake.nchwc_block.cache_clear()
    try:
        assert ort_snake.nchwc_block() == 1
    finally:
        ort_snake.nchwc_block.cache_clear()


@pytest.mark.parametrize("stride", [2, 4, 6, 10])  # the Oobleck decoder's upsampling ratios
@pytest.mark.parametrize("length", [37, 2100])  # odd; over two of the compiled interleave's blocks
def test_upsample_as_two_convolutions_equals_conv_transpose(stride, length, vae_kernels):
    """Oobleck's ConvTranspose1d (kernel 2s, padding s/2) as the two phase convolutions of ``Upsample``
    (torch runs them here), interleaved, at odd lengths and batch 2."""
    from acestep_trt.runtime.backends.ort_snake import Upsample, upsample_weights

    torch.manual_seed(stride)
    conv = torch.nn.ConvTranspose1d(6, 5, 2 * stride, stride, padding=stride // 2)
    x = torch.randn(2, 6, length)
    weight, bias = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    wa, wb, shared = upsample_weights(weight, bias, stride)
    with torch.no_grad():
        want = conv(x).numpy()
        a = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (1, 0)), torch.from_numpy(wa),
                                       torch.from_numpy(shared)).numpy()
        b = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (0, 1)), torch.from_numpy(wb),
                                       torch.from_numpy(shared)).numpy()
    step = Upsample(None, "x", "y", stride, 5)
    out = np.empty(step.output_shape(x.shape), np.float32)
    assert a.shape == b.shape == step.halves_shape(x.shape) and out.shape == want.shape
    step.interleave(a, b, out)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


def test_only_plain_upsampling_leaves_conv_transpose():
    """Strides, paddings, groups or dilations other than Oobleck's keep ONNX Runtime's ConvTranspose."""
    from onnx import helper

    from acestep_trt.runtime.backends.ort_snake import _upsample_stride

    dims = {"w": [4, 3, 8], "b": [3], "w6": [4, 3, 6]}
    node = lambda inputs=("x", "w", "b"), **kw: helper.make_node("ConvTranspose", list(inputs), ["y"], **kw)  # noqa
    assert _upsample_stride(node(strides=[4], pads=[2, 2]), dims) == 4
    assert _upsample_stride(node(("x", "w"), strides=[4], pads=[2, 2], kernel_shape=[8]), dims) == 4
    for bad in (node(strides=[4], pads=[1, 1]), node(strides=[4], pads=[2, 2], group=2),
                node(strides=[4], pads=[2, 2], dilations=[2]), node(strides=[4], pads=[2, 2], output_padding=[1]),
                node(("x", "w6"), strides=[3], pads=[1, 1]), node(("x", "w", "c"), strides=[4], pads=[2, 2]),
                helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[4], pads=[2, 2])):
        assert _upsample_stride(bad, dims) is None


def test_split_graph_without_shape_inference_lets_onnx_runtime_allocate(tiny, monkeypatch):
    """Where shape inference cannot tell a piece's output shapes, the piece runs unbound once and its
    outputs are copied (the shapes then known); the result is the same."""
    from acestep_trt.runtime.backends.ort_snake import Piece

    whole, split = _whole_and_split(tiny, VAE_DECODER)
    monkeypatch.setattr(Piece, "output_shapes", lambda self, shapes: None)
    feed = {"latents": np.random.default_rng(5).standard_normal((1, 64, 9)).astype(np.float32)}
    want = whole.run(feed)["audio"]
    for _ in range(2):
        np.testing.assert_allclose(split.run(feed)["audio"], want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
    assert all(shapes for shapes in split._shapes.values())


def test_graph_without_folded_snakes_runs_whole(tmp_path):
    """A Sin that is not a folded Snake (here: its square feeds two nodes) stays in ONNX Runtime; a graph with
    none is not split at all."""
    from onnx import TensorProto, helper, numpy_helper

    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph, find_snakes
    from acestep_trt.runtime.specs import GraphSpec, TensorSpec, Tolerance

    alpha = numpy_helper.from_array(np.ones((1, 4, 1), np.float32), "alpha")
    beta = numpy_helper.from_array(np.ones((1, 4, 1), np.float32), "inv_beta")
    nodes = [helper.make_node("Mul", ["alpha", "x"], ["ax"]), helper.make_node("Sin", ["ax"], ["s"]),
             helper.make_node("Mul", ["s", "s"], ["s2"]), helper.make_node("Mul", ["inv_beta", "s2"], ["b"]),
             helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Add", ["y", "s2"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "t"])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, "t"])], [alpha, beta])
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
    constants = {"alpha": np.ones((1, 4, 1), np.float32), "inv_beta": np.ones((1, 4, 1), np.float32)}
    assert find_snakes(graph, constants.get) == []  # s2 is read twice: not a Snake
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    spec = GraphSpec("g", (TensorSpec("x", "float32", (1, 4, "t")),), (TensorSpec("z", "float32", (1, 4, "t")),),
                     Tolerance(1e-5, 1e-5))
    assert SnakeSplitGraph.open(path, spec) is None


def test_runtime_split_graphs_choice(tiny):
    """The CPU runtime splits the VAE graphs and the condition encoder by default; ``split_graphs=False`` runs
    every graph file whole; the audio agrees."""
    from acestep_trt.runtime import AceStepRuntime
    from acestep_trt.runtime.backends.ort import DeferredGraph, OrtGraph
    from acestep_trt.runtime.backends.ort_memo import MemoizedInputGraph
    from acestep_trt.runtime.backends.ort_snake import SnakeSplitGraph

    fast, plain = AceStepRuntime.load(tiny.artifacts), AceStepRuntime.load(tiny.artifacts, split_graphs=False)

    def opened(runtime, name):  # the graph's runner, opened if it is opened at first use (the VAE encoder)
        runner = runtime.runners[name]._runner
        return runner._open() if isinstance(runner, DeferredGraph) else runner

    for name in (VAE_DECODER, VAE_ENCODER):
        assert isinstance(opened(fast, name), SnakeSplitGraph)
        assert isinstance(opened(plain, name), OrtGraph)
    assert isinstance(fast.runners["condition_encoder"]._runner, MemoizedInputGraph)
    assert all(isinstance(opened(plain, n), OrtGraph) for n in plain.runners if n not in ("audio_tokenizer",
                                                                                          "audio_detokenizer"))
    kwargs = dict(prompt="lo-fi piano", audio_duration=2.3, seed=3, show_progress=False)
    a, b = fast(**kwargs).audios, plain(**kwargs).audios
    assert np.max(np.abs(a - b)) < 1e-5
