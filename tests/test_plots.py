"""Training curves: a PNG from the scalars a run wrote, a clear error when there are none."""

import os

import pytest

from retrv_jax import metrics, plots


def test_plot_curves_draws_present_metrics(tmp_path):
  logdir = tmp_path / "grpo"
  with metrics.MetricWriter(logdir, enabled=True) as writer:
    for step in (2, 4, 6):
      writer.write_scalars(step, {"reward": step / 10, "kl": 0.01 * step, "loss": 1.0})
    writer.write_scalars(6, {"reward": 0.9})  # A resumed run rewrites a step.
  out = tmp_path / "plots" / "grpo_curves.png"
  path = plots.plot_curves(logdir, out)
  assert path == str(out)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(out.parent) == ["grpo_curves.png"]  # No temporary file left.
  # Two panels (reward, kl) side by side: twice as wide as one.
  one = plots.plot_curves(logdir, tmp_path / "one.png", names=("kl", "missing"))
  assert _png_width(out) == 2 * _png_width(one)


def _png_width(path) -> int:
  with open(path, "rb") as f:
    return int.from_bytes(f.read(24)[16:20], "big")


def test_plot_curves_errors_name_the_logdir(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"{empty} holds none of the scalars"):
    plots.plot_curves(empty, tmp_path / "x.png")
  with metrics.MetricWriter(empty, enabled=True) as writer:
    writer.write_scalars(1, {"loss": 1.0})
  with pytest.raises(ValueError, match=r"found \['loss'\]"):
    plots.plot_curves(empty, tmp_path / "x.png")
  with pytest.raises(FileNotFoundError, match="no log directory"):
    plots.plot_curves(tmp_path / "absent", tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()
