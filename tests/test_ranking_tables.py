"""The ranking model's frozen DashCLIP tables and the plain-tensor wrapper (torchrec, no mocks)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchrec.fx
from torch.nn import functional as F

from data.schema import SchemaError
from embeddings.tables import build_table, embedding_table_path, write_table
from ranking.model import RankerConfig, build_model, build_tables, frozen_table_inputs, load_model, save_model
from ranking.plain import PlainInputModel
from ranking.spec import FeatureSpec
from ranking.tables import (HISTORY_FEATURE, PRODUCT_FEATURE, PRODUCT_TABLE, QUERY_FEATURE, QUERY_TABLE,
                            PretrainedEmbeddingBagCollection,
                            frozen_parameter_names, load_tables, sparse_gradient_parameters, trainable_parameters)
from ranking.variants import VARIANTS, get_variant

DIM = 8
PRODUCT_IDS = [11, 12, 13, 14, 15]
QUERIES = ["Milk", "organic eggs", "Coca-Cola Zero!"]
SMALL = RankerConfig(sparse_embedding_dim=4, dcn_low_rank=4, dcn_deep_sizes=[16, 8], table_low_rank=4,
                    table_deep_sizes=[16, 8], head_sizes=[8])


@pytest.fixture()
def table_files(tmp_path):
    rng = np.random.default_rng(0)
    product = build_table("product", PRODUCT_IDS, rng.normal(size=(len(PRODUCT_IDS), DIM)), "test")
    query = build_table("query", QUERIES, rng.normal(size=(len(QUERIES), DIM)), "test")
    write_table(product, embedding_table_path(tmp_path, "product"))
    write_table(query, embedding_table_path(tmp_path, "query"))
    return tmp_path, product, query


def _spec(product=None, query=None) -> FeatureSpec:
    spec = FeatureSpec(dense_names=["dense_a", "dense_b"], dense_mean=[1.0, -2.0], dense_std=[2.0, 0.5],
                       sparse_names=["sparse_x", "sparse_y"], sparse_num_embeddings=[5, 3], train_click_rate=0.1,
                       history_len=4)
    return spec.with_tables(product, query) if product is not None else spec


def _inputs(batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, 2, generator=g)
    sparse = torch.stack([torch.randint(0, 9, (batch,), generator=g), torch.randint(-1, 4, (batch,), generator=g)], 1)
    product_rows = torch.randint(0, len(PRODUCT_IDS) + 1, (batch,), generator=g)
    query_rows = torch.randint(0, len(QUERIES) + 1, (batch,), generator=g)
    history = torch.randint(-1, len(PRODUCT_IDS) + 1, (batch, 4), generator=g)
    history[0] = -1  # an empty bag
    return dense, sparse, product_rows, query_rows, history


def test_from_files_loads_tables_bit_exactly_and_frozen(table_files):
    workdir, product, query = table_files
    tables = PretrainedEmbeddingBagCollection.from_files(embedding_table_path(workdir, "product"),
                                                         embedding_table_path(workdir, "query"))
    weights = {name: bag.weight for name, bag in tables.ebc.embedding_bags.items()}
    assert torch.equal(weights[PRODUCT_TABLE], torch.from_numpy(product.vectors))
    assert torch.equal(weights[QUERY_TABLE], torch.from_numpy(query.vectors))
    assert not any(w.requires_grad for w in weights.values())
    assert tables.frozen_table_names() == [PRODUCT_TABLE, QUERY_TABLE]
    assert type(tables.ebc).__name__ == "EmbeddingBagCollection"  # the stock type DMP's sharder matches


def test_pooling_history_mean_empty_bag_and_unknown_ids(table_files):
    workdir, product, query = table_files
    spec = _spec(product, query)
    model = build_model("dcn_pq_hist", spec, SMALL, build_tables(get_variant("dcn_pq_hist"), spec, (product, query)))
    plain = PlainInputModel(model)
    history_ids = [[13, 11, 999], [], [15]]  # 999 is not in the table -> row 0 (zeros)
    history = torch.from_numpy(spec.history_rows(history_ids))
    product_rows = torch.from_numpy(spec.product_rows([12, 424242, 15]))
    query_rows = torch.from_numpy(spec.query_rows(["  organic   EGGS ", "unknown query", "coca-cola zero"]))
    assert product_rows.tolist() == [2, 0, 5] and query_rows.tolist() == [2, 0, 3]
    features = plain.features(torch.zeros(3, 2, dtype=torch.long), product_rows, query_rows, history)
    pooled = model.table_tower.tables(features).to_dict()
    vectors = product.vectors
    np.testing.assert_allclose(pooled[HISTORY_FEATURE][0].numpy(), np.mean([vectors[3], vectors[1], vectors[0]], 0), rtol=1e-6)
    assert torch.equal(pooled[HISTORY_FEATURE][1], torch.zeros(DIM))  # empty history -> zeros
    np.testing.assert_array_equal(pooled[HISTORY_FEATURE][2].numpy(), vectors[5])
    assert torch.equal(pooled["product_id"][1], torch.zeros(DIM))  # unknown product -> row 0
    assert torch.equal(pooled["query_id"][1], torch.zeros(DIM))  # unknown query -> row 0
    np.testing.assert_array_equal(pooled["query_id"][2].numpy(), query.vectors[3])
    out_of_range = plain.features(torch.zeros(1, 2, dtype=torch.long), torch.tensor([77]), torch.tensor([-5]),
                                  torch.tensor([[99, -1, -1, -1]]))
    pooled = model.table_tower.tables(out_of_range).to_dict()
    assert all(torch.equal(v, torch.zeros(1, DIM)) for v in pooled.values())


def test_frozen_tables_do_not_move_while_trainable_tables_do(table_files):
    _, product, query = table_files
    spec = _spec(product, query)
    torch.manual_seed(0)  # default widths: with SMALL's 8-unit head all ReLUs can start dead on 6 samples
    model = build_model("dcn_pq_hist", spec, RankerConfig(), build_tables(get_variant("dcn_pq_hist"), spec, (product, query)))
    frozen = frozen_parameter_names(model)
    assert frozen == ["table_tower.tables.ebc.embedding_bags.product_table.weight",
                      "table_tower.tables.ebc.embedding_bags.query_table.weight"]
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=0.1)
    assert not {id(params[n]) for n in frozen} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in params.items()}
    plain = PlainInputModel(model)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(plain(*_inputs()), torch.tensor([0., 1., 0., 1., 1., 0.]))
    loss.backward()
    optimizer.step()
    for name in frozen:
        assert torch.equal(params[name], before[name]), name
    # frozen tables are the EmbeddingTable's own arrays, not copies: one copy in memory per process
    assert np.shares_memory(params[frozen[0]].detach().numpy(), product.vectors)
    assert np.shares_memory(params[frozen[1]].detach().numpy(), query.vectors)
    moved = "dcn_tower.sparse_ebc.embedding_bags.t_sparse_x.weight"
    assert not torch.equal(params[moved], before[moved])


def test_random_variant_has_same_shapes_and_trains_its_tables(table_files):
    _, product, query = table_files
    spec = _spec(product, query)
    tables = build_tables(get_variant("dcn_pq_hist_random"), spec, (product, query), torch.Generator().manual_seed(3))
    assert tables.num_product_rows == len(PRODUCT_IDS) + 1 and tables.num_query_rows == len(QUERIES) + 1
    assert tables.dim == DIM and tables.frozen_table_names() == []
    weight = tables.ebc.embedding_bags[PRODUCT_TABLE].weight
    assert weight.requires_grad and torch.equal(weight[0], torch.zeros(DIM))
    assert not torch.equal(weight[1:], torch.from_numpy(product.vectors[1:]))
    model = build_model("dcn_pq_hist_random", spec, SMALL, tables)
    assert frozen_parameter_names(model) == []
    assert any(p is weight for p in trainable_parameters(model))


def test_finetune_variant_starts_from_the_tables_and_trains_them_row_sparse(table_files):
    _, product, query = table_files
    spec = _spec(product, query)
    variant = get_variant("dcn_pq_hist_finetune")
    model = build_model(variant, spec, SMALL, build_tables(variant, spec, (product, query)))
    bags = model.table_tower.tables.ebc.embedding_bags
    assert torch.equal(bags[PRODUCT_TABLE].weight, torch.from_numpy(product.vectors))
    assert torch.equal(bags[QUERY_TABLE].weight, torch.from_numpy(query.vectors))
    assert frozen_parameter_names(model) == []
    sparse = {id(p) for p in sparse_gradient_parameters(model)}  # SparseAdam / Adagrad: only looked-up rows move
    assert all(bag.sparse and bag.weight.requires_grad and id(bag.weight) in sparse for bag in bags.values())
    # trainable tables are copies: training leaves the EmbeddingTable (shared by other runs) alone
    assert not np.shares_memory(bags[QUERY_TABLE].weight.detach().numpy(), query.vectors)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fx_trace_then_script_matches_eager(table_files, variant):
    _, product, query = table_files
    spec = _spec(product, query) if VARIANTS[variant].uses_tables else _spec()
    torch.manual_seed(1)
    tables = build_tables(VARIANTS[variant], spec, (product, query), torch.Generator().manual_seed(1))
    plain = PlainInputModel(build_model(variant, spec, SMALL, tables)).eval()
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(plain))
    for seed in (0, 1):
        inputs = _inputs(batch=5 + seed, seed=seed)
        eager = plain(*inputs)
        assert eager.shape == (5 + seed,)
        torch.testing.assert_close(scripted(*inputs), eager, rtol=1e-6, atol=1e-6)


def test_unseen_sparse_ids_share_the_reserved_bucket():
    spec = _spec()
    torch.manual_seed(0)
    plain = PlainInputModel(build_model("dcn", spec, SMALL)).eval()
    features = plain.features(torch.tensor([[4, 2], [99, -3], [7, 5]]), torch.zeros(3, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), torch.full((3, 4), -1))
    assert features["sparse_x"].values().tolist() == [4, 4, 4]  # 5 rows: ids 0..3 seen, row 4 reserved
    assert features["sparse_y"].values().tolist() == [2, 2, 2]


def test_table_errors_name_the_file(table_files, tmp_path):
    workdir, product, _ = table_files
    with pytest.raises(SchemaError, match="product_table.parquet.*dimension 8 does not match the model's table dimension 16"):
        PretrainedEmbeddingBagCollection.from_files(embedding_table_path(workdir, "product"),
                                                    embedding_table_path(workdir, "query"), expected_dim=16)
    other = tmp_path / "other"
    write_table(build_table("query", QUERIES, np.ones((len(QUERIES), 4))), embedding_table_path(other, "query"))
    with pytest.raises(SchemaError, match=r"other/embeddings/query_table.parquet.*dimension 4 does not match"):
        load_tables(embedding_table_path(workdir, "product"), embedding_table_path(other, "query"))
    with pytest.raises(SchemaError, match=r"missing/embeddings/product_table.parquet.*missing embedding table"):
        load_tables(embedding_table_path(tmp_path / "missing", "product"), embedding_table_path(workdir, "query"))


def _plain_way_logits(plain: PlainInputModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The logits ``[B]`` the plain way: torchrec's EBC forwards (one KeyedTensor of every pooled
    vector) and ``F.cosine_similarity`` for each cosine, then the model's own towers and head."""
    model = plain.model
    features = plain.features(*inputs[1:])
    dcn = model.dcn_tower
    towers = [dcn.interact(inputs[0], dcn.sparse_ebc(features).values())]
    tower = model.table_tower
    if tower is not None:
        pooled = tower.tables(features).to_dict()
        product, query = pooled[PRODUCT_FEATURE], pooled[QUERY_FEATURE]
        vectors = [product, query, F.cosine_similarity(product, query, dim=1, eps=1e-8)]
        if tower.with_history:
            history = pooled[HISTORY_FEATURE]
            vectors += [history, F.cosine_similarity(product, history, dim=1, eps=1e-8)]
        towers.append(tower.interact(*vectors))
    return model.head(torch.cat(towers, dim=1)).squeeze(1)


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.grad.coalesce().to_dense() if p.grad.is_sparse else p.grad).clone()
            for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batch", [2, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_computes_the_plain_way(table_files, variant, batch):
    """Row gathers instead of the EBC forwards, cosines from dot products and norms, and (frozen
    tables) the projected product table (batch 7: the 6-row table is smaller than the vectors to
    project) or the projected vectors (batch 2) give the logits and every gradient of the plain
    computation up to float rounding (unknown rows, an empty history bag and unknown sparse ids
    included)."""
    _, product, query = table_files
    spec = _spec(product, query) if VARIANTS[variant].uses_tables else _spec()
    torch.manual_seed(2)
    tables = build_tables(VARIANTS[variant], spec, (product, query), torch.Generator().manual_seed(2))
    plain = PlainInputModel(build_model(variant, spec, SMALL, tables))
    inputs = _inputs(batch=batch, seed=3)
    labels = torch.tensor([0., 1., 1., 0., 1., 0., 1.])[:batch]
    grads = []
    for forward in (plain, lambda *x: _plain_way_logits(plain, x)):
        plain.zero_grad(set_to_none=True)
        logits = forward(*inputs)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        grads.append((logits.detach(), _gradients(plain)))
    (fast, fast_grads), (reference, reference_grads) = grads
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == reference_grads.keys() and len(fast_grads) > 0
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("with_history", [True, False])
def test_frozen_table_inputs_project_the_table_or_the_vectors_alike(with_history):
    """The table path (a table no longer than the vectors to project) and the vector path (the
    same table padded with rows no sample reads) agree, with unknown rows, an empty and a
    one-row bag; the cosines are F.cosine_similarity's."""
    g = torch.Generator().manual_seed(0)
    product_table, query_table = torch.randn(9, 16, generator=g), torch.randn(5, 16, generator=g)
    product_table[0] = query_table[0] = 0.0
    weights = [torch.randn(4, 16, generator=g), torch.randn(4, generator=g), torch.randn(4, 16, generator=g),
               torch.randn(4, generator=g)]
    product_rows, query_rows = torch.tensor([1, 0, 3, 8, 2, 5, 7]), torch.tensor([2, 4, 0, 1, 3, 3, 4])
    lengths = torch.tensor([3, 0, 1, 2, 0, 4, 1])
    history_values = torch.tensor([1, 2, 3, 4, 0, 5, 6, 7, 8, 8, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    bags = (history_values, offsets) if with_history else (None, None)
    padded = torch.cat([product_table, torch.randn(20, 16, generator=g)])
    norms = [torch.linalg.vector_norm(t, 2, dim=1) for t in (product_table, padded, query_table)]
    out = frozen_table_inputs(product_rows, query_rows, *bags, product_table, query_table, norms[0], norms[2], *weights)
    rows = frozen_table_inputs(product_rows, query_rows, *bags, padded, query_table, norms[1], norms[2], *weights)
    torch.testing.assert_close(out, rows, rtol=1e-5, atol=1e-6)
    product, query = product_table[product_rows], query_table[query_rows]
    torch.testing.assert_close(out[:, 8], F.cosine_similarity(product, query, dim=1, eps=1e-8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 4:8], F.linear(query, weights[2], weights[3]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :4], F.linear(product, weights[0], weights[1]), rtol=1e-5, atol=1e-6)
    if with_history:
        history = F.embedding_bag(history_values, product_table, offsets, mode="mean", include_last_offset=True)
        torch.testing.assert_close(out[:, 9:13], F.linear(history, weights[0], weights[1]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[:, 13], F.cosine_similarity(product, history, dim=1, eps=1e-8), rtol=1e-5, atol=1e-6)
        assert out[1, 13] == 0.0 and torch.equal(out[1, 9:13], weights[1])  # the empty bag: cosine 0, projection b
    assert out[1, 8] == 0.0 and out[2, 8] == 0.0  # the unknown product and the unknown query


@pytest.mark.parametrize("variant", ["dcn_pq_hist", "dcn_pq_hist_random"])
def test_pooled_vectors_and_cosines_are_the_ebc_forward_and_cosine_similarity(table_files, variant):
    _, product, query = table_files
    spec = _spec(product, query)
    tables = build_tables(get_variant(variant), spec, (product, query), torch.Generator().manual_seed(4))
    plain = PlainInputModel(build_model(variant, spec, SMALL, tables)).eval()
    features = plain.features(*_inputs(batch=9, seed=5)[1:])
    with torch.no_grad():
        pooled, reference = tables.pooled(features), tables(features).to_dict()
        assert pooled.keys() == reference.keys() == {PRODUCT_FEATURE, QUERY_FEATURE, HISTORY_FEATURE}
        for name, vectors in pooled.items():
            assert torch.equal(vectors, reference[name]), name
        product_vectors = pooled[PRODUCT_FEATURE].clone()
        product_vectors[1] = 0.0  # an unknown product: cosine 0
        others = [pooled[QUERY_FEATURE], pooled[HISTORY_FEATURE]]
        cosines = plain.model.table_tower.cosines(product_vectors, [o.clone() for o in others])
    for cosine, other in zip(cosines, others):
        assert torch.equal(cosine, F.cosine_similarity(product_vectors, other, dim=1, eps=1e-8))
    assert cosines[1][0] == 0.0 and cosines[0][1] == 0.0  # the empty history bag and the unknown product


def test_row_norms_follow_the_loaded_tables(table_files, tmp_path):
    """The frozen tables' row norms are no state: a model rebuilt with zero tables (load_model)
    gets them from the loaded weights and scores like the model it was saved from."""
    _, product, query = table_files
    spec = _spec(product, query)
    torch.manual_seed(0)
    model = build_model("dcn_pq_hist", spec, SMALL, build_tables(get_variant("dcn_pq_hist"), spec, (product, query))).eval()
    assert not any("norms" in key for key in model.state_dict())
    torch.testing.assert_close(model.table_tower.tables.product_norms, torch.from_numpy(product.vectors).norm(dim=1))
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    tables = loaded.table_tower.tables
    assert tables.ebc.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(tables.product_norms, model.table_tower.tables.product_norms)
    torch.testing.assert_close(tables.query_norms, model.table_tower.tables.query_norms)
    with torch.no_grad():
        assert torch.equal(PlainInputModel(loaded)(*_inputs()), PlainInputModel(model)(*_inputs()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plain_rows_and_the_kjt_give_the_same_logits(table_files, variant):
    """PlainInputModel feeds a local model the sanitised ids without a KJT (forward_rows); the
    KJT route (what DMP and quantized tables take) gives the same logits, also without any
    history column."""
    _, product, query = table_files
    spec = _spec(product, query) if VARIANTS[variant].uses_tables else _spec()
    torch.manual_seed(5)
    tables = build_tables(VARIANTS[variant], spec, (product, query), torch.Generator().manual_seed(5))
    plain = PlainInputModel(build_model(variant, spec, SMALL, tables)).eval()
    assert plain.model.is_local()
    inputs = _inputs(batch=7, seed=6)
    for history in (inputs[4], inputs[4][:, :0]):
        args = (*inputs[:4], history)
        with torch.no_grad():
            assert torch.equal(plain(*args), plain.model(args[0], plain.features(*args[1:])))


@pytest.mark.parametrize("variant", ["dcn_pq_hist", "dcn_pq_hist_finetune"])
@pytest.mark.parametrize("spill", [False, True])
def test_snapshots_hold_what_training_changes_and_are_reused(table_files, variant, spill, tmp_path):
    """Early stopping's snapshot skips the frozen tables, a later snapshot is written into the
    earlier one's tensors (a run holds one), and restore brings every weight back; with a spill
    directory the trainable tables are kept in unnamed files there, not in memory."""
    from ranking.train import LocalRanker, SpilledTensor

    _, product, query = table_files
    spec = _spec(product, query)
    model = build_model(variant, spec, SMALL, build_tables(get_variant(variant), spec, (product, query)))
    ranker = LocalRanker(model, spill_dir=tmp_path / "spill" if spill else None)
    (tmp_path / "spill").mkdir()
    first = ranker.snapshot()
    assert set(first) == set(model.state_dict()) - set(frozen_parameter_names(model))
    spilled = {k for k, v in first.items() if isinstance(v, SpilledTensor)}
    trainable_tables = {name for name, p in model.named_parameters()
                        if any(p is q for q in sparse_gradient_parameters(model))}
    assert spilled == (trainable_tables if spill else set())
    assert bool(trainable_tables) == get_variant(variant).train_tables
    assert list((tmp_path / "spill").iterdir()) == []  # unnamed files: nothing to clean up after a kill
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in first.items() if k not in spilled}
    files = {k: first[k].file for k in spilled}
    second = ranker.snapshot(first)
    assert second is first and {k: v.data_ptr() for k, v in second.items() if k not in spilled} == pointers
    assert {k: second[k].file for k in spilled} == files
    assert all(torch.equal(second[k], moved[k]) for k in second if k not in spilled)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    ranker.restore(second)
    assert all(torch.equal(v, moved[k]) for k, v in model.state_dict().items())


def test_shared_copy_is_other_modules_over_the_same_tensors(table_files):
    """serving.export wraps and quantizes a shared copy: no weight is copied, no module is shared."""
    from ranking.model import shared_copy

    _, product, query = table_files
    spec = _spec(product, query)
    model = build_model("dcn_pq_hist", spec, SMALL, build_tables(get_variant("dcn_pq_hist"), spec, (product, query))).eval()
    copy = shared_copy(model).eval()
    assert copy.table_tower.tables is not model.table_tower.tables
    original, copied = model.state_dict(), copy.state_dict()
    assert original.keys() == copied.keys()
    assert all(original[k].data_ptr() == copied[k].data_ptr() for k in original)
    with torch.no_grad():
        assert torch.equal(PlainInputModel(copy)(*_inputs()), PlainInputModel(model)(*_inputs()))


def test_mapped_tables_are_the_files_bit_for_bit_mapped_once_and_rebuilt_for_new_files(table_files):
    """The tables' vectors in .npy files under DIR/embeddings/mapped that every process maps (copy
    on write, so a frozen model's weights are the mapped pages); reused for the same file, rebuilt
    (and the old file removed) for another."""
    from embeddings.tables import MAPPED_REL, tables_set
    from ranking.tables import mapped_tables

    workdir, product, query = table_files
    digests = tables_set(workdir).hashes()
    mapped = mapped_tables(workdir, digests)
    for table, expected in zip(mapped, (product, query)):
        assert isinstance(table.vectors, np.memmap) and table.vectors.flags.writeable
        assert np.array_equal(table.vectors, expected.vectors) and table.keys == expected.keys
        assert table.kind == expected.kind and table.source == "test"
    files = sorted(p.name for p in (workdir / MAPPED_REL).iterdir())
    assert [name.split("-")[0] for name in files] == ["product", "query"]
    query_file = workdir / MAPPED_REL / files[1]
    built = query_file.stat().st_mtime_ns
    frozen = build_tables(VARIANTS["dcn_pq_hist"], _spec(*mapped), mapped)
    weight = frozen.ebc.embedding_bags[QUERY_TABLE].weight
    assert weight.data_ptr() == torch.from_numpy(mapped[1].vectors).data_ptr()  # the mapped pages themselves
    assert mapped_tables(workdir, digests)[1].keys == query.keys  # reused: the same file, not rewritten
    assert sorted(p.name for p in (workdir / MAPPED_REL).iterdir()) == files
    assert query_file.stat().st_mtime_ns == built

    other = build_table("query", QUERIES[:2], np.ones((2, DIM)), "test")
    write_table(other, embedding_table_path(workdir, "query"))
    remapped = mapped_tables(workdir, tables_set(workdir).hashes())
    assert np.array_equal(remapped[1].vectors, other.vectors)
    now = sorted(p.name for p in (workdir / MAPPED_REL).iterdir())
    assert now[0] == files[0] and now[1] != files[1] and not query_file.exists()  # the old query file is gone


def test_mapped_tables_check_the_files_like_a_read(table_files):
    from ranking.tables import mapped_tables

    workdir, _, _ = table_files
    query = embedding_table_path(workdir, "query")
    write_table(build_table("query", QUERIES, np.ones((len(QUERIES), DIM + 1)), "test"), query)
    with pytest.raises(SchemaError, match=f"{query}.*dimension {DIM + 1}"):
        mapped_tables(workdir, {"embeddings/query_table.parquet": "a", "embeddings/product_table.parquet": "b"})
    with pytest.raises(SchemaError, match="missing embedding table"):
        mapped_tables(workdir / "nowhere", {"embeddings/query_table.parquet": "a", "embeddings/product_table.parquet": "b"})
    assert not (workdir / "nowhere").exists()  # checked before anything is written

def _mapped_rss_bytes(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            current = len(fields) == 6 and fields[5] == str(path)
        elif current and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_trainable_copy_of_a_mapped_table_gives_the_mapped_pages_back(tmp_path):
    """A trainable variant copies the mapped tables; the copied pages leave this process's memory as
    they are copied (not the table twice), and the copy is the table bit for bit."""
    from embeddings.tables import copy_table_vectors

    vectors = np.random.default_rng(0).standard_normal((4096, 512)).astype(np.float32)  # 8 MiB
    path = tmp_path / "table.npy"
    np.save(path, vectors)
    mapped = np.load(path, mmap_mode="c")
    assert float(mapped.sum()) == pytest.approx(float(vectors.sum()), rel=1e-4)  # every page read in
    assert _mapped_rss_bytes(path) > 0.9 * vectors.nbytes
    copy = copy_table_vectors(mapped)
    assert np.array_equal(copy, vectors) and copy.flags.writeable and not isinstance(copy, np.memmap)
    assert _mapped_rss_bytes(path) < 0.1 * vectors.nbytes
    assert np.array_equal(mapped, vectors)  # the pages read back in from the file as they were
    assert np.array_equal(copy_table_vectors(vectors), vectors)  # an array in memory: a plain copy
