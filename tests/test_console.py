"""What `retrv_jax.train` shows a person: library INFO logs in the workdir's log file, not
on the console; warnings on both; the evaluations as a table at the end."""

import logging as std_logging

import ml_collections
import pytest
from absl import logging

from retrv_jax import evaluate, train


@pytest.fixture
def restore_logging():
  """The logging of an absl program (its handler on the root logger, as `app.run` leaves
  it), restored afterwards."""
  root = std_logging.getLogger()
  handlers, level = list(root.handlers), logging.get_absl_handler().level
  verbosity, root_level = logging.get_verbosity(), root.level
  if logging.get_absl_handler() not in root.handlers:
    root.addHandler(logging.get_absl_handler())
  yield
  for handler in list(root.handlers):
    if handler not in handlers:
      root.removeHandler(handler)
      if isinstance(handler, std_logging.FileHandler):
        handler.close()
  logging.get_absl_handler().setLevel(level)
  logging.set_verbosity(verbosity)
  root.setLevel(root_level)


def test_info_logs_go_to_the_log_file_and_warnings_to_both(tmp_path, capfd, restore_logging):
  path = train.log_to_file(str(tmp_path / "run"))
  assert path == str(tmp_path / "run" / "train.log")
  logging.info("absl info line")
  std_logging.getLogger("orbax.checkpoint").info("orbax info line")
  logging.warning("a warning line")
  for handler in std_logging.getLogger().handlers:
    handler.flush()
  console = capfd.readouterr().err
  with open(path) as f:
    written = f.read()
  assert "absl info line" in written and "orbax info line" in written
  assert "a warning line" in written
  assert "info line" not in console
  assert "a warning line" in console


def test_the_results_table_lists_every_evaluation(tmp_path, capsys):
  workdir = str(tmp_path)
  evaluate.write_results(workdir, "sft", {"recall@1": 0.456, "recall@5": 0.912,
                                          "mean_inspections": 1.25, "format_error_rate": 0.0})
  evaluate.write_results(workdir, "untrained", {"recall@1": 0.1, "recall@5": 0.5,
                                                "mean_inspections": 0.0})
  (tmp_path / train.CURVES_FILE).write_bytes(b"png")
  config = ml_collections.ConfigDict({"workdir": workdir, "stages": "align,sft,grpo"})
  train.print_results(config)
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].split() == ["recall@1", "recall@5", "mean_inspections", "format_error_rate"]
  assert lines[1].split() == ["untrained", "0.100", "0.500", "0.000"]
  assert lines[2].split() == ["sft", "0.456", "0.912", "1.250", "0.000"]
  assert lines[-1] == f"GRPO curves: {tmp_path / train.CURVES_FILE}"
