"""Dropout that is cheap on a CPU, for BERT training (attention probabilities and hidden states).

torch's CPU dropout draws one Bernoulli sample per element (~7 ns each on this machine), and its fused attention
kernel refuses dropout, so attention falls back to an unfused path that samples [batch, heads, L, L] of them: with
BERT's attention dropout 0.1, half a CPU pre-training step went to dropout. Here a mask costs 15 random bits per
element, drawn 31 at a time from torch's generator (so seeds still reproduce a run). The keep probability is
1 - round(32768 p) / 32768 (p = 0.1: 0.100006 dropped) and kept values are scaled by its inverse, so expectations
are unchanged. Attention with dropout is written out by hand (`DropoutAttention`), a few sequences at a time so its
[L, L] matrices stay in cache, keeping the dropout mask for the backward pass rather than the probabilities.
GPUs keep torch's fused kernels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertSdpaSelfAttention

LEVELS = 32768  # 15 random bits per element


def dropped_mask(shape: tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool [shape] tensor, True where an element is dropped (probability ~p), and the scale of the kept ones."""
    n = math.prod(shape)
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # 31 uniform bits each
    halves = bits.view(torch.int16)[:n].bitwise_and_(LEVELS - 1)  # [n] 15 uniform bits each (bit 31 is always 0)
    dropped = round(p * LEVELS)
    return (halves < dropped).view(shape), LEVELS / (LEVELS - dropped)


def use_cheap_dropout(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and p > 0 and x.device.type == "cpu"


class CpuDropout(nn.Dropout):
    """nn.Dropout with the cheap mask on CPU tensors (torch's dropout elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_cheap_dropout(x, self.p, self.training):
            return super().forward(x)
        drop, scale = dropped_mask(x.shape, self.p, x.device)
        return (x * _kept(drop).to(x.dtype)).mul_(scale)  # 0/1 exact in bf16 too; the scale stays unrounded


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + bias) with the cheap dropout mask, times v, over chunks of the batch.

    Saves q, k, v, the output and the mask (1 byte an element), and recomputes the probabilities chunk by chunk in
    the backward pass (one more q k^T and softmax), the way flash attention does: the [L, L] matrices never leave
    the cache. The mask is applied as a multiplication by a 0/1 float matrix (bool ops are several times slower on
    a CPU). Matrix products run in the inputs' dtype (bf16 under autocast), softmax and its gradient in fp32.
    """

    CHUNK_BYTES = 4 << 20  # fp32 [L, L] scores per chunk: a few MB stays in a core's share of the cache

    @staticmethod
    def forward(ctx, q, k, v, bias, p: float):  # q, k, v [B, h, L, d]; bias additive [B, 1, 1 or L, L] or None
        B, h, L, d = q.shape
        q = q.mul(d ** -0.5)  # [B, h, L, d], contiguous, the 1/sqrt(d) folded in
        k, v = k.contiguous(), v.contiguous()
        n = max(1, DropoutAttention.CHUNK_BYTES // (h * L * L * 4))  # sequences per chunk
        out = torch.empty_like(v)  # [B, h, L, d]
        dropped = torch.empty(B, h, L, L, dtype=torch.bool, device=q.device)
        scale = 1.0
        for i in range(0, B, n):
            c = slice(i, i + n)
            probs = _probs(q[c], k[c], None if bias is None else bias[c])  # [n, h, L, L] fp32
            dropped[c], scale = dropped_mask(probs.shape, p, probs.device)
            out[c] = torch.matmul(probs.mul_(_kept(dropped[c])).to(v.dtype), v[c])  # [n, h, L, d], unscaled
        out.mul_(scale)
        ctx.save_for_backward(q, k, v, bias, out, dropped)
        ctx.scale, ctx.n = scale, n
        return out

    @staticmethod
    def backward(ctx, d_out):  # d_out [B, h, L, d]
        q, k, v, bias, out, dropped = ctx.saved_tensors
        scale, n = ctx.scale, ctx.n
        d_out = d_out.contiguous()
        # sum_j dP_ij P_ij, the softmax gradient's row term: equal to sum_e dO_ie O_ie, with no [L, L] product
        row_term = (d_out.float() * out.float()).sum(-1, keepdim=True)  # [B, h, L, 1]
        v_scaled = v * scale  # the kept probabilities' scale, on v: L / d times fewer multiplications
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for i in range(0, q.shape[0], n):
            c = slice(i, i + n)
            probs = _probs(q[c], k[c], None if bias is None else bias[c])  # [n, h, L, L], as in the forward pass
            kept = _kept(dropped[c])  # [n, h, L, L] 0/1
            dv[c] = torch.matmul((probs * kept).to(v.dtype).transpose(-1, -2), d_out[c])  # [n, h, L, d], unscaled
            d_probs = torch.matmul(d_out[c], v_scaled[c].transpose(-1, -2)).float().mul_(kept)  # [n, h, L, L]
            d_scores = d_probs.sub_(row_term[c]).mul_(probs).to(q.dtype)  # [n, h, L, L]
            dq[c] = torch.matmul(d_scores, k[c])  # [n, h, L, d], for the scaled q
            dk[c] = torch.matmul(d_scores.transpose(-1, -2), q[c])  # [n, h, L, d]
        return dq.mul_(q.shape[-1] ** -0.5), dk, dv.mul_(scale), None, None


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + bias) in fp32, [n, h, L, L] (q already scaled)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [n, h, L, L]
    if bias is not None:
        scores += bias
    return scores.softmax(-1)


def _kept(dropped: torch.Tensor) -> torch.Tensor:
    """1.0 where an element is kept, 0.0 where dropped (through uint8: bool to float is 8x slower on a CPU)."""
    return dropped.view(torch.uint8).float().neg_().add_(1.0)


class CpuDropoutSelfAttention(BertSdpaSelfAttention):
    """BERT's SDPA self-attention; in CPU training with dropout, `DropoutAttention`."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if (not use_cheap_dropout(hidden_states, self.dropout_prob, self.training) or args
                or self.position_embedding_type != "absolute" or any(v not in (None, False) for v in kwargs.values())):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(batch, length, self.num_attention_heads, self.attention_head_size)
                   .transpose(1, 2) for proj in (self.query, self.key, self.value))  # [B, h, L, d] each
        with torch.autocast("cpu", enabled=False):  # DropoutAttention chooses its own precisions
            out = DropoutAttention.apply(q, k, v, attention_mask, self.dropout_prob)  # [B, h, L, d]
        return out.transpose(1, 2).reshape(batch, length, self.all_head_size), None  # [B, L, H]


def install_cpu_dropout(module: nn.Module) -> None:
    """Swap every nn.Dropout and BERT SDPA self-attention inside ``module`` for the versions above (same weights,
    same parameters; only the class changes)."""
    for m in module.modules():
        if type(m) is nn.Dropout:
            m.__class__ = CpuDropout
        elif type(m) is BertSdpaSelfAttention:
            m.__class__ = CpuDropoutSelfAttention
