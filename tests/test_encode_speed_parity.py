"""The fast inference paths of embeddings.encode (``precision="fast"`` and ``"bf16"``, one of which
``"auto"``, the default, stands for)
against the fp32 reference: parity per vector, the fused EfficientNet and its chunks, the oneDNN
matrix products, order restoration of length-sorted batches, batches on worker threads,
determinism. Throughput itself is measured by ``python -m embeddings.bench``, never in tests."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from common.cli import UserError, parse_config
from data.text import normalize_query
from embeddings.backbones import (LITE0_MEAN, LITE0_STD, ConvTokenEncoder, EfficientNetLite0, FusedConvBN,
                                  FusedEfficientNetLite0, InferenceLinear, TextTransformer, linear_pointwise_available,
                                  load_tokenizer, minilm_path, pad_same)
from embeddings.config import DashCLIPConfig, TableExportConfig
from embeddings.encode import DashEncoder, EncodeCommandConfig
from embeddings.inputs import ImageSpec, length_sorted_batches
from embeddings.models import TINY_TEXT, DashCLIP, build_dashclip
from embeddings.runtime import cpu_bf16_instructions, resolve_precision

PARITY = 0.999  # the contract: cosine of every fast or bf16 vector with its fp32 vector
FAST_PRECISIONS = ("fast", "bf16")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: small batches on a shared 2-core machine run faster and steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise_batchnorm(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so folding them is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                module.weight.copy_(1 + 0.1 * torch.randn(n, generator=gen))
                module.bias.copy_(0.1 * torch.randn(n, generator=gen))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(minilm_path())


@pytest.fixture(scope="module")
def tiny_cnn(tokenizer):
    """A small DashCLIP with the EfficientNet-Lite0 image encoder (random weights) and the tiny text
    encoder: the fused CNN path in seconds (64 px; the catalog's 96 px images are resized)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EfficientNetLite0()
        _randomise_batchnorm(net, 0)
        image = ConvTokenEncoder(net, width=64)
        model = DashCLIP(image, TextTransformer(replace(TINY_TEXT, cross_attention_width=64)), embed_dim=32)
    return model.eval(), tokenizer, ImageSpec(64, LITE0_MEAN, LITE0_STD)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, spec = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32))
    return model.eval(), tokenizer, spec


@pytest.fixture(scope="module")
def catalog(tiny_workdir):
    """32 products of the tiny catalog, two of them without an image (mixed batches)."""
    frame = pq.read_table(tiny_workdir / "data" / "catalog.parquet").to_pandas().iloc[:32].copy()
    frame.loc[frame.index[[3, 30]], "image"] = None
    return frame.reset_index(drop=True)


@pytest.fixture(scope="module")
def queries(tiny_workdir):
    relevance = pq.read_table(tiny_workdir / "data" / "relevance.parquet", columns=["query"]).column(0).to_pylist()
    return sorted({normalize_query(q) for q in relevance})[:48]


def _encoders(model, tokenizer, spec, batch_size: int = 16, workers: int = 0) -> dict[str, DashEncoder]:
    cfg = DashCLIPConfig(image_size=spec.size)
    return {p: DashEncoder(model, tokenizer, spec, cfg, torch.device("cpu"), "test", batch_size, p, workers)
            for p in ("fp32", *FAST_PRECISIONS)}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


@pytest.mark.parametrize("precision", FAST_PRECISIONS)
@pytest.mark.parametrize("which", ["tiny", "tiny_cnn"])
def test_fast_vectors_match_fp32_per_vector(which, precision, request, catalog, queries):
    model, tokenizer, spec = request.getfixturevalue(which)
    encoders = _encoders(model, tokenizer, spec)
    if which == "tiny_cnn":
        assert isinstance(encoders[precision].net.image_encoder.backbone, FusedEfficientNetLite0)
    for kind, run in (("products", lambda e: e.products(catalog)), ("images", lambda e: e.images(catalog)),
                      ("texts", lambda e: e.texts(catalog["title"])), ("queries", lambda e: e.queries(queries))):
        reference, fast = run(encoders["fp32"]), run(encoders[precision])
        assert reference.shape == fast.shape and fast.dtype == np.float32
        if kind == "images":  # products without an image: zero rows on both paths
            has = catalog["image"].notna().to_numpy()
            assert not fast[~has].any() and not reference[~has].any()
            reference, fast = reference[has], fast[has]
        assert _min_cosine(reference, fast) >= PARITY, kind
        if precision == "fast":
            np.testing.assert_allclose(fast, reference, atol=1e-4)  # in fact much closer than the contract
        else:
            assert not np.array_equal(fast, reference)  # bf16 products really ran


def test_fused_efficientnet_is_the_eval_mode_network():
    net = EfficientNetLite0()
    _randomise_batchnorm(net, 1)
    net.eval()
    fused = FusedEfficientNetLite0(net)
    gen = torch.Generator().manual_seed(0)
    for size in (64, 71):  # even sides (pads only after) and odd ones (pads on both sides)
        pixels = torch.randn(2, 3, size, size, generator=gen)
        with torch.inference_mode():
            expected, got = net(pixels), fused(pixels)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # no_grad (not inference mode) and grad mode (the plain conv2d path) agree too
        torch.testing.assert_close(fused(pixels), net(pixels), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused(pixels).detach(), net(pixels).detach(), atol=1e-4, rtol=1e-4)


def test_fused_efficientnet_runs_a_batch_in_chunks_and_in_bf16():
    """A batch larger than ``chunk`` runs chunk by chunk: the same features as one pass; bf16 is close
    (cosine per image) and returns float32."""
    net = EfficientNetLite0()
    _randomise_batchnorm(net, 4)
    net.eval()
    pixels = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    whole, chunked = FusedEfficientNetLite0(net, chunk=64), FusedEfficientNetLite0(net, chunk=3)
    half = FusedEfficientNetLite0(net, torch.bfloat16, chunk=3)
    with torch.inference_mode():
        expected = net(pixels)
        torch.testing.assert_close(chunked(pixels), whole(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked(pixels), expected, atol=1e-4, rtol=1e-4)
        got = half(pixels)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert F.cosine_similarity(got.flatten(1), expected.flatten(1)).min() >= PARITY
    with pytest.raises(ValueError, match="chunk"):
        FusedEfficientNetLite0(net, chunk=0)


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_inference_linear_is_f_linear(activation):
    """oneDNN's product (fp32: to float rounding; bf16: to bf16 rounding), the fused GELU and residual,
    the plain path off inference; the weights stay out of the state dict."""
    assert linear_pointwise_available()  # the CPU build has oneDNN: the fast path is what is tested
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    x, residual = torch.randn(3, 5, 48, generator=gen), torch.randn(3, 5, 40, generator=gen)
    act = F.gelu if activation == "gelu" else (lambda t: t)
    expected = act(linear(x)).detach()
    fused = InferenceLinear.of(linear, activation=activation)
    half = InferenceLinear.of(linear, activation=activation, dtype=torch.bfloat16, out_dtype=torch.float32)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(x, residual), expected + residual, atol=1e-5, rtol=1e-5)
        got = half(x)
        assert got.dtype == torch.float32
        assert F.cosine_similarity(got.flatten(1), expected.flatten(1)).min() >= PARITY
        torch.testing.assert_close(half(x, residual), got + residual)
        assert half(x.bfloat16()).dtype == torch.float32
    with torch.no_grad():  # plain F.linear path under autograd settings too
        torch.set_grad_enabled(True)
        try:
            torch.testing.assert_close(fused(x).detach(), expected, atol=1e-5, rtol=1e-5)
        finally:
            torch.set_grad_enabled(False)
    assert not dict(fused.state_dict())  # non-persistent: a model's checkpoint is unchanged


def test_attention_without_padding_runs_without_a_mask_and_computes_the_same(tiny):
    """The inference copy drops an all-ones attention mask (a batch of equal lengths): the same states."""
    model, tokenizer, spec = tiny
    fast = model.inference_copy()
    assert fast.text_encoder.skip_full_mask and not model.text_encoder.skip_full_mask
    batch = tokenizer(["green tea", "rye bread"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool(mask.bool().all())
    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return original(*args, **kwargs)

    with torch.inference_mode():
        expected = model.text_encoder(ids, mask)
        F.scaled_dot_product_attention = spy
        try:
            got = fast.text_encoder(ids, mask)
        finally:
            F.scaled_dot_product_attention = original
    assert seen and all(m is None for m in seen)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,kernel", [(48, 3), (24, 5), (25, 5), (13, 3)])
def test_pad_free_strided_depthwise_convolution_equals_the_padded_one(size, kernel):
    """The extended-kernel form of TF "same" padding reads the same pixels with the same weights."""
    channels = 8
    conv = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(channels, channels, kernel, 2, 0, groups=channels,
                                                                     bias=False),
                               torch.nn.BatchNorm2d(channels, eps=1e-3), torch.nn.ReLU6())
    from embeddings.backbones import SamePad

    conv[0] = SamePad(kernel, 2)
    _randomise_batchnorm(conv, 2)
    conv.eval()
    block = FusedConvBN(conv)
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        padded = F.conv2d(pad_same(x, kernel, 2), block.weight, block.bias, 2, 0, 1, channels).clamp(0, 6)
        torch.testing.assert_close(block(x), padded, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=1e-5)


def test_length_sorted_batches_put_outputs_back_in_input_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=103)
    batches = length_sorted_batches(lengths, 16)
    assert [len(b) for b in batches] == [16] * 6 + [7]
    order = np.concatenate(batches)
    assert sorted(order.tolist()) == list(range(103))
    assert np.all(np.diff(lengths[order]) >= 0)  # similar lengths batch together
    ties = order[lengths[order] == lengths[order][0]]
    assert np.all(np.diff(ties) > 0)  # stable: equal lengths keep input order
    with pytest.raises(ValueError):
        length_sorted_batches(lengths, 0)


def test_encoder_outputs_follow_the_input_order(tiny_cnn, catalog, queries):
    """Batches are formed by length, but row i of the output is always input i."""
    encoder = _encoders(*tiny_cnn, batch_size=8)["fast"]
    forward, backward = encoder.queries(queries), encoder.queries(queries[::-1])
    np.testing.assert_allclose(backward[::-1], forward, atol=1e-5)
    for i in (0, 17, len(queries) - 1):  # each alone (no batch at all)
        np.testing.assert_allclose(encoder.queries([queries[i]])[0], forward[i], atol=1e-5)
    products = encoder.products(catalog)
    shuffled = np.random.default_rng(1).permutation(len(catalog))
    np.testing.assert_allclose(encoder.products(catalog.iloc[shuffled]), products[shuffled], atol=1e-5)
    np.testing.assert_allclose(encoder.products(catalog.iloc[[30]])[0], products[30], atol=1e-5)  # no image


@pytest.mark.parametrize("precision", FAST_PRECISIONS)
def test_fast_path_is_deterministic(precision, tiny_cnn, catalog, queries):
    first, second = _encoders(*tiny_cnn)[precision], _encoders(*tiny_cnn)[precision]
    assert first.products(catalog).tobytes() == second.products(catalog).tobytes() == first.products(catalog).tobytes()
    assert first.queries(queries).tobytes() == second.queries(queries).tobytes()


@pytest.mark.parametrize("precision", FAST_PRECISIONS)
def test_batches_on_worker_threads_give_the_bytes_of_one_thread(precision, tiny_cnn, catalog, queries):
    """Two threads as two workers (each batch single-threaded, batches at once) give byte-identical
    vectors run to run and the bytes of a one-thread run, a single batch too; the thread count is
    left as it was."""
    encoders = [_encoders(*tiny_cnn, batch_size=8, workers=w)[precision] for w in (0, 1)]
    torch.set_num_threads(2)
    try:
        assert encoders[0].workers_for(4) == (2, 1) and encoders[0].workers_for(1) == (1, 1)
        assert encoders[1].workers_for(4) == encoders[1].workers_for(1) == (1, 2)
    finally:
        torch.set_num_threads(1)
    runs = []
    for threads, encoder in ((2, encoders[0]), (2, encoders[0]), (1, encoders[1])):
        torch.set_num_threads(threads)
        try:
            runs.append((encoder.products(catalog).tobytes(), encoder.queries(queries * 3).tobytes(),
                         encoder.queries(queries[:5]).tobytes()))
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(1)
    assert runs[0] == runs[1] == runs[2]
    with pytest.raises(ValueError, match="workers"):
        DashEncoder(*tiny_cnn, DashCLIPConfig(), torch.device("cpu"), "test", workers=-1)


def test_inference_copy_shares_weights_and_leaves_the_model_alone(tiny_cnn):
    model = tiny_cnn[0]
    model.train()
    try:
        copy = model.inference_copy()
        assert model.training and not copy.training
        assert copy.text_proj.weight is model.text_proj.weight  # shared, not duplicated
        assert isinstance(model.image_encoder.backbone, EfficientNetLite0)
        assert not model.text_encoder.encoder.layer[0].attention.self.fused
        assert copy.text_encoder.encoder.layer[0].attention.self.fused
        assert copy.query_encoder.encoder.layer[0].attention.self.fused
        assert not any("kv_" in key for key in copy.state_dict())  # the fused projections are not saved
    finally:
        model.eval()


def test_precision_is_a_setting_of_encode_and_export(tiny):
    assert parse_config(EncodeCommandConfig, ["--precision", "fp32"]).precision == "fp32"
    assert parse_config(EncodeCommandConfig, []).precision == "auto"
    assert TableExportConfig().precision == "auto"
    with pytest.raises((UserError, SystemExit)):
        parse_config(EncodeCommandConfig, ["--precision", "int4"])
    model, tokenizer, spec = tiny
    with pytest.raises(ValueError, match="precision"):
        DashEncoder(model, tokenizer, spec, DashCLIPConfig(), torch.device("cpu"), "test", precision="fp16")


def test_auto_precision_is_bf16_where_the_cpu_has_bf16_instructions(tiny, monkeypatch):
    model, tokenizer, spec = tiny
    for has_bf16, expected in ((True, "bf16"), (False, "fast"), (None, "fast")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bool(has_bf16))
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        if has_bf16 is None:
            monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
        assert cpu_bf16_instructions() is has_bf16
        assert resolve_precision("auto", torch.device("cpu")) == expected
        encoder = DashEncoder(model, tokenizer, spec, DashCLIPConfig(), torch.device("cpu"), "test", precision="auto")
        assert encoder.precision == expected
    assert resolve_precision("auto", torch.device("cuda")) == "fast"  # bf16 autocast on CUDA
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_bench_compares_each_precision_with_fp32_in_one_run(tmp_path):
    """``embeddings.bench --inference-only``: the JSON has every precision's throughputs, the paired
    speed-up over fp32 and the parity cosines (the figures themselves are machine-dependent and not
    checked)."""
    import json

    from embeddings import bench

    bench.main(["--backbone", "tiny", "--inference-only", "--encode-products", "12", "--encode-queries", "20",
                "--encode-batch-size", "8", "--encode-rounds", "1", "--workdir", str(tmp_path)])
    recorded = json.loads((tmp_path / "embeddings" / "bench.json").read_text())
    (entry,) = recorded.values()
    comparison = entry["encoder"]
    assert comparison["n_products"] == 12 and comparison["n_queries"] == 20
    assert comparison["precisions"] == ["fp32", "fast", "bf16"] and all(comparison["deterministic"].values())
    assert comparison["workers"] >= 1 and comparison["threads_per_worker"] >= 1
    for kind in ("products", "queries"):
        for precision in comparison["precisions"]:
            result = comparison[kind][precision]
            assert result["per_s"] > 0 and result["speedup"] > 0 and result["cpu_ms_per_item"] > 0
            assert result["cos_min"] >= PARITY


def test_an_undecodable_image_on_a_worker_thread_names_its_product(tiny_cnn, catalog):
    """The error of a batch on a worker thread reaches the caller (the remaining batches are cancelled)."""
    broken = catalog.copy()
    broken.loc[broken.index[20], "image"] = b"not an image"
    encoder = _encoders(*tiny_cnn, batch_size=4)["fast"]
    torch.set_num_threads(2)
    try:
        assert encoder.workers_for(8) == (2, 1)
        with pytest.raises(ValueError, match=f"product_id {broken['product_id'].iloc[20]}"):
            encoder.products(broken)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
