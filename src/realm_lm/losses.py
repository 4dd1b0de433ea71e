"""REALM's losses as pure functions over tensors (each tested against a naive loop in tests/test_losses.py)."""

from __future__ import annotations

import torch

from realm_lm.config import MARGINALS


def marginal_nll(retrieval_logits: torch.Tensor, token_logp: torch.Tensor, mask: torch.Tensor,
                 form: str = "per-token") -> torch.Tensor:
    """-log sum_z p(z|x) p(y|z,x), averaged over the batch.

    retrieval_logits: [B, K] f(x, z) of the K candidates; token_logp: [B, K, M] log p(y_j | z, x) at each mask slot;
    mask: [B, M] 1 for real masks, 0 for padding slots.

    * ``paper``: p(y|z,x) = prod_j p(y_j|z,x), the product inside the sum over z (the paper's equation);
      the loss is per query (a sum over its masks).
    * ``per-token``: each mask marginalised over z on its own, then averaged over the query's masks
      (google-research's released code).
    """
    log_pz = retrieval_logits.log_softmax(-1)  # [B, K]
    mask = mask.to(token_logp.dtype)
    if form == "paper":
        log_py_z = (token_logp * mask[:, None, :]).sum(-1)  # [B, K]
        return -torch.logsumexp(log_pz + log_py_z, dim=-1).mean()
    if form == "per-token":
        per_token = torch.logsumexp(log_pz[:, :, None] + token_logp, dim=1)  # [B, M]
        return -((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    raise ValueError(f"marginal must be one of {MARGINALS}, not {form!r}")


def retrieval_utility(token_logp: torch.Tensor, mask: torch.Tensor, null_index: int) -> torch.Tensor:
    """RU(z|x) = log p(y|z,x) - log p(y|null,x) (paper, Appendix D): [B, K]; positive where a block helps."""
    log_py_z = (token_logp * mask[:, None, :].to(token_logp.dtype)).sum(-1)  # [B, K]
    return log_py_z - log_py_z[:, null_index:null_index + 1]


def in_batch_nll(query_emb: torch.Tensor, block_emb: torch.Tensor) -> torch.Tensor:
    """ICT / dual-encoder loss: query i's positive is block i, the other blocks of the batch are negatives.

    query_emb: [B, D]; block_emb: [B, D].
    """
    logits = query_emb @ block_emb.T  # [B, B]
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def reader_marginal_nll(span_logits: torch.Tensor, retrieval_logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """ORQA's reader loss: -log of the total probability of every (block, span) pair that matches a gold answer.

    span_logits: [B, K, S] (-inf for spans that are not allowed); retrieval_logits: [B, K] added to every span
    of their block; gold: [B, K, S] bool. Questions whose candidates match no answer are left out (zero loss
    when no question has one).
    """
    joint = span_logits + retrieval_logits[:, :, None]  # [B, K, S]
    log_total = torch.logsumexp(joint.flatten(1), dim=-1)  # [B]
    log_gold = torch.logsumexp(joint.masked_fill(~gold, float("-inf")).flatten(1), dim=-1)  # [B]
    has = gold.flatten(1).any(-1)  # [B]
    if not has.any():
        return joint.new_zeros(()) * 0.0
    return (log_total - log_gold)[has].mean()


def retriever_marginal_nll(retrieval_logits: torch.Tensor, has_answer: torch.Tensor) -> torch.Tensor:
    """-log sum over retrieved blocks that contain an answer of p(z|x); questions with none are left out.

    retrieval_logits: [B, K]; has_answer: [B, K] bool.
    """
    log_pz = retrieval_logits.log_softmax(-1)  # [B, K]
    log_good = torch.logsumexp(log_pz.masked_fill(~has_answer, float("-inf")), dim=-1)  # [B]
    has = has_answer.any(-1)
    if not has.any():
        return retrieval_logits.new_zeros(()) * 0.0
    return -log_good[has].mean()
