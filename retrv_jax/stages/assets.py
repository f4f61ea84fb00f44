"""Artifacts shipped with the package."""

import os

# The tiny Qwen2.5-VL after `pretrain` (Hugging Face format), the embedded default's start.
# Rebuild: python -m retrv_jax.train --config=configs/pretrain.py, then
# python -m retrv_jax.export_hf --from=workdir/pretrain/output --out=<this dir> --dtype=bfloat16
TINY_PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets",
                               "tiny_pretrained")
