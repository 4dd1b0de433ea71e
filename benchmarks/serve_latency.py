"""`realm serve` latency: questions asked one per HTTP request vs the same questions answered in-process, one run.

    .venv/bin/python benchmarks/serve_latency.py [--from runs/cpu/qa-d] [--config configs/openqa_cpu.toml] [--questions 50]

Starts `realm serve` (a uvicorn process), waits for GET /health, asks the first N Open-SQuAD dev questions one after
the other (POST /ask, k = reader.top_k, 3 answers) and times each request at the client; stops the server, then
answers the same questions in this process with `Answerer.answer` one at a time. The server also reports its own
time for each answer, which separates HTTP from answering. Three warm-up questions before
each timed series. Median and 95th percentile; run it with nothing else running.
Writes benchmarks/results/serve_latency.json.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from realm_lm.answer import Answerer
from realm_lm.config import load_config
from realm_lm.corpus.questions import load_questions
from realm_lm.report import markdown_table, write_results
from realm_lm.runtime import setup_runtime


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_for(url: str, server: subprocess.Popen, seconds: float = 300) -> dict:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None:
                raise SystemExit(f"realm serve exited with {server.returncode}")
            if time.time() > deadline:
                raise SystemExit(f"realm serve did not answer {url} within {seconds:.0f} s")
            time.sleep(0.5)


def summary(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="run", default="runs/cpu/qa-d", help="a `realm finetune` run")
    ap.add_argument("--config", default="configs/openqa_cpu.toml")
    ap.add_argument("--questions", type=int, default=50)
    args = ap.parse_args()
    cfg = load_config(args.config)
    questions = [q.question for q in load_questions(cfg.eval.squad, "dev")[:args.questions + 3]]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "realm_lm.cli", "serve", "--config", args.config, "--from", args.run,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(f"{base}/health", server)
        startup_s = time.perf_counter() - t0
        http, inside = [], []
        for i, question in enumerate(questions):
            t = time.perf_counter()
            out = post(f"{base}/ask", {"question": question, "n": 3})
            if i >= 3:
                http.append(time.perf_counter() - t)
                inside.append(out["seconds"])  # the server's own time for the answer
    finally:
        server.terminate()
        server.wait(timeout=60)

    setup_runtime(cfg)
    answerer = Answerer.from_run(args.run, cfg)
    local = []
    for i, question in enumerate(questions):
        t = time.perf_counter()
        answerer.answer([question], top_n=3)
        if i >= 3:
            local.append(time.perf_counter() - t)

    (h50, h95), (s50, s95), (l50, l95) = summary(http), summary(inside), summary(local)
    print(markdown_table(["path", "questions", "median ms", "p95 ms"],
                         [["POST /ask (realm serve, one request at a time), at the client", len(http), f"{h50:.1f}", f"{h95:.1f}"],
                          ["  of which answering inside the server", len(inside), f"{s50:.1f}", f"{s95:.1f}"],
                          ["Answerer.answer in-process (main thread), batch 1", len(local), f"{l50:.1f}", f"{l95:.1f}"]]))
    print(f"server start-up until /health answered: {startup_s:.1f} s")
    path = write_results("serve_latency", {
        "run": args.run, "config": args.config, "blocks": health["blocks"], "top_k": health["top_k"],
        "questions": len(http), "startup_s": round(startup_s, 2), "http.median_ms": round(h50, 2),
        "http.p95_ms": round(h95, 2), "server_side.median_ms": round(s50, 2), "server_side.p95_ms": round(s95, 2),
        "in_process.median_ms": round(l50, 2), "in_process.p95_ms": round(l95, 2),
        "threads_env": os.environ.get("OMP_NUM_THREADS", "")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
