"""The main-job entry point runs end to end: init, HF export round trip, rollout."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generate_entry_point_with_an_image(tmp_path):
  image = tmp_path / "scene.png"
  pixels = (np.random.default_rng(0).random((120, 90, 3)) * 255).astype(np.uint8)
  Image.fromarray(pixels).save(image)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "retrv_jax.generate", f"--config={ROOT}/configs/base.py",
       f"--config.workdir={tmp_path}/wd", f"--image={image}", "--max_new_tokens=3",
       "--prompt=What is in the picture?"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "reloaded params identical: True" in result.stderr
  assert "generated: 3" in result.stdout
  assert (tmp_path / "wd" / "hf_export" / "config.json").exists()
