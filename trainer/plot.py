"""``python -m trainer plot RUN_DIR``: the loss curve as PNG, checkpoints and resumes marked."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def split_segments(records: list[dict]) -> list[list[dict]]:
    """Step records grouped by process lifetime: a ``resume`` event starts a new segment."""
    segments: list[list[dict]] = [[]]
    for rec in records:
        if rec.get("event") == "resume":
            segments.append([])
        elif "loss" in rec and "step" in rec and "event" not in rec:
            segments[-1].append(rec)
    return [s for s in segments if s]


def plot_run(run_dir: str, out: str | None = None) -> Path:
    """Render ``RUN_DIR/metrics.jsonl`` to ``RUN_DIR/loss.png`` (or ``out``); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, seg in enumerate(split_segments(records)):
        ax.plot([r["step"] for r in seg], [r["loss"] for r in seg], lw=1.2,
                label="train loss" if i == 0 else f"train loss (after resume {i})")
    val = [r for r in records if r.get("event") == "val"]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", ms=4, label="val loss")
    ckpts = sorted({r["step"] for r in records if r.get("event") == "checkpoint"})
    for j, s in enumerate(ckpts):
        ax.axvline(s, color="tab:green", ls=":", lw=0.8, label="checkpoint" if j == 0 else None)
    resumes = [r["step"] for r in records if r.get("event") == "resume"]
    for j, s in enumerate(resumes):
        ax.axvline(s, color="tab:red", ls="--", lw=1.2, label="resume" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{Path(run_dir).name}: {len(ckpts)} checkpoints, {len(resumes)} resume(s)")
    ax.legend()
    path = Path(out) if out else Path(run_dir) / "loss.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
