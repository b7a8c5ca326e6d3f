"""`tuneserve jobs plot`: training loss over steps, with the test-split loss of the before/after evaluation, and
what a preference or reward trainer logged per step (DPO's rewards and margins, GRPO's reward) in a second panel."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LossCurve:
    """What one plot shows: training loss per step and, when the job was evaluated, the test loss."""

    job_id: str
    adapter: str | None
    train: list[tuple[int, float]]
    eval: list[tuple[int, float]] = field(default_factory=list)  # loss events the trainer logged on eval
    test_base: float | None = None  # the report's "loss" metric: base model, before training
    test_adapter: float | None = None  # ... and with the adapter, after training
    last_step: int | None = None
    # Per-step trainer metrics worth a curve (PLOTTED_METRICS), by name: DPO/KTO/ORPO rewards, GRPO's reward.
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


PLOTTED_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "reward",
    "kl",
)


def loss_curve(job: dict[str, Any], events: list[dict[str, Any]], report: dict[str, Any] | None) -> LossCurve:
    """Pick the points from the job, its events (oldest first) and its report (None if there is none)."""
    train: list[tuple[int, float]] = []
    evaluation: list[tuple[int, float]] = []
    for e in events:
        if e.get("loss") is None or e.get("step") is None:
            continue
        (evaluation if "eval" in str(e.get("type", "")) else train).append((int(e["step"]), float(e["loss"])))
    metrics: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        for name, value in (e.get("metrics") or {}).items():
            if name in PLOTTED_METRICS and e.get("step") is not None:
                metrics.setdefault(name, []).append((int(e["step"]), float(value)))
    curve = LossCurve(
        job_id=job["id"],
        adapter=job.get("fine_tuned_model"),
        train=train,
        eval=evaluation,
        last_step=job["progress"].get("total_steps") or (train[-1][0] if train else None),
        metrics=metrics,
    )
    for metric in (report or {}).get("metrics", []):
        if metric.get("name") == "loss":
            curve.test_base, curve.test_adapter = metric.get("base"), metric.get("adapter")
    return curve


def save_loss_plot(curve: LossCurve, out: Path) -> None:
    """Write the curve as an image (the format follows the file's suffix: png, svg, pdf)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    panels = 2 if curve.metrics else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 4.5 * panels), dpi=100, squeeze=False)
    ax = axes[0][0]
    try:
        steps, losses = zip(*curve.train, strict=True)
        ax.plot(steps, losses, marker="." if len(steps) < 50 else None, label="training loss")
        if curve.eval:
            ax.plot(*zip(*curve.eval, strict=True), marker="o", linestyle="--", label="evaluation loss")
        if curve.test_base is not None:
            ax.scatter([0], [curve.test_base], marker="s", color="tab:red", zorder=3, label="test loss, base model")
        if curve.test_adapter is not None:
            ax.scatter(
                [curve.last_step or steps[-1]],
                [curve.test_adapter],
                marker="*",
                s=120,
                color="tab:green",
                zorder=3,
                label="test loss, with adapter",
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(f"{curve.job_id}" + (f" -> {curve.adapter}" if curve.adapter else ""))
        ax.grid(True, alpha=0.3)
        ax.legend()
        if curve.metrics:
            side = axes[1][0]
            for name in PLOTTED_METRICS:
                if name in curve.metrics:
                    side.plot(*zip(*curve.metrics[name], strict=True), marker=".", label=name)
            side.axhline(0.0, color="grey", linewidth=0.5)
            side.set_xlabel("optimizer step")
            side.set_ylabel("trainer metric")
            side.grid(True, alpha=0.3)
            side.legend()
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    finally:
        plt.close(fig)
