"""`realm plot RUN_DIR`: a PNG of a run's metrics log against steps."""

from __future__ import annotations

from pathlib import Path

from realm_lm.train.checkpoint import MetricsLogError, read_metrics_log

PANELS = {  # metric key -> panel title; panels whose key the log lacks are skipped
    "loss": "loss (-log marginal likelihood)",
    "mask_acc": "masked-token accuracy",
    "ru_top": "retrieval utility of the top block",
    "staleness": "index staleness (steps)",
    "in_batch_acc": "ICT in-batch accuracy",
    "reader_loss": "reader loss (-log p of the gold spans)",
    "retriever_loss": "retriever loss (-log p of the blocks with an answer)",
    "answer_in_topk": "questions with an answer in the top-k blocks",
    "top_span_correct": "best span is a gold answer (questions read, training batch)",
}


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log = run_dir / "metrics.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{log} not found: is {run_dir} a training run folder?")
    rows = read_metrics_log(run_dir)
    if not rows:
        raise MetricsLogError(f"{log} holds no step yet")
    panels = [(k, t) for k, t in PANELS.items() if k in rows[0]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 25)
    for ax, (key, title) in zip(axes[:, 0], panels):
        values = [float(r[key]) for r in rows]
        ax.plot(steps, values, color="C0" if key == "staleness" else "0.8", lw=0.8)
        if key != "staleness":
            ax.plot(steps, smooth(values, window), color="C0", lw=1.5, label=f"mean of {window}")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if key == "staleness":
            for r in rows:
                if r.get("swapped"):
                    ax.axvline(r["step"], color="C1", lw=0.6, alpha=0.6)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
