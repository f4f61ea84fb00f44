"""Metrics: exact (sum, count) accumulation, TensorBoard/JSONL files, the progress bar."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrv_jax import metrics


def test_accumulated_pairs_give_the_exact_weighted_mean():
  # Three micro-batches with different numbers of real tokens: a mean of means is wrong.
  values = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 0.5, 0.25]),
            np.array([7.0, 7.0, 7.0, 7.0])]
  masks = [np.array([1, 1, 1, 1]), np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0])]
  step = jax.jit(lambda v, m: {"loss": metrics.mean(v, m), "tokens": metrics.mean(m)})
  acc = None
  for v, m in zip(values, masks, strict=True):
    acc = jax.jit(metrics.accumulate)(acc, step(v, m)) if acc else step(v, m)
  summary = metrics.summarize(acc)
  kept = np.concatenate([v[m > 0] for v, m in zip(values, masks, strict=True)])
  assert summary["loss"] == kept.mean() == 34 / 7
  assert summary["tokens"] == 7 / 12
  assert float(acc["loss"][1]) == 7.0  # The denominator is exact too.
  mean_of_means = np.mean([v[m > 0].mean() for v, m in zip(values, masks, strict=True)])
  assert summary["loss"] != mean_of_means


def test_accumulate_keeps_names_from_either_side_and_empty_counts_are_nan():
  acc = metrics.accumulate(None, {"a": (2.0, 1.0)})
  acc = metrics.accumulate(acc, {"b": (jnp.float32(0.0), jnp.float32(0.0)), "a": (4.0, 3.0)})
  summary = metrics.summarize(acc)
  assert summary["a"] == 1.5 and math.isnan(summary["b"])
  assert metrics.summarize(None) == {}


def test_writer_writes_readable_event_files_and_jsonl(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": 2.5, "lr": np.float32(1e-4)})
    writer.write_scalars(2, {"loss": jnp.float32(1.25)})
    writer.write_text(2, "config", "lora_rank: 8")
  scalars = metrics.read_scalars(tmp_path)
  assert scalars["loss"] == [(1, 2.5), (2, 1.25)]
  assert scalars["lr"] == [(1, pytest.approx(1e-4))]
  lines = (tmp_path / metrics.JSONL_NAME).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, 1.25)]
  assert records[0]["lr"] == pytest.approx(1e-4) and "time" in records[0]


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricWriter(tmp_path / "off", enabled=False) as writer:
    writer.write_scalars(1, {"loss": 1.0})
  assert not (tmp_path / "off").exists()


def test_corrupt_event_file_is_reported(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": 1.0})
  (event_file,) = [p for p in tmp_path.iterdir() if "tfevents" in p.name]
  data = bytearray(event_file.read_bytes())
  data[-6] ^= 0xFF  # Inside the payload of the last record.
  event_file.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r"tfevents.*corrupt record at byte \d+"):
    metrics.read_scalars(tmp_path)


def test_progress_bar_shows_figures_only_when_enabled(capsys):
  with metrics.Progress(100, initial=10, desc="grpo", enabled=True) as bar:
    bar.update(40, {"loss": 0.123456, "reward": 0.5})
  err = capsys.readouterr().err
  assert "grpo" in err and "40/100" in err and "loss=0.1235" in err and "reward=0.5" in err
  assert "<" in err  # tqdm's elapsed<remaining (the ETA).
  with metrics.Progress(100) as quiet:  # Under pytest stderr is not a terminal.
    assert not quiet.enabled
    quiet.update(50, {"loss": 1.0})
  assert capsys.readouterr().err == ""


def test_writer_is_off_on_other_processes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics.MetricWriter(tmp_path / "p1")
  writer.write_scalars(1, {"loss": 1.0})
  writer.close()
  assert not writer.enabled and not os.path.exists(tmp_path / "p1")
  assert not metrics.Progress(10).enabled
