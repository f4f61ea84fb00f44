"""A small embedded benchmark for tests: two tasks (text -> image, (image, text) -> image),
56-pixel images, K candidates per query."""

from retrv_jax.data import synthetic


def make_bench(tmp_path_factory, *, k: int = 4, num_train: int = 3, num_val: int = 1,
               num_test: int = 1) -> str:
  """Generates the benchmark into a fresh temporary directory; returns its root."""
  root = str(tmp_path_factory.mktemp("bench") / "synth")
  synthetic.generate(root, synthetic.BenchmarkConfig(
      num_train=num_train, num_val=num_val, num_test=num_test, k=k, image_size=56,
      tasks=(0, 7)))
  return root
