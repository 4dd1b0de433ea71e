"""Typed run configuration: one frozen dataclass per component, TOML presets, dotted overrides.

A preset (``configs/*.toml``) and ``--set section.key=value`` overrides are the only two ways a
run is configured; both go through :func:`load_config`, which rejects unknown keys and values of
the wrong type. Every artifact stores the resolved config (:func:`config_to_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realm_lm.errors import RealmError


class ConfigError(RealmError, ValueError):
    """A preset or an override names an unknown key or gives a value of the wrong type or out of range."""


# The values a string field may take. Defined here, so that a bad preset or override fails when it is loaded rather
# than minutes into a run; the modules that dispatch on them import these.
POOLINGS = ("mean-proj", "cls-proj", "mean")
INDEX_BACKENDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf-pq")
INDEX_DTYPES = ("float32", "float16")
REFRESH_MODES = ("async", "sync", "never")
MASKING_MODES = ("salient", "random-uniform", "random-span")
MARGINALS = ("paper", "per-token")
FINETUNE_RETRIEVERS = ("realm", "bm25")
READER_RETRIEVALS = ("joint", "detached", "initial")  # finetune.reader_retrieval
PRECISIONS = ("auto", "fp32", "bf16")

# What one interactive request (`realm ask`, POST /ask) may ask for; `realm eval qa` reads reader.top_k blocks.
MAX_BLOCKS_READ = 100
MAX_ANSWERS = 50


def _check(section: str, cfg: Any, at_least: dict[str, float] | None = None, positive: tuple[str, ...] = (),
           fractions: tuple[str, ...] = (), choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Range checks of one section (run from ``__post_init__``, so a config built any way is checked)."""
    for name, low in (at_least or {}).items():
        if getattr(cfg, name) < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, not {getattr(cfg, name)!r}")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{section}.{name} must be > 0, not {getattr(cfg, name)!r}")
    for name in fractions:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{section}.{name} must lie in [0, 1], not {getattr(cfg, name)!r}")
    for name, options in (choices or {}).items():
        if getattr(cfg, name) not in options:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(options)}; not {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data"  # where `realm data fetch` puts SQuAD dev and the vital-article extracts


@dataclass(frozen=True)
class CorpusConfig:
    inputs: tuple[str, ...] = ("data/squad_v1.1_dev.json", "data/wiki_vital_extracts_en.json")
    store: str = "artifacts/open_squad/corpus"
    block_len: int = 288  # wordpieces per block, [CLS] title [SEP] body [SEP] included (paper: 288)
    max_title_len: int = 32  # longer titles are cut so the body keeps most of the block
    skip_malformed: bool = False  # False: any malformed input line stops the build before anything is written
    max_documents: int = 0  # keep only the first N documents (0: all); for small demo corpora

    def __post_init__(self) -> None:
        _check("corpus", self, at_least={"block_len": 8, "max_title_len": 1, "max_documents": 0})


@dataclass(frozen=True)
class EmbedderConfig:
    model: str = "minilm"  # "minilm" (the packaged all-MiniLM-L6-v2) or a local Hugging Face BERT folder
    # "mean-proj": mean over tokens -> Linear -> LayerNorm (REALM's tower on MiniLM's own pooling); "cls-proj": the
    # paper's [CLS] -> Linear -> LayerNorm (for BERT checkpoints trained through [CLS]); "mean": the MiniLM baseline
    pooling: str = "mean-proj"
    proj_dim: int = 128
    share_towers: bool = True  # query and document embedders share weights (REALM default)
    max_query_len: int = 64
    seed: int = 0  # initialisation of the projection
    checkpoint: str = ""  # a training run folder (or one checkpoint in it) to take the towers from; empty = as initialised

    def __post_init__(self) -> None:
        _check("embedder", self, at_least={"proj_dim": 1, "max_query_len": 3}, choices={"pooling": POOLINGS})


@dataclass(frozen=True)
class IndexConfig:
    dir: str = "artifacts/open_squad/index"
    backend: str = "exact"  # exact | faiss-flat | faiss-hnsw | faiss-ivf-pq
    dtype: str = "float32"  # storage of the exact backend: float32 | float16
    chunk_rows: int = 262_144  # rows scored per matmul by the exact backend (bounds memory)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    ivf_nlist: int = 4096
    ivf_pq_m: int = 32  # sub-quantisers; 128-d / 32 = 4 dims each
    ivf_nprobe: int = 64
    ivf_refine: int = 4  # re-rank k * ivf_refine PQ candidates with exact scores (0: off)
    embed_batch_tokens: int = 1152  # padded tokens per batch (blocks sorted by length); 4 full blocks: small batches stay in cache

    def __post_init__(self) -> None:
        _check("index", self, at_least={"chunk_rows": 1, "hnsw_m": 2, "hnsw_ef_construction": 1, "hnsw_ef_search": 1,
                                        "ivf_nlist": 1, "ivf_pq_m": 1, "ivf_nprobe": 1, "ivf_refine": 0,
                                        "embed_batch_tokens": 1},
               choices={"backend": INDEX_BACKENDS, "dtype": INDEX_DTYPES})


@dataclass(frozen=True)
class EncoderConfig:
    model: str = "minilm"  # the knowledge-augmented encoder: a separate copy of this BERT
    max_joint_len: int = 512  # [CLS] query [SEP] body [SEP] is cut to this many wordpieces

    def __post_init__(self) -> None:
        _check("encoder", self, at_least={"max_joint_len": 8})


@dataclass(frozen=True)
class RefreshConfig:
    mode: str = "async"  # async: a builder process re-embeds while training goes on | sync: training waits | never
    every: int = 50  # steps between index refreshes (paper: ~500 on TPUs; a CPU run takes fewer, slower steps)
    threads: int = 1  # intra-op threads of the builder process (the trainer keeps the rest)
    keep: int = 3  # index versions kept on disk, besides the one the latest checkpoint used
    max_failures: int = 3  # builders failing in a row before training stops: an index that never refreshes is not REALM
    # async only. 0: a version goes in as soon as it is published (the paper; the trainer never waits, but the step
    # depends on timing). N: exactly N steps after its refresh started, the trainer waiting for a late builder, so a
    # run is repeatable and --resume exact
    swap_after: int = 0

    def __post_init__(self) -> None:
        _check("refresh", self, at_least={"every": 1, "threads": 1, "keep": 1, "max_failures": 1, "swap_after": 0},
               choices={"mode": REFRESH_MODES})
        if self.swap_after > self.every:  # one refresh in flight at a time
            raise ConfigError(f"refresh.swap_after ({self.swap_after}) must not exceed refresh.every ({self.every})")


@dataclass(frozen=True)
class IctConfig:
    run_dir: str = "runs/ict"
    steps: int = 200
    batch_size: int = 32  # in-batch negatives: batch_size - 1 per query (ORQA: 4096)
    lr: float = 5e-5
    query_len: int = 64
    remove_prob: float = 0.9  # the sentence is removed from its block with this probability
    attention_dropout: float = 0.1  # BERT's 0.1 (the paper); 0 lets CPU attention use torch's fused kernel (steps ~10 % faster)
    pca_blocks: int = 2048  # before step 1, the projection is fitted to the principal directions of this many blocks (0: keep it random)
    eval_blocks: int = 1000  # held-out blocks for the pseudo-query recall@k
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        _check("ict", self, at_least={"steps": 1, "batch_size": 2, "query_len": 3, "pca_blocks": 0, "eval_blocks": 2,
                                      "save_every": 1},
               positive=("lr",), fractions=("remove_prob", "attention_dropout"))


@dataclass(frozen=True)
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    init_from: str = ""  # a run folder (ICT or pre-training) whose latest checkpoint gives the starting weights
    steps: int = 200
    batch_size: int = 4
    # queries per forward/backward pass, the gradients summed over a step's passes (0: the whole batch in one):
    # the paper's batch of 512 in the memory of a few queries, the same step (README, "Batch")
    micro_batch_size: int = 0
    lr: float = 3e-5
    head_lr_scale: float = 10.0  # the MLM head's transform is newly initialised: it learns at lr * this
    retriever_lr_scale: float = 1.0  # the retriever learns at lr * this (< 1 guards an ICT warm start in short runs)
    attention_dropout: float = 0.1  # BERT's 0.1 (the paper); 0 lets CPU attention use torch's fused kernel (steps ~10 % faster)
    warmup_steps: int = -1  # -1: the paper's min(10k, max(100, steps/10))
    weight_decay: float = 0.01
    top_k: int = 8  # candidates per query, the null block included (1: the null block alone, the no-retrieval control)
    query_len: int = 96
    max_masks: int = 10
    masking: str = "salient"  # salient | random-uniform | random-span
    # train only on the salient spans that the starting retriever finds in one of a query's top_k - 1 candidate
    # blocks, so that every query can be answered by reading (README, "How pre-training works"); held-out
    # evaluation keeps every span
    require_evidence: bool = False
    marginal: str = "per-token"  # per-token (released code) | paper (product over masks inside the sum over z)
    retrieval_scale: float = 0.1  # f(x, z) = scale * q.d, the scale learned at the head's rate (models/embedder.py)
    heldout_every: int = 20  # every 20th block (by id hash) is held out of training, for evaluation
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        # top_k counts the null block; heldout_every = 1 would hold out every block
        _check("pretrain", self, at_least={"steps": 1, "batch_size": 1, "micro_batch_size": 0, "head_lr_scale": 0,
                                           "retriever_lr_scale": 0, "warmup_steps": -1, "weight_decay": 0, "top_k": 1,
                                           "query_len": 3, "max_masks": 1, "heldout_every": 2, "save_every": 1},
               positive=("lr", "retrieval_scale"), fractions=("attention_dropout",),
               choices={"masking": MASKING_MODES, "marginal": MARGINALS})
        if self.require_evidence and self.masking != "salient":
            raise ConfigError("pretrain.require_evidence needs pretrain.masking = \"salient\"")
        if self.require_evidence and self.top_k == 1:
            raise ConfigError("pretrain.require_evidence needs candidates to find evidence in: pretrain.top_k >= 2")


@dataclass(frozen=True)
class ReaderConfig:
    top_k: int = 5  # blocks read per question at fine-tuning and inference (ORQA / REALM: 5)
    max_len: int = 320  # [CLS] question [SEP] title [SEP] body [SEP] is cut to this many wordpieces
    question_len: int = 64  # wordpieces of the question kept
    span_hidden: int = 256  # hidden size of the span scorer
    max_span_len: int = 10  # wordpieces per answer span
    batch_questions: int = 8  # questions per reader forward at inference (k rows each). On a CPU the rows run in
    # groups of similar length (models/by_length.py): 8 read the real corpus 10-20 % faster than 1 (answer_throughput)
    int8: bool = False  # inference only: the reader's linear layers in dynamic int8 (faster on CPU; see answer_throughput)
    # inference only: `realm serve` and `realm eval qa` compile the reader's encoder (torch.compile) before answering:
    # about 10 s once; faster on long fixed-length inputs, not measurably on the real corpus (see answer_throughput)
    compile: bool = False

    def __post_init__(self) -> None:
        _check("reader", self, at_least={"top_k": 1, "max_len": 8, "question_len": 1, "span_hidden": 1,
                                         "max_span_len": 1, "batch_questions": 1})


@dataclass(frozen=True)
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    init_from: str = ""  # a pre-training (retriever + reader from its encoder), ICT (retriever) or fine-tuning run; "" = MiniLM
    retriever: str = "realm"  # realm (dense, from init_from) | bm25 (fixed; the reader alone learns)
    train_query_tower: bool = True  # False: the retriever stays as given, only the reader learns
    questions: str = ""  # SQuAD JSON or JSONL {"question", "answers"}; "" = the Open-SQuAD train split of eval.squad
    max_questions: int = 0  # use only the first N training questions (0: all)
    steps: int = 300
    batch_size: int = 8  # questions per step
    reader_blocks: int = 0  # blocks the reader reads per question while training: the best-ranked one with an
    # answer + the highest-ranked others (DPR's sampling; cuts the cost on a CPU); 0 = all top_k (ORQA / REALM)
    lr: float = 1e-5  # ORQA / REALM
    head_lr_scale: float = 10.0  # the span scorer is newly initialised: it learns at lr * this
    query_lr_scale: float = 1.0  # the query tower learns at lr * this (< 1 when lr is raised for a small reader)
    warmup_steps: int = -1  # -1: steps / 10
    weight_decay: float = 0.01
    retriever_loss_weight: float = 1.0  # weight of the retriever's marginal loss beside the reader's
    # what the reader trains on, and so what its loss does to the query tower: "joint" (ORQA / REALM) the trained
    # tower's blocks and retrieval logits, its loss training the tower too through p(z|x); "detached" the same blocks
    # and logits taken as given, the tower learning from the retriever's loss alone; "initial" the blocks and logits
    # of the query tower as the run started (a frozen copy), the trained tower learning from the retriever's loss
    reader_retrieval: str = "joint"
    retrieval_scale: float = 0.1  # dense runs: f(x, z) = scale * q.d, the scale learned at the head's rate (models/embedder.py)
    attention_dropout: float = 0.1  # BERT's 0.1 (the paper); 0 lets CPU attention use torch's fused kernel (steps ~10 % faster)
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        _check("finetune", self, at_least={"max_questions": 0, "steps": 1, "batch_size": 1, "reader_blocks": 0,
                                           "head_lr_scale": 0, "query_lr_scale": 0, "warmup_steps": -1,
                                           "weight_decay": 0, "retriever_loss_weight": 0, "save_every": 1},
               positive=("lr", "retrieval_scale"), fractions=("attention_dropout",),
               choices={"retriever": FINETUNE_RETRIEVERS, "reader_retrieval": READER_RETRIEVALS})


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (1, 5, 20)
    squad: str = "data/squad_v1.1_dev.json"  # questions of the Open-SQuAD splits come from here
    regex_answers: bool = False  # answers are regular expressions (CuratedTrec): in recall, EM, fine-tuning's gold

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"eval.ks must be a non-empty list of k >= 1, not {list(self.ks)!r}")


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0  # torch intra-op threads; 0 = all cores (under torchrun: shared among this machine's processes)
    device: str = "auto"  # "auto" (the GPU when there is one), "cpu", "cuda", "cuda:1", ...
    # "auto": bf16 autocast where the hardware multiplies bf16 in silicon (GPUs; CPUs with AMX or AVX512-BF16), else
    # fp32. "fp32" or "bf16" force one (bf16 is emulated, slower than fp32, on CPUs without). Weights and optimizer
    # state stay fp32.
    precision: str = "auto"

    def __post_init__(self) -> None:
        _check("runtime", self, at_least={"threads": 0}, choices={"precision": PRECISIONS})


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    ict: IctConfig = field(default_factory=IctConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check ``value`` against the annotated type, converting only where it is lossless."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a table, got {value!r}")
            kwargs[name] = _build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, where + name)
    return cls(**kwargs)


def _parse_override_value(text: str) -> Any:
    """``--set a.b=3`` / ``=true`` / ``=[1,5]`` / ``="x"`` parse as TOML; anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the TOML preset at ``path``, then ``section.key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        nested: dict[str, Any] = {}
        cursor = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = _parse_override_value(raw.strip())
        values = _merge(values, nested)
    return _build(RunConfig, values, "")


# Keys that configs stored by earlier versions may hold and that no longer do anything: a run folder saved before a
# field was removed still loads. Presets and overrides still refuse them as unknown.
RETIRED_KEYS = {("pretrain", "log_every")}
# Keys that such configs may hold under an old name: (section, old key) -> (new key, the old value as the new one's).
RENAMED_KEYS = {
    ("finetune", "reader_loss_to_query"): ("reader_retrieval", lambda to_query: "joint" if to_query else "detached"),
}


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """The inverse of :func:`config_to_dict` (a config stored with an artifact)."""
    values = {section: (dict(_stored_key(section, k, v) for k, v in table.items() if (section, k) not in RETIRED_KEYS)
                        if isinstance(table, dict) else table) for section, table in values.items()}
    return _build(RunConfig, values, "")


def _stored_key(section: str, key: str, value: Any) -> tuple[str, Any]:
    """A stored config's (key, value) under its current name (RENAMED_KEYS)."""
    if (section, key) not in RENAMED_KEYS:
        return key, value
    new_key, convert = RENAMED_KEYS[section, key]
    return new_key, convert(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists) of a config dataclass."""
    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    return convert(dataclasses.asdict(cfg))


def run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a training run saved beside its checkpoints."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no config.json)")
    try:
        return config_from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): the run folder is damaged") from err
