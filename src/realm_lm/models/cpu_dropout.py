"""Dropout that is cheap on a CPU, for BERT training (attention probabilities and hidden states), and the
attention implementation every BERT here runs (registered with transformers as ``ATTENTION``).

torch's CPU dropout draws one Bernoulli sample per element (~7 ns each on this machine), and its fused attention
kernel refuses dropout, so attention falls back to an unfused path that samples [batch, heads, L, L] of them: with
BERT's attention dropout 0.1, half a CPU pre-training step went to dropout. Here a mask costs 15 random bits per
element, drawn 31 at a time from torch's generator (so seeds still reproduce a run). The keep probability is
1 - round(32768 p) / 32768 (p = 0.1: 0.100006 dropped) and kept values are scaled by its inverse, so expectations
are unchanged. Attention with dropout is written out by hand (`DropoutAttention`), a few sequences at a time so its
[L, L] matrices stay in cache, keeping the dropout mask for the backward pass rather than the probabilities.
Everywhere else (inference, no dropout, GPUs) attention is transformers' SDPA, given BERT's key-padding mask as a
[B, 1, 1, L] view rather than the [B, 1, L, L] copy that transformers builds for it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface, BertModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, bidirectional_mask_function, sdpa_mask

ATTENTION = "realm_sdpa"  # the attn_implementation name of `attention` and `padding_mask` below
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
    def forward(ctx, q, k, v, bias, p: float, scaling: float):  # q, k, v [B, h, L, d]; bias [B, 1, 1 or L, L] or None
        B, h, L, d = q.shape
        q = q.mul(scaling)  # [B, h, L, d], contiguous, the 1/sqrt(d) folded in
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
        ctx.scale, ctx.n, ctx.scaling = scale, n, scaling
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
        return dq.mul_(ctx.scaling), dk, dv.mul_(scale), None, None, None


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T + bias) in fp32, [n, h, L, L] (q already scaled)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # [n, h, L, L]
    if bias is not None:
        scores += bias
    return scores.softmax(-1)


def _kept(dropped: torch.Tensor) -> torch.Tensor:
    """1.0 where an element is kept, 0.0 where dropped (through uint8: bool to float is 8x slower on a CPU)."""
    return dropped.view(torch.uint8).float().neg_().add_(1.0)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention interface: `DropoutAttention` when training with dropout on a CPU, SDPA otherwise.
    query, key, value [B, h, L, d]; attention_mask bool [B, 1, 1 or L, L] (True: attend) or None; -> [B, L, h, d]."""
    if not use_cheap_dropout(query, dropout, module.training) or kwargs.get("is_causal"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bias = None
    if attention_mask is not None:  # additive, fp32: 0 where attended, the most negative float where masked
        bias = torch.zeros(attention_mask.shape, device=query.device).masked_fill_(
            ~attention_mask.bool(), torch.finfo(torch.float32).min)  # [B, 1, 1 or L, L]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.autocast("cpu", enabled=False):  # DropoutAttention chooses its own precisions
        out = DropoutAttention.apply(query, key, value, bias, dropout, scaling)  # [B, h, L, d]
    return out.transpose(1, 2), None  # [B, L, h, d], as SDPA's


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=bidirectional_mask_function, attention_mask: torch.Tensor | None = None,
                 allow_is_bidirectional_skip: bool = False, **kwargs) -> torch.Tensor | None:
    """transformers' mask interface: BERT's key-padding mask [B, L] as a bool view [B, 1, 1, L] (True: attend), or
    None where nothing is padded; any other pattern is transformers' own `sdpa_mask`."""
    plain = (mask_function is bidirectional_mask_function and q_offset == 0 and kv_offset == 0
             and attention_mask is not None and attention_mask.shape == (batch_size, kv_length))
    if not plain:
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)
    attend = attention_mask.bool()  # [B, L]
    # None lets SDPA skip the mask; not when compiling, where it would be one more graph to compile and to switch to
    if allow_is_bidirectional_skip and not torch.compiler.is_compiling() and bool(attend.all()):
        return None
    return attend[:, None, None, :]  # [B, 1, 1, L]


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, padding_mask)


def install_cpu_dropout(module: nn.Module) -> None:
    """Every nn.Dropout inside ``module`` draws the cheap mask on CPU tensors, and every BERT attends with
    `attention` (same weights, same parameters; only classes and the implementation's name change)."""
    for m in module.modules():
        if type(m) is nn.Dropout:
            m.__class__ = CpuDropout
        elif isinstance(m, BertModel) and m.config._attn_implementation != ATTENTION:
            m.set_attn_implementation(ATTENTION)
