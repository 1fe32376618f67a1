"""``curves.png``: the training and held-out loss of a run against steps."""

from __future__ import annotations

from typing import Any

from examples.common.metrics import Metrics
from examples.lm.train import Config


def curves_figure(records: list[Metrics], config: Config, state_bytes: float) -> Any:
    """A ``Figure`` of its own, outside pyplot, so that drawing it leaves the caller's
    backend alone (a notebook keeps showing its plots)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    steps = [record["step"] for record in records]
    ax.plot(steps, [record["train_loss"] for record in records], label="train")
    ax.plot(steps, [record["held_out_loss"] for record in records], label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    model = config.model
    ax.set_title(
        f"{config.optimizer}, {model.layers} blocks, d = {model.d_model}; "
        f"state {state_bytes:.2f} bytes/param",
        fontsize=10,
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
