"""Hugging Face's REALM port in ../shared/bench/hf_realm, the side-by-side reference of the speed benchmarks.

Its scripts run in their own venv (its setup.sh; transformers < 5, where REALM still exists) and write their
figures to a JSON file; the CPU's fp32 matmul peak (cpu_peak.py) is measured in the same run, for MFU.
"""

import json
import os
import subprocess
import tempfile
from pathlib import Path

HF_BENCH = Path("../shared/bench/hf_realm")
HF_PYTHON = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf-realm-bench/venv/bin/python"


def run_json(cmd: list[str]) -> dict:
    """Run one of the reference's scripts and return the JSON it writes to --out."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([*cmd, "--out", out.name], check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def cpu_peak_gflops(python: str, threads: int) -> float:
    """The median fp32 matmul peak of this CPU with `threads` threads, in GFLOP/s."""
    peak = run_json([python, str(HF_BENCH / "cpu_peak.py"), "--threads", str(threads)])
    return peak["peak_median_gflops_by_threads"][str(threads)]
