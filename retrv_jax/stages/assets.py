"""Artifacts shipped with the package."""

import os

# The tiny Qwen2.5-VL after `vision` and `pretrain` (Hugging Face format), the embedded
# default's start. Rebuild with the three commands in configs/pretrain.py's docstring.
TINY_PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets",
                               "tiny_pretrained")
