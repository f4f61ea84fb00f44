"""retrv_jax: Retrv-R1 reasoning re-ranker for universal multimodal retrieval, in JAX."""

from setuptools import find_packages, setup

setup(
    name="retrv_jax",
    version="0.1.0",
    description="JAX/Flax implementation of Retrv-R1 (arXiv 2510.02745) for Cloud TPU",
    packages=find_packages(include=["retrv_jax", "retrv_jax.*"]),
    package_data={"retrv_jax": ["data/assets/*.model", "data/assets/tiny_pretrained/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7.0",
        "transformers>=5.0.0",
        "safetensors>=0.5.0",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.21.0",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # The PyTorch CPU wheel is the numerical oracle of the tests (Hugging Face models).
        # libtpu (via jax[tpu]) lets tests/test_tpu_fit.py compile for a TPU slice on the CPU.
        "test": ["torch>=2.5", "pytest>=8.0", "pytest-xdist>=3.5", "chex>=0.1.88", "ruff>=0.6",
                 "jax[tpu]>=0.6.0"],
        "tpu": ["jax[tpu]>=0.6.0"],
    },
)
