"""Dropout that is cheap on a CPU, for BERT training (attention probabilities and hidden states).

torch's CPU dropout draws one Bernoulli sample per element (~7 ns each on this machine), and its fused attention
kernel refuses dropout, so attention falls back to an unfused path that samples [batch, heads, L, L] of them: with
BERT's attention dropout 0.1, half a CPU pre-training step went to dropout. Here a mask costs 15 random bits per
element, drawn 31 at a time from torch's generator (so seeds still reproduce a run), and attention is written out
once with the mask applied. The keep probability is 1 - round(32768 p) / 32768 (p = 0.1: 0.100006 dropped) and
kept values are scaled by its inverse, so expectations are unchanged. GPUs keep torch's fused kernels.
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
        return x.masked_fill(drop, 0.0).mul_(scale)


class CpuDropoutSelfAttention(BertSdpaSelfAttention):
    """BERT's SDPA self-attention; in CPU training with dropout, softmax(QK^T / sqrt(d) + mask) with the cheap
    dropout mask, then V."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if (not use_cheap_dropout(hidden_states, self.dropout_prob, self.training) or args
                or self.position_embedding_type != "absolute" or any(v not in (None, False) for v in kwargs.values())):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        batch, length, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(batch, length, self.num_attention_heads, self.attention_head_size)
                   .transpose(1, 2) for proj in (self.query, self.key, self.value))  # [B, h, L, d] each
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.attention_head_size ** -0.5)  # [B, h, L, L]
        if attention_mask is not None:
            scores = scores.add_(attention_mask)  # additive mask [B, 1, 1 or L, L]
        drop, scale = dropped_mask(scores.shape, self.dropout_prob, scores.device)
        probs = scores.softmax(-1).masked_fill(drop, 0.0)  # [B, h, L, L]; the kept ones' scale goes on V (L/d x fewer)
        out = torch.matmul(probs, v * scale).transpose(1, 2).reshape(batch, length, self.all_head_size)  # [B, L, H]
        return out, None


def install_cpu_dropout(module: nn.Module) -> None:
    """Swap every nn.Dropout and BERT SDPA self-attention inside ``module`` for the versions above (same weights,
    same parameters; only the class changes)."""
    for m in module.modules():
        if type(m) is nn.Dropout:
            m.__class__ = CpuDropout
        elif type(m) is BertSdpaSelfAttention:
            m.__class__ = CpuDropoutSelfAttention
