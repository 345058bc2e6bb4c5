"""Metrics as JSON lines, and PNG plots of them.

Where it sits: every training stage appends one object per step to `<run>/metrics.jsonl`
and redraws `<run>/plots/*.png` at checkpoints. On resume, lines past the resumed step are
dropped so the file always describes one consistent history.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ownllm.files import atomic_write


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            atomic_write(self.path, "")
        else:  # keep what the resumed checkpoint had seen, drop the rest (in one step: a kill keeps the old file)
            kept = [ln for ln in self.read(self.path) if ln.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, **row) -> None:
        self._f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        p = Path(path)
        if not p.exists():
            return []
        rows = []
        for line in p.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed process
        return rows


def _plain(v):
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def plot_curves(rows: list[dict], out_png: str | Path, keys: tuple[str, ...] = ("train_loss", "val_loss"),
                x: str = "step", title: str = "loss") -> Path | None:
    """One PNG with a line per key present in rows (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r[x], r[k]) for r in rows if r.get(k) is not None and x in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=k, marker="o" if len(pts) < 30 else None, linewidth=1.2)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
