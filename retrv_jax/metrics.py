"""Training metrics: (sum, count) accumulation, TensorBoard + JSONL writing, a progress bar.

A step returns each metric as a pair `(sum, count)`: the sum of the per-example values
and how many examples it covers (e.g. `mean(loss, mask)`). Pairs add exactly across
micro-batches, steps and hosts; only the host divides, once, in `summarize`:

    acc = None
    for step ...:
      state, step_metrics = train_step(state, batch, rng)   # {"loss": (sum, count), ...}
      acc = metrics.accumulate(acc, step_metrics)
      if step % log_every == 0:
        writer.write_scalars(step, metrics.summarize(acc))  # {"loss": sum / count, ...}
        acc = None

Step outputs should be replicated (not sharded) arrays, so every process can read them.
Only process 0 writes files; the bar shows only on process 0 and on a terminal.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

Pair = tuple[Any, Any]  # (sum, count): arrays or numbers.
JSONL_NAME = "metrics.jsonl"


# ------------------------------------------------------------------ (sum, count) pairs


def mean(values: jax.Array, mask: jax.Array | None = None) -> Pair:
  """The pair of a masked mean: `(sum(values * mask), sum(mask))` in float32 (jit-friendly)."""
  values = jnp.asarray(values, jnp.float32)
  if mask is None:
    return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), values.shape)
  return jnp.sum(values * mask), jnp.sum(mask)


def accumulate(acc: Mapping[str, Pair] | None, new: Mapping[str, Pair]) -> dict[str, Pair]:
  """Adds `new` pairs to `acc` (None: nothing yet); a name in only one of them is kept."""
  out = dict(acc or {})
  for name, (total, count) in new.items():
    if name in out:
      out[name] = (out[name][0] + total, out[name][1] + count)
    else:
      out[name] = (total, count)
  return out


def summarize(acc: Mapping[str, Pair] | None) -> dict[str, float]:
  """`{name: sum / count}` as Python floats (one device-to-host transfer; NaN if count is 0)."""
  host = jax.device_get(dict(acc or {}))
  out = {}
  for name, (total, count) in sorted(host.items()):
    total, count = float(np.asarray(total, np.float64)), float(np.asarray(count, np.float64))
    out[name] = total / count if count else float("nan")
  return out


# ------------------------------------------------------------------ writing


class MetricWriter:
  """Scalars to TensorBoard event files and to `<logdir>/metrics.jsonl`, on process 0.

  One JSON object per line, `{"step": s, "time": unix_seconds, name: value, ...}`,
  appended and flushed at each write (a resumed run appends to the same file).
  """

  def __init__(self, logdir: str | os.PathLike, *, enabled: bool | None = None):
    self.logdir = os.fspath(logdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(self.logdir, exist_ok=True)
      self._tb = SummaryWriter(self.logdir, flush_secs=30)
      self._jsonl = open(os.path.join(self.logdir, JSONL_NAME), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes each scalar at `step` (values are converted to Python floats)."""
    if not self.enabled:
      return
    values = {name: float(v) for name, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    record = {"step": int(step), "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    """A text summary (e.g. the config, a sampled trajectory)."""
    if self.enabled:
      self._tb.add_text(name, text, global_step=step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Every scalar in the TensorBoard event files of `logdir`: {tag: [(step, value), ...]}.

  Reads the TFRecord framing directly (length, masked CRC32C, payload, masked CRC32C),
  so neither TensorFlow nor TensorBoard is needed; a corrupt record raises ValueError.
  """
  out: dict[str, list[tuple[int, float]]] = {}
  files = sorted(f for f in os.listdir(logdir) if "tfevents" in f)
  for name in files:
    path = os.path.join(logdir, name)
    for payload in _records(path):
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def _records(path: str):
  with open(path, "rb") as f:
    while header := f.read(12):
      if len(header) < 12:
        raise ValueError(f"{path}: truncated record header")
      (length,), (header_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      payload, crc = f.read(length), f.read(4)
      if header_crc != masked_crc32c(header[:8]) or len(crc) < 4 or (
          struct.unpack("<I", crc)[0] != masked_crc32c(payload)):
        raise ValueError(f"{path}: corrupt record at byte {f.tell() - length - 16}")
      yield payload


# ------------------------------------------------------------------ progress


class Progress:
  """A console bar with ETA and a few key figures; silent off a terminal or off process 0."""

  def __init__(self, total: int, *, initial: int = 0, desc: str = "",
               enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0 and sys.stderr.isatty()
    self.enabled = enabled
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                          dynamic_ncols=True, file=sys.stderr)

  def update(self, step: int, figures: Mapping[str, float] | None = None) -> None:
    """Moves the bar to `step` and shows `figures` (e.g. loss, reward, lr) beside it."""
    if not self.enabled:
      return
    if figures:
      self._bar.set_postfix({k: f"{float(v):.4g}" for k, v in figures.items()}, refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    self._bar.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
