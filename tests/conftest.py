from pathlib import Path

import pytest
import torch

from realm_lm.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

torch.set_num_threads(1)


def tiny_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"corpus.inputs=[\"{FIXTURES / 'tiny_docs.jsonl'}\"]",
            f"corpus.store={tmp_path / 'corpus'}",
            f"embedder.model={FIXTURES / 'tiny-bert'}",
            f"index.dir={tmp_path / 'index'}",
            f"encoder.model={FIXTURES / 'tiny-bert'}",
            f"ict.run_dir={tmp_path / 'ict'}",
            f"pretrain.run_dir={tmp_path / 'pretrain'}",
            f"finetune.run_dir={tmp_path / 'finetune'}",
            f"finetune.questions={FIXTURES / 'tiny_qa.jsonl'}",
            *extra]


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> RunConfig:
    return load_config(ROOT / "configs" / "tiny.toml", tiny_overrides(tmp_path))
