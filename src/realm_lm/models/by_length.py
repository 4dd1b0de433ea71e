"""BERT over a batch of right-padded rows of unequal length, a group of similar lengths at a time.

The reader and the knowledge-augmented encoder read ``[query ; block]`` rows whose blocks run from a few dozen to
288 wordpieces; padded to the longest, a batch of the real corpus is 1.4-1.9x its real tokens. On a CPU the cost
is the tokens, padding included, so groups of rows of similar length each run at their own width. On a GPU a
call's fixed cost is worth thousands of tokens and is not measured here: one call, as before.

Only a BERT in eval mode (answering, evaluation, index building) is grouped. Training keeps one padded call: in a
same-start check of the demo's QA fine-tuning (session 55, in benchmarks/README.md), grouped training came out
behind at seven seeds of nine in dev EM (3.1 EM on average) and in training loss, although each step's gradient
was measured to be the same in distribution; until that is understood, training pays for its padding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import BertModel

# what one more BERT call costs on a CPU, in padded tokens: 16 and 64 gave the same step times (a fine-tuning step
# of MiniLM on 16 rows of the real corpus on a 2-core EPYC)
GROUP_OVERHEAD_TOKENS = 32
LENGTH_STEP = 8  # lengths are grouped by multiples of this, which bounds the search below to ~40 values
MIN_GROUP_ROWS = 2  # a compiled reader is specialised away from batches of 1 (see Answerer.answer)


def length_groups(lengths: Sequence[int], overhead: int = GROUP_OVERHEAD_TOKENS,
                  min_rows: int = MIN_GROUP_ROWS) -> list[np.ndarray]:
    """Row indices in groups of similar length, shortest first, that minimise the padded tokens plus ``overhead``
    per group (an exact search over the sorted lengths). Each group has at least ``min_rows`` rows, or all of them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keys = -(-lengths // LENGTH_STEP)  # rounded up to the step
    values, counts = np.unique(keys, return_counts=True)  # ascending
    widths = values * LENGTH_STEP
    before = np.concatenate([[0], np.cumsum(counts)])  # rows with a key below values[i]
    least = min(min_rows, len(lengths))
    best = np.zeros(len(values) + 1)  # best[j]: the least cost of the rows with the j smallest keys
    first = np.zeros(len(values) + 1, dtype=np.int64)  # the group that ends at key j - 1 starts at key first[j]
    for j in range(1, len(values) + 1):
        rows = before[j] - before[:j]  # [j] rows in a group of keys i..j-1, for each start i
        cost = best[:j] + rows * widths[j - 1] + overhead
        cost[rows < least] = np.inf
        first[j] = int(np.argmin(cost))
        best[j] = cost[first[j]]
    order = np.argsort(keys, kind="stable")
    groups, j = [], len(values)
    while j > 0:
        groups.append(order[before[first[j]]:before[j]])
        j = first[j]
    return groups[::-1]


def encode_by_length(bert: BertModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor) -> torch.Tensor:
    """BERT's last hidden states [N, L, H] of right-padded rows [N, L]. On a CPU and in eval mode, groups of rows of
    similar length run at their own width; positions past a group's width are zeros (padding: no caller reads them)."""
    def run(rows: torch.Tensor | slice, width: int) -> torch.Tensor:
        return bert(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width],
                    token_type_ids=token_type_ids[rows, :width]).last_hidden_state  # [n, width, H]

    length = input_ids.shape[1]
    if bert.training or input_ids.device.type != "cpu" or len(input_ids) < 2 * MIN_GROUP_ROWS:
        return run(slice(None), length)
    lengths = attention_mask.sum(1)  # [N]
    groups = length_groups(lengths.tolist())
    if len(groups) == 1:
        return run(slice(None), length)
    parts = []
    for rows in groups:
        rows = torch.from_numpy(rows)
        width = int(lengths[rows].max())
        parts.append(torch.nn.functional.pad(run(rows, width), (0, 0, 0, length - width)))  # [n, L, H]
    grouped_order = torch.from_numpy(np.concatenate(groups))  # [N]: row of each grouped position
    return torch.cat(parts)[torch.argsort(grouped_order)]  # [N, L, H], back in the rows' order
