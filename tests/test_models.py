import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from realm_lm.config import EmbedderConfig
from realm_lm.models.embedder import build_retriever, configure_dropout, weights_hash
from realm_lm.models.pretrained import ModelNotFoundError, load_tokenizer, resolve_model_dir
from realm_lm.retrieval import embed_questions, encode_queries

from conftest import FIXTURES

TINY = str(FIXTURES / "tiny-bert")


def test_embedder_shapes_and_layernorm():
    r = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    ids, mask = encode_queries(["the river", "who built the tower of the city"], resolve_model_dir(TINY), 24)
    out = r.query(ids, mask)  # [2, 16]
    assert out.shape == (2, 16)
    assert torch.allclose(out.mean(-1), torch.zeros(2), atol=1e-5)  # LayerNorm output, default affine


def test_padding_does_not_change_an_embedding():
    r = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    model_dir = resolve_model_dir(TINY)
    alone = r.doc(*encode_queries(["the river"], model_dir, 24))
    padded = r.doc(*encode_queries(["the river", "a much longer text about the king of the city"], model_dir, 24))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_embed_questions_batches_by_length_and_returns_the_given_order():
    r = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    model_dir = resolve_model_dir(TINY)
    questions = ["who built the tower of the city by the river", "the king", "a river", "when was the city built",
                 "the king of the river and the tower"]
    batched = embed_questions(r.query, questions, model_dir, 24, batch=2)  # [5, 16], batches cross the given order
    r.eval()
    with torch.inference_mode():
        alone = torch.cat([r.query(*encode_queries([q], model_dir, 24)) for q in questions])  # [5, 16]
    torch.testing.assert_close(torch.from_numpy(batched), alone, atol=1e-5, rtol=1e-5)


def test_attention_dropout_zero_makes_training_mode_deterministic_in_attention():
    r = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    for m in r.modules():  # hidden dropout off: what is left of training mode's randomness is in the attention
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids, mask = encode_queries(["who built the tower of the city"], resolve_model_dir(TINY), 24)
    r.eval()
    reference = r.query(ids, mask)
    r.train()
    configure_dropout(r, 0.5)
    assert not torch.allclose(r.query(ids, mask), reference, atol=1e-4)
    configure_dropout(r, 0.0)
    torch.testing.assert_close(r.query(ids, mask), reference, atol=1e-5, rtol=1e-5)
    assert r.query.bert.config.attention_probs_dropout_prob == 0.0


def test_towers_shared_or_separate_from_one_initialisation():
    shared = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    assert shared.shared
    separate = build_retriever(EmbedderConfig(model=TINY, proj_dim=16, share_towers=False))
    assert not separate.shared and separate.query is not separate.doc
    assert weights_hash(separate.query) == weights_hash(separate.doc) == weights_hash(shared.doc)
    assert weights_hash(build_retriever(EmbedderConfig(model=TINY, proj_dim=16, seed=1)).doc) != weights_hash(shared.doc)


def test_mean_pooling_is_unit_norm():
    r = build_retriever(EmbedderConfig(model=TINY, pooling="mean"))
    out = r.query(*encode_queries(["the river", "the king"], resolve_model_dir(TINY), 24))
    assert out.shape == (2, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_mean_proj_pools_over_real_tokens_only():
    r = build_retriever(EmbedderConfig(model=TINY, pooling="mean-proj", proj_dim=16))
    ids, mask = encode_queries(["the river", "the king of the river"], resolve_model_dir(TINY), 24)  # [2, L], padded
    alone = r.query(*encode_queries(["the river"], resolve_model_dir(TINY), 24))
    torch.testing.assert_close(r.query(ids, mask)[:1], alone, atol=1e-5, rtol=1e-5)  # padding changes nothing
    assert r.query.pool(ids, mask).shape == (2, 32)


def test_fit_projection_keeps_the_top_principal_directions():
    """A cloud stretched along 3 known axes: the fitted rows span those axes, in order of variance, and centre it."""
    torch.manual_seed(0)
    tower = build_retriever(EmbedderConfig(model=TINY, pooling="mean-proj", proj_dim=3)).query
    axes = torch.linalg.qr(torch.randn(32, 3))[0].T  # [3, 32], orthonormal
    latent = torch.randn(400, 3)
    latent = torch.linalg.qr(latent - latent.mean(0))[0] * 20  # [400, 3]: centred, uncorrelated columns
    pooled = 5.0 + (latent * torch.tensor([9.0, 4.0, 2.0])) @ axes + 0.01 * torch.randn(400, 32)  # [400, 32]
    tower.fit_projection(pooled)
    w = tower.proj.weight  # [3, 32]
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-4, rtol=0)
    torch.testing.assert_close((w @ axes.T).abs(), torch.eye(3), atol=1e-2, rtol=0)  # i-th row = i-th axis, up to sign
    projected = tower.proj(pooled)  # [400, 3]
    torch.testing.assert_close(projected.mean(0), torch.zeros(3), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="at least 3 pooled rows"):
        tower.fit_projection(pooled[:2])
    with pytest.raises(ValueError, match="no projection"):
        build_retriever(EmbedderConfig(model=TINY, pooling="mean")).query.fit_projection(pooled)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a BERT checkpoint folder"):
        resolve_model_dir(str(tmp_path))


def test_minilm_tokenizer_matches_the_packaged_tokenizer_json():
    """Parity: our WordPiece over vocab.txt gives the ids of the package's own tokenizer.json."""
    model_dir = resolve_model_dir("minilm")
    ours = load_tokenizer(model_dir)
    reference = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    text = "Who designed the Eiffel Tower in 1889? Théâtre, naïve café — “quotes” & 3.5%."
    assert ours.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids


def test_cheap_cpu_dropout_rate_scale_and_reproducibility():
    from realm_lm.models.cpu_dropout import CpuDropout

    torch.manual_seed(0)
    drop = CpuDropout(0.1).train()
    x = torch.ones(400_000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.003  # 15 random bits per element: p = 3277 / 32768
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 32768 / (32768 - 3277)))
    assert abs(float(y.mean()) - 1.0) < 0.01  # expectations unchanged
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x), y)  # the seed reproduces the mask
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_dropout_attention_matches_autograd_with_the_same_mask(monkeypatch, dtype):
    from realm_lm.models import cpu_dropout

    masks = []
    draw = cpu_dropout.dropped_mask

    def recorded(shape, p, device):
        drop, scale = draw(shape, p, device)
        masks.append(drop)
        return drop, scale

    monkeypatch.setattr(cpu_dropout, "dropped_mask", recorded)
    monkeypatch.setattr(cpu_dropout.DropoutAttention, "CHUNK_BYTES", 2 * 3 * 9 * 9 * 4)  # chunks of 2: 2, 2, 1
    torch.manual_seed(0)
    B, h, L, d = 5, 3, 9, 4
    q, k, v = (torch.randn(B, h, L, d).to(dtype).requires_grad_() for _ in range(3))
    bias = torch.zeros(B, 1, 1, L)
    bias[1, ..., 6:] = bias[4, ..., 2:] = torch.finfo(torch.float32).min  # padding, as BERT's extended mask
    d_out = torch.randn(B, h, L, d).to(dtype)
    out = cpu_dropout.DropoutAttention.apply(q, k, v, bias, 0.3, d ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    assert [m.shape[0] for m in masks] == [2, 2, 1]
    dropped = torch.cat(masks)  # [B, h, L, L]
    assert 0.2 < float(dropped.float().mean()) < 0.4
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    probs = (q64 @ k64.transpose(-1, -2) / d ** 0.5 + bias.double()).softmax(-1)
    expected = probs.masked_fill(dropped, 0.0) @ v64 * (32768 / (32768 - round(0.3 * 32768)))
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), d_out.double())
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.08, "rtol": 0.05}
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tol)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, **tol)


def test_cheap_attention_dropout_matches_sdpa_when_nothing_is_dropped(monkeypatch):
    from realm_lm.models import cpu_dropout

    r = build_retriever(EmbedderConfig(model=TINY, proj_dim=16))
    ids, mask = encode_queries(["who built the tower of the city", "when"], resolve_model_dir(TINY), 24)
    for m in r.modules():  # hidden dropout off: only the attention's dropout is in play
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    r.eval()
    reference = r.query(ids, mask)  # torch's fused attention, padding masked
    configure_dropout(r, 0.1)
    r.train()
    assert not torch.allclose(r.query(ids, mask), reference, atol=1e-4)
    drawn = []

    def drop_nothing(shape, p, device):
        drawn.append(shape)
        return torch.zeros(shape, dtype=torch.bool), 1.0

    monkeypatch.setattr(cpu_dropout, "dropped_mask", drop_nothing)
    out = r.query(ids, mask)  # the hand-written attention path, with a mask that drops nothing
    assert len(drawn) == 2  # one draw for each of the tiny BERT's 2 layers' attention
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert r.query.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_length_groups_cover_every_row_once_and_are_the_cheapest_cut():
    from itertools import combinations

    from realm_lm.models.by_length import LENGTH_STEP, length_groups

    rng = np.random.default_rng(0)
    for _ in range(30):
        lengths = rng.integers(1, 80, size=int(rng.integers(1, 9)))
        groups = length_groups(lengths, overhead=20, min_rows=2)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
        assert all(len(g) >= min(2, len(lengths)) for g in groups)
        keys = sorted(set((-(-lengths // LENGTH_STEP)).tolist()))

        def cost(cut_keys):  # groups of keys split before each of cut_keys
            bounds, total = [0, *cut_keys, len(keys)], 0
            for a, b in zip(bounds, bounds[1:]):
                rows = int(np.isin(-(-lengths // LENGTH_STEP), keys[a:b]).sum())
                if rows < min(2, len(lengths)):
                    return np.inf
                total += rows * keys[b - 1] * LENGTH_STEP + 20
            return total

        brute = min(cost(c) for n in range(len(keys)) for c in combinations(range(1, len(keys)), n))
        found = sum(len(g) * -(-int(lengths[g].max()) // LENGTH_STEP) * LENGTH_STEP + 20 for g in groups)
        assert found == brute


def rows_of_unequal_length():
    from realm_lm.train.data import pad_rows

    rng = np.random.default_rng(1)
    lengths = [5, 60, 7, 58, 6, 61, 30, 8]
    ids, mask = pad_rows([rng.integers(5, 100, size=n) for n in lengths], 0)  # [8, 61]
    types = (torch.arange(ids.shape[1]) >= 3).long().expand_as(ids) * mask  # [8, 61]
    return lengths, ids, mask, types


def test_encode_by_length_matches_one_padded_call():
    from realm_lm.models.by_length import encode_by_length, length_groups

    bert = build_retriever(EmbedderConfig(model=TINY, proj_dim=16)).doc.bert.eval()
    lengths, ids, mask, types = rows_of_unequal_length()
    assert len(length_groups(lengths)) > 1  # the grouped path is what runs
    grouped = encode_by_length(bert, ids, mask, types)  # [8, 61, H]
    padded = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(grouped[real], padded[real], atol=1e-5, rtol=1e-5)
    # gradients reach the weights through every group as through one call
    weight = bert.encoder.layer[0].attention.self.query.weight
    g1, = torch.autograd.grad((grouped[real] ** 2).sum(), weight)
    g2, = torch.autograd.grad((padded[real] ** 2).sum(), weight)
    torch.testing.assert_close(g1, g2, atol=1e-4, rtol=1e-4)


def test_encode_by_length_in_training_is_one_padded_call():
    """Training is not grouped (see models/by_length.py): the same dropout draws give the same hidden states."""
    from realm_lm.models.by_length import encode_by_length

    bert = build_retriever(EmbedderConfig(model=TINY, proj_dim=16)).doc.bert
    configure_dropout(bert, 0.1)
    bert.train()
    _, ids, mask, types = rows_of_unequal_length()
    torch.manual_seed(0)
    ours = encode_by_length(bert, ids, mask, types)  # [8, 61, H]
    torch.manual_seed(0)
    padded = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert torch.equal(ours, padded)


def test_realm_attention_matches_transformers_eager_attention_on_padded_rows():
    """The registered attention (models/cpu_dropout.py: its [B, 1, 1, L] padding mask, SDPA) against transformers'
    own eager attention and [B, 1, L, L] mask, in eval and in training without dropout."""
    from realm_lm.models.cpu_dropout import ATTENTION

    bert = build_retriever(EmbedderConfig(model=TINY, proj_dim=16)).doc.bert
    assert bert.config._attn_implementation == ATTENTION
    for m in bert.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    _, ids, mask, types = rows_of_unequal_length()
    real = mask.bool()
    for training in (False, True):
        bert.train(training)
        bert.set_attn_implementation(ATTENTION)
        ours = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state  # [8, 61, H]
        bert.set_attn_implementation("eager")
        eager = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(ours[real], eager[real], atol=1e-5, rtol=1e-5)
    unpadded = bert(input_ids=ids[:, :5], attention_mask=mask[:, :5], token_type_ids=types[:, :5]).last_hidden_state
    bert.set_attn_implementation(ATTENTION)
    torch.testing.assert_close(bert(input_ids=ids[:, :5], attention_mask=mask[:, :5],
                                    token_type_ids=types[:, :5]).last_hidden_state, unpadded, atol=1e-5, rtol=1e-5)
