"""The `realm` command end to end on the tiny corpus, and bad input giving a clear error and exit code 2."""

import json

import pytest

from realm_lm.cli import main
from realm_lm.index.versioned import latest_version, read_manifest
from realm_lm.train.checkpoint import latest_checkpoint

from conftest import FIXTURES, ROOT, tiny_overrides


def realm(tmp_path, *argv, extra=()):
    """`realm ARGV... --config tiny.toml --set ...` with the tiny corpus and index under tmp_path."""
    sets = [x for o in tiny_overrides(tmp_path, *extra) for x in ("--set", o)]
    return main([*argv, "--config", str(ROOT / "configs" / "tiny.toml"), *sets])


def test_end_to_end(tmp_path, capsys):
    assert realm(tmp_path, "corpus", "build") == 0
    assert realm(tmp_path, "index", "build") == 0
    assert realm(tmp_path, "index", "build", "--set", "index.backend=faiss-hnsw") == 0
    out = capsys.readouterr().out
    assert "v000001" in out and "v000002" in out and "0 blocks embedded" in out and "36 reused" in out
    assert realm(tmp_path, "retrieve", "who built the tower", "-k", "3") == 0
    out = capsys.readouterr().out
    assert out.count("  [") == 3 and "Q: who built the tower" in out
    assert realm(tmp_path, "retrieve", "who built the tower", "-k", "2", "--retriever", "bm25") == 0
    assert "Q: who built" in capsys.readouterr().out
    # nothing for BM25 to search for: an error, not blocks that all scored 0
    assert realm(tmp_path, "retrieve", "??? of the", "-k", "2", "--retriever", "bm25") == 2
    assert "has no word BM25 can search for" in capsys.readouterr().err


def test_help_on_every_verb(capsys):
    for verb in (["data", "fetch"], ["corpus", "build"], ["index", "build"], ["retrieve"], ["eval", "retrieval"],
                 ["eval", "qa"], ["finetune"], ["ask"], ["demo"]):
        with pytest.raises(SystemExit) as exit_:
            main([*verb, "--help"])
        assert exit_.value.code == 0
    assert "--set" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("realm-lm 0.")


def test_runs_from_a_source_tree_without_package_metadata(monkeypatch, capsys):
    """`python -m realm_lm.cli` with src/ on PYTHONPATH and no installed package, as on a rented GPU machine."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and "not installed" in capsys.readouterr().out


def test_missing_index_gives_exit_2(tmp_path, capsys):
    assert realm(tmp_path, "corpus", "build") == 0
    assert realm(tmp_path, "retrieve", "anything") == 2
    assert "no index at" in capsys.readouterr().err


def test_empty_question_gives_exit_2(tmp_path, capsys):
    assert realm(tmp_path, "corpus", "build") == 0
    assert realm(tmp_path, "index", "build") == 0
    assert realm(tmp_path, "retrieve", "   ") == 2
    assert "question is empty" in capsys.readouterr().err


def test_malformed_input_gives_exit_2_and_no_store(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "title": "T", "text": "ok"}) + "\n[1, 2]\n")
    assert realm(tmp_path, "corpus", "build", extra=[f'corpus.inputs=["{bad}"]']) == 2
    assert "bad.jsonl:2: expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


def test_unknown_override_gives_exit_2(tmp_path, capsys):
    assert realm(tmp_path, "corpus", "build", extra=["corpus.blok_len=3"]) == 2
    assert "unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["ask", "Who?", "--from", "run", "-k", "0"], "argument -k: must be from 1 to 100, not 0"),
    (["ask", "Who?", "--from", "run", "-k", "100000"], "argument -k: must be from 1 to 100"),  # once read every block
    (["ask", "Who?", "--from", "run", "-n", "-3"], "argument -n: must be from 1 to 50, not -3"),  # once showed all
    (["eval", "qa", "--from", "run", "--limit", "-5"], "argument --limit: must be >= 0"),  # once dropped the last 5
    (["retrieve", "Who?", "-k", "two"], "argument -k: expected an integer, got 'two'"),
])
def test_counts_out_of_range_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_ict_pretrain_resume_plot(tmp_path, capsys):
    assert realm(tmp_path, "corpus", "build") == 0
    assert realm(tmp_path, "ict", "--resume") == 0  # nothing to resume yet: said, and a fresh run
    captured = capsys.readouterr()
    assert "ict_recall@1" in captured.out and "no checkpoint in" in captured.err
    assert realm(tmp_path, "pretrain", "--set", "pretrain.steps=2") == 0
    assert realm(tmp_path, "pretrain", "--resume", "--set", "pretrain.steps=3") == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 3:" in out
    # the same command without --resume would replace the run: refused, the run untouched, unless --overwrite
    run = tmp_path / "pretrain"
    log_before = (run / "metrics.jsonl").read_text()
    assert realm(tmp_path, "pretrain", "--set", "pretrain.steps=3") == 2
    assert "already holds a run (checkpoint step_0000003)" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == log_before and latest_checkpoint(run).name == "step_0000003"
    assert realm(tmp_path, "pretrain", "--overwrite", "--set", "pretrain.steps=1") == 0
    assert "step 1:" in capsys.readouterr().out
    # the old run's checkpoints are gone from its first save, not left beside its own (step 3 would outrank step 1)
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    png = tmp_path / "pretrain" / "metrics.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    log = tmp_path / "pretrain" / "metrics.jsonl"
    first, *rest = log.read_text().splitlines(keepends=True)
    log.write_text(first + "{not json\n" + "".join(rest))
    assert main(["plot", str(tmp_path / "pretrain")]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err
    assert realm(tmp_path, "eval", "retrieval", "--split", "dev", "--from", str(tmp_path / "pretrain"),
                 "--set", f"eval.squad={tmp_path / 'missing.json'}") == 2
    assert "missing.json not found" in capsys.readouterr().err


def test_eval_retrieval_and_finetune_on_a_question_file_with_literal_or_regex_answers(tmp_path, capsys):
    """A retriever's recall on one's own questions, before any fine-tuning: escaped patterns score as the literal
    answers do, and a pattern that does not compile is an error naming its question."""
    import re

    assert realm(tmp_path, "corpus", "build") == 0
    literal = [json.loads(line) for line in (FIXTURES / "tiny_qa.jsonl").read_text().splitlines()]
    patterns = tmp_path / "regex_qa.jsonl"
    patterns.write_text("".join(json.dumps({**q, "answers": [re.escape(a) for a in q["answers"]]}) + "\n"
                                for q in literal))
    figures = []
    for questions, extra in ((FIXTURES / "tiny_qa.jsonl", ()), (patterns, ("--regex",))):
        out = tmp_path / f"{questions.stem}.json"
        assert realm(tmp_path, "eval", "retrieval", "--retriever", "bm25", "--questions", str(questions),
                     "--json", str(out), *extra) == 0
        figures.append({k.split(".")[-1]: v for k, v in json.loads(out.read_text()).items() if "recall@" in k})
    assert figures[0] == figures[1] and figures[0]["recall@5"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q9", "question": "When?", "answers": ["19(37"]}) + "\n")
    assert realm(tmp_path, "eval", "retrieval", "--retriever", "bm25", "--questions", str(bad), "--regex") == 2
    assert "question 'q9': answer '19(37' is not a valid regular expression" in capsys.readouterr().err
    assert realm(tmp_path, "finetune", "--questions", str(bad), "--regex") == 2  # fine-tuning takes both options
    assert "question 'q9': answer '19(37' is not a valid regular expression" in capsys.readouterr().err

def test_a_run_trained_further_gets_a_fresh_index_not_the_stale_one(tmp_path, capsys):
    """A run's own index (RUN/eval-index-*) is keyed by the weights that embedded it, not by "a version exists": after
    `--resume` trains the towers further, retrieval from the run re-embeds instead of searching stale vectors."""
    assert realm(tmp_path, "corpus", "build") == 0
    assert realm(tmp_path, "ict") == 0
    ict = str(tmp_path / "ict")
    assert realm(tmp_path, "retrieve", "Who built Aldermoor?", "--from", ict) == 0  # builds the run's index
    (index_dir,) = (tmp_path / "ict").glob("eval-index-*")
    first = latest_version(index_dir)
    assert realm(tmp_path, "retrieve", "Who built Aldermoor?", "--from", ict) == 0
    assert latest_version(index_dir) == first  # same weights: the same index
    assert realm(tmp_path, "ict", "--resume", "--set", "ict.steps=5") == 0
    assert realm(tmp_path, "retrieve", "Who built Aldermoor?", "--from", ict) == 0
    assert latest_version(index_dir) != first
    manifest = read_manifest(index_dir)
    assert manifest["embedder_weights_sha256"] != read_manifest(index_dir, first)["embedder_weights_sha256"]
    # an index built by `realm index build` is not rebuilt behind the user's back: other towers are an error
    assert realm(tmp_path, "index", "build") == 0
    capsys.readouterr()
    assert realm(tmp_path, "retrieve", "Who built Aldermoor?", "--set", "embedder.seed=1") == 2
    assert "embedded by other document-tower weights" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_after_the_step_under_way(tmp_path):
    """The first Ctrl-C (SIGINT) finishes the step, saves it and exits 130; --resume then continues from there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = [x for o in tiny_overrides(tmp_path, "ict.steps=400", "ict.save_every=1000") for x in ("--set", o)]
    cmd = [sys.executable, "-m", "realm_lm.cli", "ict", "--config", str(ROOT / "configs" / "tiny.toml"), *overrides]
    assert realm(tmp_path, "corpus", "build") == 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    log = tmp_path / "ict" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert 3 <= steps[-1] < 400 and latest_checkpoint(tmp_path / "ict").name == f"step_{steps[-1]:07d}"
    assert f"stopped at step {steps[-1]} with checkpoint" in err
    resumed = subprocess.run([*cmd, "--resume", "--set", f"ict.steps={steps[-1] + 2}"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, steps[-1] + 3))


def test_every_error_of_the_package_is_one_the_cli_reports_without_a_traceback():
    """`realm` turns a RealmError into a message and exit code 2; an error class that forgot the base would reach the
    user as a traceback."""
    import importlib
    import inspect
    import pkgutil

    import realm_lm
    from realm_lm.errors import RealmError

    found = []
    for module in pkgutil.walk_packages(realm_lm.__path__, "realm_lm."):
        if module.name.endswith("__main__"):
            continue
        for _, cls in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(cls, Exception) and cls.__module__ == module.name:
                found.append(cls)
    assert len(found) >= 16 and [c for c in found if not issubclass(c, RealmError)] == []
