"""ORQA/REALM's extractive reader: BERT over ``[CLS] question [SEP] block [SEP]``, every span of at most
``max_width`` wordpieces inside the block scored by w . LayerNorm(ReLU(W_s h_start + W_e h_end)).

The retrieval score of the block is added by the caller (the loss marginalises over (block, span) pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertModel

from realm_lm.models.by_length import encode_by_length


# spans scored per chunk: 4k x 256 floats = 4 MB stay in a CPU's cache through the memory-bound passes; 16k (16 MB)
# made the span part 1.5-2.5x slower on a 2-core AMD EPYC (8 blocks of 320 wordpieces: 22,800 spans)
SPAN_CHUNK = 4_096


@dataclass
class SpanScores:
    logits: torch.Tensor  # [N, S] score of every enumerated span (-inf where not allowed)
    starts: torch.Tensor  # [S] start position of span s
    ends: torch.Tensor  # [S] end position (inclusive)
    allowed: torch.Tensor  # [N, S] bool: inside the block, within the width limit


def enumerate_spans(length: int, max_width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All (start, end) with end - start < max_width and end < length: two [S] tensors."""
    starts = torch.arange(length, device=device).repeat_interleave(max_width)  # [L*W]
    ends = starts + torch.arange(max_width, device=device).repeat(length)  # [L*W]
    keep = ends < length
    return starts[keep], ends[keep]


class Reader(nn.Module):
    def __init__(self, bert: BertModel, span_hidden: int = 256, max_width: int = 10):
        super().__init__()
        hidden = bert.config.hidden_size
        self.bert = bert
        self.max_width = max_width
        self.start_proj = nn.Linear(hidden, span_hidden)
        self.end_proj = nn.Linear(hidden, span_hidden, bias=False)
        self.norm = nn.LayerNorm(span_hidden)
        self.score = nn.Linear(span_hidden, 1)

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device  # not quantised by the int8 path, unlike Linears

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                start_ok: torch.Tensor, end_ok: torch.Tensor) -> SpanScores:
        """input_ids, attention_mask, token_type_ids: [N, L]; start_ok / end_ok: [N, L] True where a span may start /
        end (on the block's wordpieces, at word boundaries). The block is contiguous, so a span whose two ends
        lie in it never leaves it. Inputs move to the reader's device; the logits are fp32 (also under autocast)."""
        device = self.device
        input_ids, attention_mask, token_type_ids, start_ok, end_ok = (
            t.to(device) for t in (input_ids, attention_mask, token_type_ids, start_ok, end_ok))
        h = encode_by_length(self.bert, input_ids, attention_mask, token_type_ids)  # [N, L, H]
        starts, ends = enumerate_spans(h.shape[1], self.max_width, device)  # [S], [S]
        allowed = start_ok[:, starts] & end_ok[:, ends]  # [N, S]
        # score only the allowed spans (question, padding and split words are a large share of N x S), in chunks
        # that stay in cache: the [spans, span_hidden] activations are the reader's largest tensors
        row, span = allowed.nonzero(as_tuple=True)  # [A], [A]
        length = h.shape[1]
        start_at, end_at = row * length + starts[span], row * length + ends[span]  # [A] rows of the flattened [N*L]
        hs, he = self.start_proj(h).flatten(0, 1), self.end_proj(h).flatten(0, 1)  # [N*L, Hs] each
        scores = []
        for a in range(0, len(row), SPAN_CHUNK):
            # index_select on flat rows and in-place add/ReLU: this part is memory-bound, every pass over x counts
            x = hs.index_select(0, start_at[a:a + SPAN_CHUNK])  # [chunk, Hs]
            x = x.add_(he.index_select(0, end_at[a:a + SPAN_CHUNK])).relu_()  # [chunk, Hs]
            scores.append(self.score(self.norm(x)).squeeze(-1))  # [chunk]
        logits = h.new_full(allowed.shape, float("-inf"), dtype=torch.float32)  # [N, S]
        if scores:
            logits = logits.index_put((row, span), torch.cat(scores).float())
        return SpanScores(logits, starts, ends, allowed)
