"""Training curves as one PNG: a small panel per metric, from the scalars a run wrote.

  plot_curves("workdir/grpo", "workdir/grpo_curves.png")

Reads the TensorBoard event files (`metrics.read_scalars`); a resumed run's repeated steps
keep the value written last. Drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retrv_jax import metrics

# The GRPO stage's metrics (retrv_jax/stages/grpo.py), in panel order.
GRPO_CURVES = ("reward", "correct", "n_inspected", "lambda", "kl", "entropy", "response_tokens",
               "zero_variance", "clip_fraction", "logprob_gap")
_COLUMNS = 5  # Panels per row.


def plot_curves(logdir: str | os.PathLike, out_png: str | os.PathLike,
                names: Sequence[str] = GRPO_CURVES) -> str:
  """Draws each of `names` that `logdir` holds against the step into `out_png` (atomic).

  Returns the PNG's path. Names the run did not write are skipped; none at all is an error.
  """
  logdir, out_png = os.fspath(logdir), os.fspath(out_png)
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"plot_curves: no log directory {logdir}")
  scalars = metrics.read_scalars(logdir)
  present = [name for name in names if name in scalars]
  if not present:
    raise ValueError(f"plot_curves: {logdir} holds none of the scalars {list(names)} "
                     f"(found {sorted(scalars)})")
  columns = min(len(present), _COLUMNS)
  rows = math.ceil(len(present) / columns)
  figure = Figure(figsize=(3.2 * columns, 2.4 * rows))
  FigureCanvasAgg(figure)
  for i, name in enumerate(present):
    by_step = dict(scalars[name])  # Later writes of a step win.
    steps = sorted(by_step)
    axes = figure.add_subplot(rows, columns, i + 1)
    axes.plot(steps, [by_step[s] for s in steps], linewidth=1.2, marker="." if len(steps) < 30
              else None)
    axes.set_title(name, fontsize=10)
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3)
  figure.tight_layout()
  directory = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(out_png)}.tmp-{os.getpid()}")
  figure.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, out_png)
  return out_png
