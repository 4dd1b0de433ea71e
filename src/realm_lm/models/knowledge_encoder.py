"""REALM's knowledge-augmented encoder: a BERT over ``[CLS] query [SEP] block body [SEP]`` with an MLM head
evaluated only at the masked positions (never full-vocabulary logits at every position)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel

from realm_lm.models.by_length import encode_by_length


class MlmHead(nn.Module):
    """BERT's prediction head: transform (dense, GELU, LayerNorm; newly initialised) + decoder tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12):
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.word_embeddings = word_embeddings  # tied: the decoder weight IS the input embedding matrix
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., H] -> logits [..., V]
        h = self.norm(nn.functional.gelu(self.dense(h)))
        return h @ self.word_embeddings.weight.T + self.bias


class KnowledgeEncoder(nn.Module):
    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert
        self.head = MlmHead(bert.embeddings.word_embeddings, bert.config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                mask_positions: torch.Tensor) -> torch.Tensor:
        """log p(v | query, block) over the vocabulary at the masks only: [N, M, V] for N (query, block) pairs.

        input_ids, attention_mask, token_type_ids: [N, L]; mask_positions: [N, M] (padding slots point at 0;
        the caller masks them out). Inputs move to the encoder's device.
        """
        device = self.bert.embeddings.word_embeddings.weight.device
        input_ids, attention_mask, token_type_ids, mask_positions = (
            t.to(device) for t in (input_ids, attention_mask, token_type_ids, mask_positions))
        h = encode_by_length(self.bert, input_ids, attention_mask, token_type_ids)  # [N, L, H]
        at_masks = h.gather(1, mask_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [N, M, H]
        return self.head(at_masks).log_softmax(-1)  # [N, M, V]
