"""retrv_jax.tpu_fit on the tiny preset: its sft step and its evaluation step compile for a
v5e:2x2 TPU slice described by libtpu (no TPU needed) and fit the 16 GiB per device.

Marked `tpu_compile` (`pytest -m "not tpu_compile"` leaves it out); without libtpu it fails
saying so rather than skipping, so a green run always means the compile was checked.
"""

import importlib.util
import os

import jax
import pytest

from retrv_jax import tpu_fit
from retrv_jax.config import sibling_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.fixture(scope="module")
def v5e_devices():
  """libtpu's compile-only description of a v5e:2x2 slice (4 chips of 16 GiB)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("libtpu is not installed: this test compiles for a TPU topology on the CPU; "
                "`pip install -e '.[test]'` installs it, or deselect with -m 'not tpu_compile'")
  from jax.experimental import topologies  # noqa: PLC0415

  return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices


def _fit(stage_file: str, stage: str, devices) -> tpu_fit.Fit:
  config = sibling_config(os.path.join(CONFIGS, "base.py"), stage_file).get_config("tiny")
  with jax.default_matmul_precision("default"):  # A training run's, not conftest's "highest".
    return tpu_fit.check(config, devices, stage=stage)


@pytest.mark.tpu_compile
def test_tiny_sft_step_compiles_and_fits_v5e(v5e_devices):
  fit = _fit("sft", "", v5e_devices)
  assert fit.hbm == 16 * 2**30
  assert fit.argument > 0 and fit.temp > 0
  assert 0 < fit.total < fit.hbm and fit.fits


@pytest.mark.tpu_compile
def test_tiny_eval_step_compiles_and_fits_v5e(v5e_devices):
  """The evaluation run after each stage (rollout, inspections, candidates' log-probs)."""
  fit = _fit("grpo", "eval", v5e_devices)
  assert fit.hbm == 16 * 2**30
  assert fit.argument > 0 and fit.temp > 0
  assert 0 < fit.total < fit.hbm and fit.fits
