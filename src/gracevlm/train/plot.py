"""Loss curves of a training log (``log.jsonl``) as a PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

PANELS = (("loss", "ce"), ("gdkd",), ("rcka",), ("beta", "omega"), ("lr",))


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path | None:
    """Plot every available curve of ``log_path`` into ``png_path``; returns the path (None: empty log).

    Raises ImportError when matplotlib is missing (it is an optional dependency: ``gracevlm[plot]``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        return None
    panels = [keys for keys in PANELS if any(k in r for r in records for k in keys)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for ax, keys in zip(axes[:, 0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1.0)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(title or Path(log_path).parent.name)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
