"""The parity tool: our Flax model matches transformers on tiny random checkpoints, and a
single perturbed weight (text, vision or merger) is caught."""

import os
import subprocess
import sys

import hf_models
import numpy as np
import pytest
from flax import traverse_util

from retrv_jax.hf import check_parity, io

UNTIED = hf_models.tiny_config()
TIED = hf_models.tiny_config(tie_word_embeddings=True)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("parity") / "untied"
  hf_models.save_hf_model(path, UNTIED, seed=11)
  return path


@pytest.fixture(scope="module")
def reference(untied_dir):
  """(config, params, inputs, transformers logits) of the untied checkpoint."""
  config, params = io.load_pretrained(untied_dir)
  inputs = check_parity.build_inputs(str(untied_dir), config)
  return config, params, inputs, check_parity.hf_logits(str(untied_dir), inputs, config, "float32")


def test_synthetic_inputs_hold_an_image(reference):
  config, _, inputs, _ = reference
  num_image_tokens = int(np.sum(inputs["input_ids"] == config.image_token_id))
  assert num_image_tokens == 4 * 5  # 112 x 140 px = 8 x 10 patches = 4 x 5 merged.
  assert inputs["pixel_values"].shape == (80, config.vision.patch_dim)
  assert inputs["image_grid_thw"].tolist() == [[1, 8, 10]]


def test_untied_logits_match(reference):
  config, params, inputs, expected = reference
  report = check_parity.logit_stats(
      expected, check_parity.flax_logits(config, params, inputs), inputs["attention_mask"], 1e-4
  )
  assert report.ok, report.summary()
  assert report.top1_agreement == 1.0 and report.kl_max < 1e-8
  assert report.num_tokens == inputs["input_ids"].shape[1]


def test_tied_unscanned_logits_match(tmp_path):
  hf_models.save_hf_model(tmp_path / "tied", TIED, seed=12)
  _, params = io.load_pretrained(tmp_path / "tied", scan_layers=False)
  report = check_parity.compare(tmp_path / "tied", params=params)
  assert report.ok, report.summary()
  assert report.top1_agreement == 1.0


@pytest.mark.parametrize(
    "path, index",
    [
        ("language_model/layers/mlp/down_proj/kernel", (1, 7, 3)),
        ("visual/blocks/attn/qkv/kernel", (0, 5, 1, 0, 2)),
        ("visual/merger/mlp_0/kernel", (9, 4)),
    ],
    ids=["text", "vision", "merger"],
)
def test_one_perturbed_weight_fails(reference, path, index):
  config, params, inputs, expected = reference
  flat = traverse_util.flatten_dict(params, sep="/")
  value = np.array(flat[path])
  value[index] += 0.5
  flat[path] = value
  perturbed = traverse_util.unflatten_dict(flat, sep="/")
  report = check_parity.logit_stats(
      expected, check_parity.flax_logits(config, perturbed, inputs), inputs["attention_mask"], 1e-4
  )
  assert not report.ok and report.max_abs_diff > 1e-3, report.summary()


def test_logit_stats_on_known_values():
  hf = np.array([[[0.0, 0.0], [2.0, 0.0]]])
  ours = np.array([[[0.0, 0.0], [0.0, 2.0]]])
  report = check_parity.logit_stats(hf, ours, np.array([[1, 1]]), atol=1e-4)
  assert report.max_abs_diff == 2.0 and report.top1_agreement == 0.5
  p = np.exp([2.0, 0.0]) / np.sum(np.exp([2.0, 0.0]))
  assert report.kl_max == pytest.approx(np.sum(p * (np.log(p) - np.log(p[::-1]))))
  assert report.kl_mean == pytest.approx(report.kl_max / 2)
  masked = check_parity.logit_stats(hf, ours, np.array([[1, 0]]), atol=1e-4)
  assert masked.ok and masked.num_tokens == 1


def test_run_returns_nonzero_beyond_tolerance(untied_dir, capsys):
  assert check_parity.run(str(untied_dir), atol=1e-12) == 1
  assert "FAIL" in capsys.readouterr().out


def test_prompt_without_tokenizer_is_refused(untied_dir):
  with pytest.raises(ValueError, match="--prompt needs a tokenizer"):
    check_parity.build_inputs(str(untied_dir), UNTIED, prompt="hello")


def test_cli_exits_zero_within_tolerance(untied_dir, tmp_path):
  """The command line end to end, with a user image file."""
  image = tmp_path / "img.png"
  from PIL import Image

  Image.fromarray(np.random.default_rng(0).integers(0, 256, (84, 112, 3), np.uint8)).save(image)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "retrv_jax.hf.check_parity", f"--hf_dir={untied_dir}",
       f"--image={image}", "--atol=1e-4"],
      capture_output=True, text=True, env=env, timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert "top-1 agreement 1.0000" in result.stdout and "OK" in result.stdout


def test_prompt_goes_through_the_checkpoint_tokenizer(tmp_path):
  hf_models.save_hf_model(tmp_path / "ckpt", UNTIED, seed=13)
  hf_models.save_word_tokenizer(tmp_path / "ckpt", UNTIED)
  inputs = check_parity.build_inputs(str(tmp_path / "ckpt"), UNTIED, prompt="w7 w8 w9")
  ids = inputs["input_ids"][0].tolist()
  assert ids[0] == UNTIED.vision_start_token_id
  assert ids[-4:] == [UNTIED.vision_end_token_id, 7, 8, 9]
  report = check_parity.compare(tmp_path / "ckpt", prompt="w7 w8 w9")
  assert report.ok and report.num_tokens == len(ids), report.summary()
