"""``blt-decode train plot RUN_DIR ...``: loss curves and held-out bits-per-byte of training runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from blt_decode.checks import loads_json
from blt_decode.errors import TrainingError, install_hint
from blt_decode.training.loop import LOG_FILE


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (one per step), in order."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise TrainingError(f"{run_dir} holds no {LOG_FILE}: not a training run directory")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(loads_json(line))
            except ValueError as exc:
                raise TrainingError(f"{path}:{number} is {exc}") from None
    if not records:
        raise TrainingError(f"{path} is empty")
    return records


def plot_runs(run_dirs: Sequence[str | Path], png: str | Path | None = None) -> Path:
    """One PNG: training loss (with the clean and diffusion terms of BLT-D runs) against training bytes,
    and held-out bits-per-byte where evaluated, one colour per run. Needs matplotlib (the ``bench`` or
    ``test`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainingError(f"train plot needs matplotlib: {install_hint('bench')}") from None
    logs = [(Path(d), read_log(d)) for d in run_dirs]
    out = Path(png) if png else Path(run_dirs[0]) / "loss.png"
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, (run, records) in enumerate(logs):
        colour = f"C{index}"
        x = [r["bytes_seen"] / 1e6 for r in records]
        ax_loss.plot(x, [r["loss"] for r in records], color=colour, label=f"{run.name}: loss")
        for key, style in (("clean", "--"), ("diffusion", ":")):
            if key in records[0]:
                ax_loss.plot(x, [r[key] for r in records], color=colour, linestyle=style, alpha=0.7,
                             label=f"{run.name}: {key} term")
        evals = [r for r in records if "heldout_bpb" in r]
        kinds = sorted({k for r in evals for k in r["heldout_bpb"]})
        for k_index, kind in enumerate(kinds):
            points = [(r["bytes_seen"] / 1e6, r["heldout_bpb"][kind]) for r in evals if kind in r["heldout_bpb"]]
            ax_eval.plot(*zip(*points), color=colour, marker="os^vD"[k_index % 5], label=f"{run.name}: {kind}")
    ax_loss.set(xlabel="training bytes (millions)", ylabel="loss (nats)", title="training loss")
    ax_eval.set(xlabel="training bytes (millions)", ylabel="bits per byte", title="held-out bits per byte")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
