import math

import pytest
import torch

from realm_lm.losses import in_batch_nll, marginal_nll, retrieval_utility


def naive_marginal(logits, token_logp, mask, form):
    """Slow reference: explicit loops and plain probabilities."""
    total = 0.0
    B, K, M = token_logp.shape
    for b in range(B):
        pz = [math.exp(float(logits[b, z])) for z in range(K)]
        pz = [p / sum(pz) for p in pz]
        masks = [j for j in range(M) if mask[b, j]]
        if form == "paper":
            p = sum(pz[z] * math.prod(math.exp(float(token_logp[b, z, j])) for j in masks) for z in range(K))
            total += -math.log(p)
        else:
            total += -sum(math.log(sum(pz[z] * math.exp(float(token_logp[b, z, j])) for z in range(K))) for j in masks) / len(masks)
    return total / B


@pytest.mark.parametrize("form", ["paper", "per-token"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_marginal_nll_matches_a_naive_loop(form, seed):
    g = torch.Generator().manual_seed(seed)
    B, K, M = 3, 5, 4
    logits = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    token_logp = torch.rand(B, K, M, generator=g, dtype=torch.float64).log()
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    got = marginal_nll(logits, token_logp, mask, form).item()
    assert got == pytest.approx(naive_marginal(logits, token_logp, mask, form), rel=1e-9)


def test_marginal_nll_gradients_reach_the_retrieval_scores():
    logits = torch.randn(2, 3, requires_grad=True)
    token_logp = torch.tensor([[[-0.1], [-5.0], [-5.0]], [[-5.0], [-5.0], [-0.1]]])
    marginal_nll(logits, token_logp, torch.ones(2, 1)).backward()
    # raising the score of the block that predicts well lowers the loss
    assert logits.grad[0, 0] < 0 and logits.grad[1, 2] < 0


def test_retrieval_utility_is_zero_for_the_null_block():
    token_logp = torch.randn(2, 4, 3)
    ru = retrieval_utility(token_logp, torch.ones(2, 3), null_index=3)
    assert torch.allclose(ru[:, 3], torch.zeros(2))
    assert torch.allclose(ru[:, 0], token_logp[:, 0].sum(-1) - token_logp[:, 3].sum(-1))


def test_in_batch_nll_matches_a_naive_loop():
    q, d = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    naive = 0.0
    for i in range(4):
        scores = [float(q[i] @ d[j]) for j in range(4)]
        naive += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    assert in_batch_nll(q, d).item() == pytest.approx(naive / 4)
