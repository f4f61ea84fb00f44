"""Logical axis names: the only vocabulary model code uses to talk about sharding.

The config's `mesh.logical_axis_rules` map these to the mesh axes ('data', 'fsdp',
'tensor'); see `retrv_jax.parallel`.
"""

# Activations.
BATCH = "batch"
LENGTH = "length"
# Weights (and the matching activation dimensions).
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
# Vision tower.
VISION_PATCHES = "vision_patches"  # The flattened patch sequence of all images.
VISION_PATCH_DIM = "vision_patch_dim"  # C*T*P*P.
VISION_EMBED = "vision_embed"
VISION_HEADS = "vision_heads"
VISION_MLP = "vision_mlp"
VISION_QKV = "vision_qkv"  # The size-3 q/k/v axis of the fused projection.
# Cache.
CACHE_LENGTH = "cache_length"

ACTIVATION_EMBED = (BATCH, LENGTH, EMBED)
ACTIVATION_HEADS = (BATCH, LENGTH, HEADS, HEAD_DIM)
ACTIVATION_KV_HEADS = (BATCH, LENGTH, KV_HEADS, HEAD_DIM)
ACTIVATION_MLP = (BATCH, LENGTH, MLP)
ACTIVATION_VOCAB = (BATCH, LENGTH, VOCAB)
CACHE_KV = (BATCH, CACHE_LENGTH, KV_HEADS, HEAD_DIM)
VISION_ACTIVATION = (VISION_PATCHES, VISION_EMBED)
