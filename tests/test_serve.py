"""`realm serve`: a real uvicorn server in its own process, asked over HTTP."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from realm_lm.cli import main as realm_main

from conftest import ROOT, tiny_overrides


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_answers_with_evidence_over_http_and_refuses_bad_questions(tmp_path, capsys):
    sets = [x for o in tiny_overrides(tmp_path, "reader.top_k=4", "reader.compile=true") for x in ("--set", o)]
    config = ["--config", str(ROOT / "configs" / "tiny.toml"), *sets]
    assert realm_main(["corpus", "build", *config]) == 0
    assert realm_main(["finetune", *config]) == 0
    with socket.socket() as taken:  # a port in use is refused before anything loads
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert realm_main(["serve", *config, "--from", str(tmp_path / "finetune"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    server = subprocess.Popen([sys.executable, "-m", "realm_lm.cli", "serve", *config, "--from", str(tmp_path / "finetune"),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []  # until "answering from RUN over STORE (N blocks) at http://HOST:PORT: ..." (or the server exits)
        while not lines or not (lines[-1].startswith("answering from") or lines[-1] == ""):
            lines.append(server.stdout.readline())
        assert lines[-1].startswith("answering from"), "".join(lines)[-3000:]
        assert any(line.startswith("compiled in ") for line in lines), "".join(lines)[-3000:]  # reader.compile
        base = lines[-1].split(" at ", 1)[1].split(": POST", 1)[0]  # --port 0: the port the system chose
        deadline = time.time() + 120
        while True:
            try:
                status, health = call(f"{base}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stdout.read()[-3000:]
                assert time.time() < deadline, "the server did not come up in 120 s"
                time.sleep(0.5)
        assert status == 200 and health["status"] == "ok" and health["blocks"] > 0 and health["retriever"] == "realm"

        status, out = call(f"{base}/ask", {"question": "Who built Aldermoor?", "n": 2})
        assert status == 200 and out["question"] == "Who built Aldermoor?"
        assert 1 <= len(out["answers"]) <= 2 and len(out["retrieved"]) == 4
        retrieved = {h["block_id"] for h in out["retrieved"]}
        for a in out["answers"]:
            assert 0 < a["probability"] <= 1 and a["block_id"] in retrieved and 1 <= a["block_rank"] <= 4
            if a["char_start"] >= 0:  # the span is the answer's text in the evidence block
                assert a["evidence"][a["char_start"]:a["char_end"]] == a["answer"]

        status, out = call(f"{base}/ask", {"question": "Who built Aldermoor?", "k": 100})  # k > the corpus
        assert status == 200 and len(out["retrieved"]) == health["blocks"]

        status, out = call(f"{base}/ask", {"question": "   "})
        assert status == 400 and "empty" in out["detail"]
        status, out = call(f"{base}/ask", {"question": "why " * 25_000})
        assert status == 400 and "characters" in out["detail"]
        status, out = call(f"{base}/ask", {"n": 3})  # no question field
        assert status == 422
        status, out = call(f"{base}/ask", {"question": "Who built Aldermoor?", "k": 0})
        assert status == 422
    finally:
        server.terminate()
        server.wait(timeout=30)
