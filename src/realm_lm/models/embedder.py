"""The retriever's towers: BERT -> pooled output -> Linear(hidden -> 128) -> LayerNorm (REALM), or mean pooling (MiniLM).

REALM pools BERT's ``[CLS]`` (``cls-proj``). all-MiniLM-L6-v2 was trained as a sentence embedder through mean
pooling, so its ``[CLS]`` carries little of its retrieval skill: ``mean-proj`` (the default) pools the way it was
trained and keeps REALM's projection and LayerNorm.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.utils import logging as hf_logging

from realm_lm.config import POOLINGS, EmbedderConfig
from realm_lm.models.by_length import encode_by_length
from realm_lm.models.cpu_dropout import ATTENTION, install_cpu_dropout
from realm_lm.models.pretrained import resolve_model_dir


def load_bert(model_dir: str | Path) -> BertModel:
    """A local Hugging Face BERT checkpoint, without the pooler, attending with SDPA (models/cpu_dropout.py)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "weights not used: pooler.*" is expected: REALM pools and projects itself
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a load that takes milliseconds
    try:
        return BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation=ATTENTION)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def configure_dropout(module: nn.Module, attention_p: float) -> None:
    """Dropout on the attention probabilities of every BERT inside ``module`` (BERT's default: 0.1), and dropout
    that is cheap to draw when training on a CPU, with attention written out to suit it (models/cpu_dropout.py).

    With attention_p = 0, torch's scaled-dot-product attention takes its fused (flash) kernel on CPUs as well: a CPU
    pre-training step runs ~10 % faster still (benchmarks/pretrain_throughput.py). GPUs fuse dropout either way.
    """
    for m in module.modules():
        if isinstance(m, BertModel):
            m.config.attention_probs_dropout_prob = attention_p
        if isinstance(m, BertSelfAttention):
            m.dropout.p = attention_p  # what it passes to the attention function as its dropout
    install_cpu_dropout(module)


class Embedder(nn.Module):
    """One tower: token ids -> a d-dimensional vector scored by inner product."""

    def __init__(self, bert: BertModel, pooling: str, proj_dim: int):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.hidden = bert.config.hidden_size  # width of the pooled output
        self.projected = pooling != "mean"
        if self.projected:
            self.proj = nn.Linear(self.hidden, proj_dim)
            self.norm = nn.LayerNorm(proj_dim)
        self.dim = proj_dim if self.projected else self.hidden

    @property
    def device(self) -> torch.device:
        return self.bert.embeddings.word_embeddings.weight.device

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output before the projection: [B, H] (``[CLS]``, or the mean over real tokens)."""
        # input_ids, attention_mask: [B, L], moved to the tower's device here (batches are built on the CPU)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        h = encode_by_length(self.bert, input_ids, attention_mask, torch.zeros_like(input_ids))  # [B, L, H]
        if self.pooling == "cls-proj":
            return h[:, 0]  # [B, H]
        h = h.float()
        mask = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        return (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, H]

    @property
    def body_pooling(self) -> str:
        """How :meth:`pool` reads BERT's output: towers with the same BERT weights and this pool alike."""
        return "cls" if self.pooling == "cls-proj" else "mean"

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The tower's output [B, D] from its pooled output [B, H]."""
        if self.projected:
            return self.norm(self.proj(pooled)).float()  # [B, D]; fp32 under bf16 autocast too: scores need it
        return nn.functional.normalize(pooled.float(), dim=-1)  # all-MiniLM-L6-v2 is trained on normalised means

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(input_ids, attention_mask))  # [B, D]

    @torch.no_grad()
    def fit_projection(self, pooled: torch.Tensor) -> None:
        """Set the projection to the top principal directions of ``pooled`` [N, H] (this tower's pooled outputs
        over a sample of blocks, N >= D), centred on their mean: retrieval then starts from the pretrained
        encoder's own geometry instead of a random projection (dev recall@5 of MiniLM's mean pooling cut to
        128-d: 0.791 against 0.745 random; README)."""
        if not self.projected:
            raise ValueError(f"pooling {self.pooling!r} has no projection to fit")
        if min(len(pooled), self.hidden) < self.dim:  # the SVD gives min(N, H) directions
            raise ValueError(f"fitting a {self.dim}-d projection needs at least {self.dim} pooled rows of width "
                             f">= {self.dim}, got {len(pooled)} of width {self.hidden}")
        pooled = pooled.float().to(self.proj.weight.device)
        mean = pooled.mean(0)  # [H]
        _, _, directions = torch.linalg.svd(pooled - mean, full_matrices=False)  # [min(N, H), H], by variance
        weight = directions[:self.dim]  # [D, H]
        self.proj.weight.copy_(weight)
        self.proj.bias.copy_(-weight @ mean)


class Retriever(nn.Module):
    """Query and document towers; with ``share_towers`` they are the same module (REALM's default)."""

    def __init__(self, query: Embedder, doc: Embedder):
        super().__init__()
        self.query = query
        self.doc = doc

    @property
    def shared(self) -> bool:
        return self.query is self.doc


class RetrievalScale(nn.Module):
    """f(x, z) = scale * q.d, the scale learned (log-parametrised, so it stays positive). REALM's towers end in a
    LayerNorm over 128 dims, so q.d runs near 100 and a few points separate the top blocks: at scale 1, p(z|x)
    is one-hot on the top block (median p = 0.95 over the top 5 of Open-SQuAD; median p(null) 3e-14 in pre-training),
    so the marginal over blocks reads one block and passes the retriever almost no gradient. ORQA and REALM
    calibrate through the LayerNorm's gain over 100k+ steps; short runs need the temperature outright."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        if init <= 0:
            raise ValueError(f"a retrieval scale must be > 0, not {init}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    @property
    def value(self) -> float:
        return self.log_scale.exp().item()

    def param_group(self, lr: float) -> dict:
        """Its optimizer group: a temperature, not a weight, so no decay pulls it towards scale 1."""
        return {"params": [self.log_scale], "lr": lr, "weight_decay": 0.0}

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.float() * self.log_scale.exp()  # fp32, also under bf16 autocast


def build_retriever(cfg: EmbedderConfig) -> Retriever:
    """Pretrained BERT + freshly initialised projection (seeded), or the weights of ``cfg.checkpoint``."""
    model_dir = resolve_model_dir(cfg.model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # the projection's initialisation is part of the config, not of global state
    query = Embedder(load_bert(model_dir), cfg.pooling, cfg.proj_dim)
    doc = query if cfg.share_towers else Embedder(load_bert(model_dir), cfg.pooling, cfg.proj_dim)
    if not cfg.share_towers and query.projected:
        doc.load_state_dict(query.state_dict())  # two copies of one initialisation
    torch.random.set_rng_state(generator_state)
    retriever = Retriever(query, doc)
    if cfg.checkpoint:
        load_retriever_weights(retriever, cfg.checkpoint)
    return retriever.eval()


def load_retriever_weights(retriever: Retriever, checkpoint: str | Path) -> None:
    """The ``retriever.*`` tensors of a training checkpoint (a run folder means its latest checkpoint)."""
    from realm_lm.train.checkpoint import CheckpointError, latest_checkpoint, read_weights

    path = Path(checkpoint)
    if not (path / "model.safetensors").is_file():
        path = latest_checkpoint(path) or path
    file = path / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {checkpoint}")
    tensors = read_weights(path, "retriever.")
    missing, _ = retriever.load_state_dict(tensors, strict=False)
    # a shared tower is stored once, under either name: a key is only missing if its twin is missing too
    twin = lambda k: k.replace("query.", "doc.", 1) if k.startswith("query.") else k.replace("doc.", "query.", 1)  # noqa: E731
    really_missing = [k for k in missing if twin(k) not in tensors]
    if really_missing or not tensors:
        raise CheckpointError(f"{file} does not hold this retriever's weights (missing {really_missing[:3]}...)")


def weights_hash(module: nn.Module) -> str:
    """sha256 over the module's tensors in name order: the identity of the weights that made an artifact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def tiny_bert_config(vocab_size: int) -> BertConfig:
    """The tiny random BERT of the tests (hidden 32, 2 layers): shapes and plumbing in seconds."""
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=512, attn_implementation=ATTENTION)
