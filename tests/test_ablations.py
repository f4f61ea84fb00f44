"""Each ablation of the main job is one switch on configs/grpo.py: with it, the default tiny
config's own data settings still hold every example of the embedded benchmark."""

import pytest

import configs.grpo as grpo_config
from retrv_jax.data.pipeline import make_iterator
from retrv_jax.stages import setup

# Switches that change the data every stage reads (no RL and fixed lambda only pick stages
# and the schedule: tests/test_stages.py and tests/test_rewards.py).
DATA_SWITCHES = {
    "full": {},
    "no_icm": {"compression.enabled": False},
    "no_relation": {"compression.use_relation": False},
    "no_inspection": {"inspection": False},
}


def _default_config(workdir, changes):
  config = grpo_config.get_config()
  config.workdir = str(workdir)
  config.benchmark.num_train = 2  # Every task, every modality; few queries.
  config.benchmark.num_val = 1
  config.benchmark.num_test = 2
  config.update_from_flattened_dict(changes)
  return config


@pytest.mark.parametrize("name", sorted(DATA_SWITCHES))
def test_every_example_fits_the_default_data_settings(name, tmp_path):
  config = _default_config(tmp_path, DATA_SWITCHES[name])
  tokenizer = setup.tokenizer(config)
  icm = setup.compression_config(config)
  for stage, split, count in (("sft", "train", 10), ("eval", "test", 10)):
    # on_error='raise': a prompt past the largest bucket fails the test, naming the record.
    data = setup.pipeline_config(config, batch_size=count, split=split, shuffle=False,
                                 on_error="raise")
    batch = next(make_iterator(stage, data, tokenizer))
    slots = (batch["slot_positions"] >= 0).sum(axis=(1, 2))
    expected = len(icm.candidate_slots) * config.data.num_candidates if icm.enabled else 0
    assert (slots == expected).all(), (name, stage, slots)
    if stage == "sft":
      inspected = (batch["insert_candidates"] >= 0).sum()
      assert (inspected == 0) == (not config.inspection), (name, inspected)

