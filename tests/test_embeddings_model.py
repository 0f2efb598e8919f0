"""DashCLIP encoders: shapes, shared plain/grounded weights, freezing, and the real pretrained weights
(MiniLM-L6, EfficientNet-Lite0, a BLIP checkpoint directory) loading exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from embeddings.backbones import efficientnet_lite0_weights_path, load_efficientnet_lite0, minilm_path
from embeddings.config import DashCLIPConfig
from embeddings.inputs import ImageSpec, TokenStore, decode_image
from embeddings.models import DashCLIP, build_dashclip

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer, spec = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, freeze_fraction=0.5,
                                                     cross_attention="plain"))
    return model, tokenizer, spec


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_tiny_shapes_and_unit_norm(tiny):
    model, tokenizer, spec = tiny
    model.eval()
    ids, mask = _batch(tokenizer, ["red apple juice", "crunchy peanut butter 12 oz", "soda"])
    pixels = torch.randn(3, 3, spec.size, spec.size)
    with torch.no_grad():
        tokens = model.image_tokens(pixels)
        assert tokens.shape == (3, 1 + (32 // 16) ** 2, 64)
        for emb in (model.image_embedding(tokens), model.text_embedding(ids, mask), model.query_embedding(ids, mask)):
            assert emb.shape == (3, 256)
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
        assert model.itm_logits(ids, mask, tokens).shape == (3, 2)
        # a mixed batch: rows 0 and 2 have images, row 1 does not
        has_image = torch.tensor([True, False, True])
        states = model.product_state(ids, mask, pixels[has_image], has_image)
        assert states.shape == (3, 64)
        torch.testing.assert_close(states[1], model.text_state(ids[1:2], mask[1:2])[0])  # text-only row = plain mode
        torch.testing.assert_close(states[2], model.text_state(ids[2:3], mask[2:3], tokens[2:3])[0], atol=1e-5, rtol=1e-5)


def test_cls_pooling_updates_only_cls_in_the_last_layer_like_the_full_pass(tiny):
    model, tokenizer, spec = tiny
    model.eval()
    ids, mask = _batch(tokenizer, ["green tea", "dark chocolate bar with sea salt"])
    tokens = model.image_tokens(torch.randn(2, 3, spec.size, spec.size))
    with torch.no_grad():
        for image_tokens in (None, tokens):
            torch.testing.assert_close(model.text_encoder.pooled(ids, mask, image_tokens),
                                       model.text_encoder(ids, mask, image_tokens)[:, 0], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_the_encoding(tiny):
    model, tokenizer, _ = tiny
    model.eval()
    short = tokenizer(["soda"], return_tensors="pt")
    ids, mask = TokenStore(tokenizer, ["soda", "a much longer product title"], 32).batch([0, 1])
    assert mask[0].sum() == short["input_ids"].shape[1] < ids.shape[1]
    with torch.no_grad():
        alone = model.text_embedding(short["input_ids"], short["attention_mask"])
        padded = model.text_embedding(ids, mask)[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_grounded_and_plain_modes_share_weights(tiny):
    model, tokenizer, spec = tiny
    model.eval()
    ids, mask = _batch(tokenizer, ["green tea", "dark chocolate bar"])
    tokens = model.image_tokens(torch.randn(2, 3, spec.size, spec.size)).detach()
    text = model.text_encoder
    names = {n for n, _ in text.named_parameters()}
    assert any(".crossattention." in n for n in names)
    # one set of self-attention / feed-forward weights serves both modes
    assert not any(n.startswith("grounded") for n in names)

    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))  # (a plain sum would cancel in LayerNorm)

    def grads(image_tokens):
        model.zero_grad(set_to_none=True)
        (model.text_state(ids, mask, image_tokens) @ direction).sum().backward()
        return {n for n, p in text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    plain, grounded = grads(None), grads(tokens)
    assert plain and not any(".crossattention." in n for n in plain)
    assert plain <= grounded  # the grounded mode uses every weight of the plain mode ...
    assert any(".crossattention." in n for n in grounded)  # ... plus the cross-attention
    with torch.no_grad():
        assert not torch.allclose(model.text_state(ids, mask), model.text_state(ids, mask, tokens))


def test_gated_cross_attention_starts_as_the_plain_encoder_and_learns_to_open():
    model, tokenizer, spec = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, cross_attention="gated"))
    model.eval()
    ids, mask = _batch(tokenizer, ["green tea", "dark chocolate bar"])
    tokens = model.image_tokens(torch.randn(2, 3, spec.size, spec.size)).detach()
    gates = [layer.cross_gate for layer in model.text_encoder.encoder.layer]
    assert all(float(gate) == 0.0 for gate in gates) and all(gate.requires_grad for gate in gates)
    torch.testing.assert_close(model.text_state(ids, mask, tokens), model.text_state(ids, mask))
    model.zero_grad(set_to_none=True)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    (model.text_state(ids, mask, tokens) @ direction).sum().backward()
    assert all(gate.grad is not None and gate.grad.abs().item() > 0 for gate in gates)  # the image path can open
    with torch.no_grad():
        gates[-1].fill_(0.5)
        assert not torch.allclose(model.text_state(ids, mask, tokens), model.text_state(ids, mask))
        gates[-1].zero_()


def test_mean_pooling_is_the_masked_token_mean():
    model, tokenizer, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, pooling="mean"))
    model.eval()
    ids, mask = _batch(tokenizer, ["soda", "a much longer product title"])
    with torch.no_grad():
        states = model.text_encoder(ids, mask)
        expected = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(model.text_state(ids, mask), expected, atol=1e-6, rtol=1e-5)
        # the query path through the frozen prefix pools the same way
        prefix = model.query_prefix_states(ids, mask)
        torch.testing.assert_close(model.query_embedding_from_prefix(prefix, mask), model.query_embedding(ids, mask),
                                   atol=1e-5, rtol=1e-5)


def test_untuned_title_projection_is_semi_orthogonal(tiny):
    model, _, _ = tiny
    weight = model.text_proj.weight.detach()  # [d, width], d > width for tiny: orthonormal columns
    gram = weight.T @ weight if weight.shape[0] >= weight.shape[1] else weight @ weight.T
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
    assert not model.text_proj.bias.detach().any()


def test_frozen_first_layers_get_no_gradients(tiny):
    model, tokenizer, spec = tiny
    model.train()
    ids, mask = _batch(tokenizer, ["green tea", "dark chocolate bar"])
    model.zero_grad(set_to_none=True)
    tokens = model.image_tokens(torch.randn(2, 3, spec.size, spec.size))
    direction = torch.randn(256, generator=torch.Generator().manual_seed(0))
    loss = (model.image_embedding(tokens) @ direction).sum() + (model.text_embedding(ids, mask) @ direction).sum() \
        + model.itm_logits(ids, mask, tokens)[:, 1].sum() + (model.query_embedding(ids, mask) @ direction).sum()
    loss.backward()
    frozen_prefixes = ("text_encoder.embeddings.", "text_encoder.encoder.layer.0.", "query_encoder.embeddings.",
                       "query_encoder.encoder.layer.0.", "image_encoder.embeddings.", "image_encoder.encoder.layers.0.")
    for name, param in model.named_parameters():
        if ".crossattention." in name:  # new (random) cross-attention always trains, frozen layer or not
            assert param.requires_grad and param.grad is not None, name
        elif name.startswith(frozen_prefixes):
            assert not param.requires_grad and param.grad is None, name
        elif name.startswith(("text_encoder.encoder.layer.1.attention", "image_encoder.encoder.layers.1.",
                              "query_encoder.encoder.layer.1.")):
            assert param.grad is not None, name
    stage1, stage2 = model.stage_parameter_groups(1), model.stage_parameter_groups(2)
    trainable1 = {id(p) for g in stage1.values() for p in g}
    trainable2 = {id(p) for g in stage2.values() for p in g}
    assert trainable1 & trainable2 == {id(p) for p in model.multimodal_proj.parameters()}  # trained in both
    assert id(model.text_proj.weight) in trainable1 and id(model.query_proj.weight) in trainable2
    assert all(id(p) not in trainable2 for p in model.text_encoder.parameters())  # product encoders frozen in stage 2


def test_query_encoder_is_a_separate_copy_of_the_text_encoder(tiny):
    model, tokenizer, _ = tiny
    model.eval()
    ids, mask = _batch(tokenizer, ["oat milk"])
    with torch.no_grad():
        torch.testing.assert_close(model.query_embedding(ids, mask), model.text_embedding(ids, mask))
        assert model.query_encoder.embeddings.word_embeddings.weight.data_ptr() != \
            model.text_encoder.embeddings.word_embeddings.weight.data_ptr()
        assert not any(".crossattention." in n for n, _ in model.query_encoder.named_parameters())


def test_query_embedding_from_cached_frozen_states_matches_the_full_pass(tiny):
    model, tokenizer, _ = tiny
    model.eval()
    assert model.frozen_layers["query_encoder"] == 1
    ids, mask = _batch(tokenizer, ["oat milk", "gluten free pasta family size", "tea"])
    with torch.no_grad():
        prefix = model.query_prefix_states(ids, mask)
        torch.testing.assert_close(model.query_embedding_from_prefix(prefix, mask), model.query_embedding(ids, mask))


def test_inference_copy_fuses_attention_projections_and_computes_the_same(tiny):
    """One matrix product for query/key/value (self-attention) and key/value (cross-attention):
    the same encodings, in plain, grounded and [CLS]-only mode; the model itself is untouched."""
    model, tokenizer, spec = tiny
    model.eval()
    fast = model.inference_copy()
    ids, mask = _batch(tokenizer, ["oat milk", "gluten free pasta family size", "tea"])
    has_image = torch.tensor([True, False, True])
    pixels = torch.randn(2, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = model.image_tokens(pixels)
        for image_tokens in (None, tokens[[0, 0, 1]]):
            torch.testing.assert_close(fast.text_encoder(ids, mask, image_tokens),
                                       model.text_encoder(ids, mask, image_tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.product_state(ids, mask, pixels, has_image),
                                   model.product_state(ids, mask, pixels, has_image), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.query_embedding(ids, mask), model.query_embedding(ids, mask),
                                   atol=1e-5, rtol=1e-5)
    attention = fast.text_encoder.encoder.layer[0]
    assert attention.attention.self.fused and attention.crossattention.self.fused
    assert attention.attention.self.qkv_proj.weight.shape == (3 * 64, 64)
    assert not hasattr(attention.crossattention.self, "qkv_proj")  # its keys/values come from image tokens
    assert not model.text_encoder.encoder.layer[0].attention.self.fused


def test_product_state_runs_each_row_in_one_mode_only(tiny):
    """Rows with an image run the grounded mode only, rows without one the plain mode only."""
    model, tokenizer, spec = tiny
    model.eval()
    ids, mask = _batch(tokenizer, ["oat milk", "tea", "rye bread"])
    calls = []
    original = model.text_encoder.pooled
    model.text_encoder.pooled = lambda i, m, t=None, *a: calls.append((len(i), t is not None)) or original(i, m, t, *a)
    try:
        with torch.no_grad():
            for has_image, expected in (([True, False, True], [(1, False), (2, True)]), ([True] * 3, [(3, True)]),
                                        ([False] * 3, [(3, False)])):
                calls.clear()
                rows = torch.tensor(has_image)
                model.product_state(ids, mask, torch.randn(int(rows.sum()), 3, spec.size, spec.size), rows)
                assert sorted(calls) == expected, has_image
    finally:
        del model.text_encoder.pooled


def test_untuned_build_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, _, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, seed=5))
    after = torch.rand(1)
    b, _, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, seed=5))
    c, _, _ = build_dashclip(DashCLIPConfig(backbone="tiny", image_size=32, seed=6))
    assert torch.equal(after, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ------------------------------------------------------------------------- pretrained weights
@pytest.fixture(scope="module")
def mini():
    model, tokenizer, spec = build_dashclip(DashCLIPConfig(backbone="mini"))
    return model.eval(), tokenizer, spec


def test_mini_text_encoder_is_minilm(mini):
    from transformers import BertModel

    model, tokenizer, _ = mini
    sentences = ["organic whole milk one gallon", "a gallon of organic milk", "stainless steel hammer with grip"]
    ids, mask = _batch(tokenizer, sentences)
    reference = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    with torch.no_grad():
        ours = model.text_encoder(ids, mask)
        theirs = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    # all-MiniLM-L6-v2 is a mean-pooling sentence encoder: similar sentences end up closer
    pooled = F.normalize((ours * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > unrelated + 0.3
    missing = [n for n in model.pretrained_names if ".crossattention." in n]
    assert not missing  # the cross-attention blocks are new (random), everything else is MiniLM
    assert "text_encoder.encoder.layer.5.output.dense.weight" in model.pretrained_names
    first = model.text_encoder.encoder.layer[0]  # frozen (4 of 6 layers), but its new cross-attention trains
    assert not first.attention.self.query.weight.requires_grad and first.crossattention.self.query.weight.requires_grad


def test_mini_image_encoder_is_efficientnet_lite0_bit_exact(mini):
    model, _, spec = mini
    packaged = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    ours = model.image_encoder.backbone.state_dict()
    assert len(ours) == len(packaged) - 2  # everything but the ImageNet classifier
    for (src, tensor), (dst, value) in zip(packaged.items(), ours.items()):
        assert torch.equal(tensor, value), (src, dst)
    assert spec == ImageSpec(96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert model.image_tokens(torch.zeros(1, 3, 96, 96)).shape == (1, 1 + 3 * 3, 384)


def test_efficientnet_lite0_recognises_real_fruit():
    """ImageNet classes of grocery_store catalog photos: the architecture (TF same padding,
    BatchNorm eps) matches the weights, not only the shapes."""
    root = SHARED_DATA / "grocery_store" / "dataset" / "iconic-images-and-descriptions"
    photos = {"Fruit/Banana/Banana": 954, "Fruit/Pineapple/Pineapple": 953, "Fruit/Lemon/Lemon": 951,
              "Vegetables/Pepper/Green-Bell-Pepper/Green-Bell-Pepper": 945}
    net = load_efficientnet_lite0(num_classes=1000).eval()
    pixels = torch.stack([decode_image((root / f"{p}_Iconic.jpg").read_bytes(), 224) for p in photos]).float() / 255
    with torch.no_grad():
        top5 = net((pixels - 0.5) / 0.5).topk(5).indices
    hits = [label in row for label, row in zip(photos.values(), top5.tolist())]
    assert all(hits), hits


def _tiny_blip_dir(root: Path) -> tuple[Path, object]:
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, encoder_hidden_size=48),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                           image_size=64, patch_size=16),
        image_text_hidden_size=16)
    reference = BlipForImageTextRetrieval(config).eval()
    reference.save_pretrained(root)
    BertTokenizer(vocab=str(minilm_path() / "vocab.txt")).save_pretrained(root)
    return root, reference


def test_blip_checkpoint_directory_round_trip(tmp_path):
    blip_dir, reference = _tiny_blip_dir(tmp_path / "blip")
    model, tokenizer, spec = build_dashclip(DashCLIPConfig(backbone="blip", init_from=str(blip_dir), image_size=64,
                                                     embed_dim=16))
    model.eval()
    ref_state = reference.state_dict()
    ours = model.state_dict()
    mapping = {"vision_model.": "image_encoder.", "text_encoder.": "text_encoder.", "vision_proj.": "image_proj.",
               "text_proj.": "text_proj.", "itm_head.": "itm_head."}
    compared = 0
    for name, tensor in ref_state.items():
        prefix = next((p for p in mapping if name.startswith(p)), None)
        if prefix is None or name.endswith("position_ids"):
            continue
        assert torch.equal(ours[mapping[prefix] + name[len(prefix):]], tensor), name
        compared += 1
    assert compared == len([k for k in ours if not k.startswith(("query_", "multimodal_proj"))])
    assert spec.size == 64 and spec.mean != (0.5, 0.5, 0.5)  # CLIP normalisation of BLIP
    first = model.text_encoder.encoder.layer[0]  # BLIP's cross-attention is pretrained: frozen with its layer
    assert not first.crossattention.self.query.weight.requires_grad
    batch = tokenizer(["organic milk", "peanut butter crunchy"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        itm = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=pixels).itm_score
        sim = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                        use_itm_head=False).itm_score
        tokens = model.image_tokens(pixels)
        torch.testing.assert_close(model.itm_logits(batch["input_ids"], batch["attention_mask"], tokens), itm,
                                   atol=1e-5, rtol=1e-5)
        ours_sim = model.image_embedding(tokens) @ model.text_embedding(batch["input_ids"], batch["attention_mask"]).T
        torch.testing.assert_close(ours_sim, sim, atol=1e-5, rtol=1e-5)


def test_blip_positions_are_resampled_for_a_smaller_image(tmp_path):
    blip_dir, _ = _tiny_blip_dir(tmp_path / "blip")
    model, _, _ = build_dashclip(DashCLIPConfig(backbone="blip", init_from=str(blip_dir), image_size=32, embed_dim=16))
    assert model.image_encoder.embeddings.position_embedding.shape == (1, 1 + 2 * 2, 48)
    assert model.image_tokens(torch.randn(1, 3, 32, 32)).shape == (1, 5, 48)


def test_config_errors_are_clear():
    from common.cli import UserError

    with pytest.raises(UserError, match="--init-from"):
        build_dashclip(DashCLIPConfig(backbone="blip"))
    with pytest.raises(UserError, match="freeze-fraction"):
        build_dashclip(DashCLIPConfig(backbone="tiny", freeze_fraction=1.5))
    with pytest.raises(ValueError, match="multiple of 16"):
        build_dashclip(DashCLIPConfig(backbone="tiny", image_size=40))


def test_blip_backbone_trains_from_the_checkpoint_directory(tmp_path, tiny_workdir_copy):
    from embeddings import encode, train

    blip_dir, reference = _tiny_blip_dir(tmp_path / "blip")
    run = tiny_workdir_copy
    train.main(["--workdir", str(run), "--backbone", "blip", "--init-from", str(blip_dir), "--image-size", "32",
                "--embed-dim", "16", "--stage1-batch-size", "8", "--stage1-max-steps", "2", "--eval-every", "2",
                "--stage1-eval-max", "16", "--stage2-batch-size", "8", "--stage2-max-steps", "2",
                "--pqc-negatives", "2", "--stage2-eval-max", "16", "--threads", "1"])
    encoder = encode.load_encoder(run, "trained")
    catalog = pq.read_table(run / "data" / "catalog.parquet").to_pandas().iloc[:4]
    vectors = encoder.products(catalog)
    assert vectors.shape == (4, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    untuned = encode.load_encoder(run, "untuned").model.state_dict()
    assert torch.equal(untuned["text_encoder.encoder.layer.1.output.dense.weight"],
                       reference.state_dict()["text_encoder.encoder.layer.1.output.dense.weight"])
