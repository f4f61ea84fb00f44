"""Three steps of every training stage on a micro config, through `retrv_jax.train`:
vision -> pretrain -> align (data targets) -> sft -> grpo, and align with self targets. Each stage
writes its output and metrics, trains only its own params, compiles its step once; the
sampler and the learner agree in GRPO; a rerun of `train.run` skips finished stages."""

import contextlib
import json
import logging
import math
import os

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from retrv_jax import config as config_lib
from retrv_jax import evaluate, evaluate_lists, parallel, train
from retrv_jax.config import ConfigError, sibling_config
from retrv_jax.data import scene_images
from retrv_jax.data.tokenizer import load_tokenizer
from retrv_jax.metrics import JSONL_NAME
from retrv_jax.models import lora
from retrv_jax.models.compression import CompressionConfig
from retrv_jax.models.config import tiny
from retrv_jax.models.reranker import Reranker
from retrv_jax.stages import grpo, outputs, setup

BASE = sibling_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                   "base.py"))
K = 4
STEPS = 3


def _config(workdir: str, stages: str, **changes):
  """configs/base.py:tiny shrunk to a 1-layer, 64-wide model, K = 4 and 3 steps of batch 2."""
  config = BASE.get_config("tiny")
  config.workdir = workdir
  config.stages = stages
  config.init_checkpoint = ""
  config.model.num_layers = 1
  config.model.hidden_size = 64
  config.model.intermediate_size = 128
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.mrope_section = (4, 6, 6)
  config.model.vision.depth = 1
  config.model.vision.fullatt_block_indexes = (0,)
  config.model.vision.hidden_size = 32
  config.model.vision.intermediate_size = 64
  config.model.vision.num_heads = 2
  config.model.vision.out_hidden_size = 64
  config.model.lora_rank = 4
  config.model.lora_alpha = 8.0
  config.data.num_candidates = K
  config.data.max_response_tokens = 192
  config.data.max_description_tokens = 16
  config.benchmark.k = K
  config.benchmark.num_train = 3
  config.benchmark.num_val = 1
  config.benchmark.num_test = 1
  config.benchmark.tasks = (0, 7)  # synthetic.BenchmarkConfig fields the base leaves out.
  config.benchmark.image_size = 56
  config.eval.after_each_stage = False
  for name in setup.STAGES:
    section = config[name]
    section.steps = STEPS
    section.batch_size = 2
    section.log_every = 1
    section.optim.warmup_steps = 1
    section.checkpoint.save_every_steps = 2
  config.vision.image_size = 56
  config.pretrain.candidates_per_example = 2
  config.align.candidates_per_example = 2
  config.grpo.group_size = 2
  config.grpo.max_new_tokens = 16
  config.grpo.beta = 0.0
  config.update_from_flattened_dict(changes)
  return config


class _CompileCounter(logging.Handler):
  """Counts XLA compilations of functions named `step` (what every stage jits)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.count = 0

  def emit(self, record: logging.LogRecord) -> None:
    self.count += record.getMessage().startswith("Compiling jit(step)")


@contextlib.contextmanager
def _counting_compiles():
  counter = _CompileCounter()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(counter)
  try:
    with jax.log_compiles(True):
      yield counter
  finally:
    logger.removeHandler(counter)


def _mesh():
  return parallel.create_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])


def _train(config, name: str, init: str) -> int:
  """Runs one stage on a 2-device mesh (batch and params sharded); returns its compiles."""
  mesh = _mesh()
  with (jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)),
        _counting_compiles() as counter):
    result = train.train_stage(config, name, init, mesh, setup.tokenizer(config))
  assert result is not None
  return counter.count


def _metrics(config, name: str) -> list[dict]:
  with open(os.path.join(train.stage_dir(config, name), JSONL_NAME)) as f:
    return [json.loads(line) for line in f]


def _params(config, name: str, *, lora_stage: bool) -> dict:
  """A stage's output, loaded under its own model (no fresh parts)."""
  path = train.output_dir(config, name)
  info = outputs.read_info(path)
  model = config_lib.model_config(config).replace(lora_rank=info["model"]["lora_rank"])
  icm = setup.compression_config(config).replace(enabled=info["compression"]["enabled"])
  params = outputs.load_params(path, model, icm, jax.random.key(0))
  assert lora_stage == any(lora.is_lora(p) for p in traverse_util.flatten_dict(params))
  return params


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def _differs(a, b) -> bool:
  fa, fb = _flat(a), _flat(b)
  return any(not np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def _check_stage(config, name: str) -> list[dict]:
  info = outputs.read_info(train.output_dir(config, name))
  assert info["stage"] == name and info["step"] == STEPS
  lines = _metrics(config, name)
  assert [r["step"] for r in lines] == [1, 2, 3]
  assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in lines)
  return lines


# ------------------------------------------------------------------ the runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def chain_config(workdir):
  pretrained = train.output_dir(_config(workdir, "pretrain"), "pretrain")
  return _config(workdir, "align,sft,grpo", init_checkpoint=pretrained)


@pytest.fixture(scope="module")
def vision_run(workdir):
  config = _config(workdir, "vision,pretrain", **{"compression.enabled": False,
                                                   "pretrain.train_vision": False})
  return config, _train(config, "vision", "")


@pytest.fixture(scope="module")
def pretrain_run(vision_run):
  config, _ = vision_run
  return config, _train(config, "pretrain", train.output_dir(config, "vision"))


@pytest.fixture(scope="module")
def point_run(pretrain_run, workdir):
  """List-choice pretraining from the pretrain output: lists of 2 easy, 3 and 4 candidates."""
  config = _config(os.path.join(workdir, "point"), "pretrain", **{
      "compression.enabled": False, "pretrain.train_vision": False,
      "pretrain.tasks": "relate,point", "pretrain.point_workspace": True,
      "pretrain.point_tag": True, "pretrain.point_verdict_weight": 1.0,
      "pretrain.point_parallel": True,
      "pretrain.point_curriculum": "2:easy:1,3:all:1,4:all",
      "data.data_dir": os.path.join(workdir, "data")})
  return config, _train(config, "pretrain", train.output_dir(pretrain_run[0], "pretrain"))


@pytest.fixture(scope="module")
def align_run(pretrain_run, chain_config):
  return chain_config, _train(chain_config, "align", chain_config.init_checkpoint)


@pytest.fixture(scope="module")
def sft_run(align_run, chain_config):
  return chain_config, _train(chain_config, "sft", train.output_dir(chain_config, "align"))


@pytest.fixture(scope="module")
def grpo_run(sft_run, chain_config):
  return chain_config, _train(chain_config, "grpo", train.output_dir(chain_config, "sft"))


@pytest.fixture(scope="module")
def align_self_run(pretrain_run, workdir, chain_config):
  config = _config(os.path.join(workdir, "self"), "align",
                   **{"align.targets": "self", "data.data_dir": os.path.join(workdir, "data")})
  return config, _train(config, "align", chain_config.init_checkpoint)


# ------------------------------------------------------------------ the checks


def test_vision_trains_the_vision_tower_alone(vision_run):
  config, _ = vision_run
  lines = _check_stage(config, "vision")
  for name, _, _ in scene_images.HEADS:
    assert all(0 <= r[f"{name}_accuracy"] <= 1 for r in lines), name
  params = _params(config, "vision", lora_stage=False)
  assert set(params) == {"backbone"}  # The attribute heads are not in the output.
  start = outputs.load_params("", config_lib.model_config(config).replace(lora_rank=0),
                              setup.compression_config(config), jax.random.key(config.seed))
  visual = lambda p: lora.partition(p["backbone"], lora.path_regex(r"^visual/"))
  _assert_equal(visual(params)[1], visual(start)[1])
  assert _differs(visual(params)[0], visual(start)[0])


def test_pretrain_trains_the_language_model_alone(pretrain_run):
  config, _ = pretrain_run
  lines = _check_stage(config, "pretrain")
  assert all(math.isfinite(r["template_loss"]) and math.isfinite(r["content_loss"])
             and math.isfinite(r["relation_loss"]) for r in lines)
  info = outputs.read_info(train.output_dir(config, "pretrain"))
  assert not info["compression"]["enabled"] and info["model"]["lora_rank"] == 0
  params = _params(config, "pretrain", lora_stage=False)
  assert set(params) == {"backbone"}
  start = _params(config, "vision", lora_stage=False)["backbone"]
  _assert_equal(params["backbone"]["visual"], start["visual"])
  assert _differs(params["backbone"]["language_model"], start["language_model"])


def test_point_pretraining_grows_its_lists_and_its_output_is_scored(point_run):
  config, _ = point_run
  lines = _check_stage(config, "pretrain")
  assert [r["point_list_size"] for r in lines] == [2, 3, 4]
  assert all(math.isfinite(r["point_loss"]) and math.isfinite(r["relation_loss"])
             and 0 <= r["point_verdict_top1"] <= 1 for r in lines)
  model, params = train.load_model(config, train.output_dir(config, "pretrain"), _mesh(),
                                   stage="pretrain")
  mesh = _mesh()
  with jax.set_mesh(mesh), parallel.with_rules(tuple(config.mesh.rules)):  # As its main runs.
    metrics = evaluate_lists.evaluate_lists_config(config, model, params,
                                                   setup.tokenizer(config), mesh)
  assert metrics["num_examples"] == 2  # One test query per task.
  assert 0 <= metrics["recall@1"] <= 1 and "recall@1/task7" in metrics
  assert 0 <= metrics["verdict_recall@1"] <= 1  # The tagged lists' written verdicts.
  assert metrics["verdict_one_match"] == 1.0  # Parallel pieces: " match" for the surest only.


@pytest.mark.parametrize("run", ["align_run", "align_self_run"])
def test_align_trains_the_icm_alone(run, pretrain_run, request):
  config, _ = request.getfixturevalue(run)
  lines = _check_stage(config, "align")
  assert all(math.isfinite(r["content_loss"]) and math.isfinite(r["relation_loss"])
             for r in lines)
  pretrain_config = pretrain_run[0]
  params = _params(config, "align", lora_stage=False)
  _assert_equal(params["backbone"], _params(pretrain_config, "pretrain",
                                            lora_stage=False)["backbone"])
  # The ICM the stage started from: the one load_params adds with the run's seed.
  start = outputs.load_params(train.output_dir(pretrain_config, "pretrain"),
                              config_lib.model_config(config).replace(lora_rank=0),
                              setup.compression_config(config), jax.random.key(config.seed),
                              mesh=_mesh())
  assert _differs(params["icm"], start["icm"])


def test_sft_trains_lora_and_the_icm(sft_run):
  config, _ = sft_run
  lines = _check_stage(config, "sft")
  assert all(math.isfinite(r["nll"]) for r in lines)
  params = _params(config, "sft", lora_stage=True)
  aligned = _params(config, "align", lora_stage=False)
  base, adapters = lora.partition(params["backbone"], lambda p: not lora.is_lora(p))
  _assert_equal(base, aligned["backbone"])
  assert any(np.any(np.asarray(v)) for k, v in _flat(adapters).items() if k.endswith("lora_b"))
  assert _differs(params["icm"], aligned["icm"])


def test_grpo_sampler_and_learner_agree(grpo_run):
  config, _ = grpo_run
  lines = _check_stage(config, "grpo")
  expected = {"reward", "format", "correct", "n_inspected", "lambda", "clip_fraction",
              "entropy", "logprob_gap", "response_tokens", "generated_tokens", "zero_variance",
              "pg_loss", "loss", "grad_norm"}
  for r in lines:
    assert expected <= set(r), sorted(expected - set(r))
    assert "kl" not in r  # beta = 0: no reference pass, no KL.
    assert r["logprob_gap"] < 1e-4
    assert 0 < r["response_tokens"] <= config.grpo.max_new_tokens
  # The curriculum: lambda = i / N at optimizer step i (0-based).
  np.testing.assert_allclose([r["lambda"] for r in lines], [0, 1 / 3, 2 / 3], atol=1e-6)
  _params(config, "grpo", lora_stage=True)


@pytest.mark.parametrize("run", ["vision_run", "pretrain_run", "point_run", "align_run",
                                 "align_self_run", "sft_run", "grpo_run"])
def test_each_stage_compiles_its_step_once(run, request):
  """On a multi-device mesh, step 2 must reuse step 1's executable (STYLE.md habit 4)."""
  _, compiles = request.getfixturevalue(run)
  assert compiles == 1


def test_rerun_skips_finished_stages(grpo_run, chain_config):
  names = ("align", "sft", "grpo")
  before = {n: (_metrics(chain_config, n),
                os.path.getmtime(os.path.join(train.output_dir(chain_config, n),
                                              outputs.STAGE_FILE))) for n in names}
  with _counting_compiles() as counter:
    assert train.run(chain_config)
  assert counter.count == 0
  for n in names:
    assert _metrics(chain_config, n) == before[n][0]
    assert os.path.getmtime(os.path.join(train.output_dir(chain_config, n),
                                         outputs.STAGE_FILE)) == before[n][1]
  assert os.path.isfile(os.path.join(chain_config.workdir, "grpo_curves.png"))


def test_rerun_evaluates_only_what_results_json_lacks(grpo_run, chain_config, monkeypatch):
  # A run that stopped after finishing sft and grpo but before their evaluations.
  config = chain_config.copy_and_resolve_references()
  config.eval.after_each_stage = True
  results = os.path.join(config.workdir, evaluate.RESULTS_FILE)
  evaluate.write_results(config.workdir, "untrained", {"recall@1": 0.0})
  evaluate.write_results(config.workdir, "align", {"recall@1": 0.0})
  evaluated = []

  def fake_evaluate(cfg, model, params, tokenizer, mesh):
    evaluated.append(model.config.lora_rank > 0 and "backbone" in params)
    return {"recall@1": 1.0}

  monkeypatch.setattr(evaluate, "evaluate_config", fake_evaluate)
  try:
    assert train.run(config)
    assert evaluated == [True, True]  # sft and grpo, each from its output, with adapters.
    assert sorted(evaluate.read_results(config.workdir)) == ["align", "grpo", "sft",
                                                             "untrained"]
    assert evaluate.read_results(config.workdir)["align"]["recall@1"] == 0.0
  finally:
    os.remove(results)


@pytest.mark.parametrize("field", ["aggregation", "kl_estimator", "curriculum_schedule"])
def test_a_bad_grpo_choice_is_named_before_any_compile(tmp_path, field):
  config = _config(str(tmp_path), "grpo")
  config.grpo[field] = "nonsense"
  model = Reranker(tiny().replace(num_layers=1), CompressionConfig())
  with pytest.raises(ConfigError, match=rf"config\.grpo\.{field} = 'nonsense'"):
    grpo.make_step(model, config, load_tokenizer(), optax.sgd(0.1))


@pytest.mark.parametrize("changes, message", [
    ({"sft.micro_batch_size": 1}, r"config\.sft\.micro_batch_size = 1 .*mesh data x fsdp = 2"),
    ({"sft.batch_size": 3, "sft.micro_batch_size": 2},
     r"config\.sft\.batch_size = 3: expected a multiple of micro_batch_size = 2"),
])
def test_a_batch_the_mesh_cannot_split_is_named(tmp_path, changes, message):
  config = _config(str(tmp_path), "sft", **changes)
  with pytest.raises(ConfigError, match=message):
    _train(config, "sft", "")
