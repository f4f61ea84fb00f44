"""Base config: model preset, mesh, data, the ICM, every training stage and evaluation.

  python -m retrv_jax.generate --config=configs/base.py            # tiny, any backend
  python -m retrv_jax.train --config=configs/grpo.py               # align -> sft -> grpo

The argument after ':' picks the model preset: tiny (default), 3b or 7b (equal to the
public Qwen2.5-VL-3B/7B-Instruct configs). Stage configs (`configs/align.py`, `sft.py`,
`grpo.py`, `pretrain.py`, `eval.py`) start from this one. Any field can be overridden on
the command line, e.g. `--config.mesh.tensor=4` or `--config.grpo.steps=100`.
"""

import ml_collections

from retrv_jax import optim, parallel
from retrv_jax.checkpoint import default_config as checkpoint_defaults
from retrv_jax.models.config import PRESETS
from retrv_jax.stages.assets import TINY_PRETRAINED


def _stage(steps: int, batch_size: int, learning_rate: float, warmup_steps: int
           ) -> ml_collections.ConfigDict:
  """The fields every stage has."""
  s = ml_collections.ConfigDict()
  s.steps = steps  # Optimizer steps.
  s.batch_size = batch_size  # Examples per optimizer step (all processes together).
  s.micro_batch_size = 0  # Gradient accumulation: examples per forward; 0 = batch_size.
  s.log_every = 10  # Steps between metric writes.
  s.optim = optim.default_config()
  s.optim.learning_rate = learning_rate
  s.optim.warmup_steps = warmup_steps
  s.checkpoint = checkpoint_defaults()
  s.checkpoint.save_every_steps = 100
  s.checkpoint.max_to_keep = 2
  return s


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"configs/base.py:{preset}: unknown preset; expected one of {sorted(PRESETS)}")
  tiny = preset == "tiny"
  config = ml_collections.ConfigDict()
  # Which model preset `model` was built from (informational; `model` is what is used).
  config.model_preset = preset
  # Every ModelConfig field (see retrv_jax/models/config.py for meanings).
  config.model = ml_collections.ConfigDict(PRESETS[preset]().to_dict())
  config.model.lora_rank = 32 if tiny else 64
  config.model.lora_alpha = 32.0 if tiny else 128.0
  if not tiny:
    # Real sizes: bfloat16 compute, float32 params; remat keeps activations per layer.
    config.model.dtype = "bfloat16"
    config.model.remat_policy = "dots_with_no_batch_dims"
  # A Hugging Face Qwen2.5-VL checkpoint directory (retrv_jax.generate).
  config.hf_checkpoint = ""
  # Where training starts: a stage output (workdir/<stage>/output), a Hugging Face
  # Qwen2.5-VL directory, or '' (random). Tiny: the shipped pretrained model.
  config.init_checkpoint = TINY_PRETRAINED if tiny else ""
  # Tokenizer: '' = the embedded tiny one; else a tokenizer.json or a checkpoint directory
  # holding one with the Retrv-R1 tokens (retrv_jax.data.tokenizer.add_retrv_tokens).
  config.tokenizer = ""
  # Stages to run, in order, comma-separated: vision and pretrain (tiny only), align,
  # sft, grpo.
  config.stages = "align,sft,grpo"

  # The information compression module (retrv_jax/models/compression.py).
  config.compression = ml_collections.ConfigDict()
  config.compression.enabled = True  # False: full candidate tokens ("without ICM").
  config.compression.num_layers = 1
  config.compression.separate_relation_query = False
  config.compression.use_content = True
  config.compression.use_relation = True  # False: the "without t_rel" ablation.
  config.compression.mlp_dim = 0
  config.compression.max_query_tokens = 64 if tiny else 512
  # Details inspection in SFT targets, sampling and evaluation (False: the ablation).
  config.inspection = True

  # Input pipelines (retrv_jax/data/pipeline.py PipelineConfig; batch_size and split are
  # set per stage). data_dir '' = the embedded benchmark, generated into workdir/data.
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ""
  config.data.source = "mbeir" if tiny else "tfds"
  config.data.pool = "local"
  config.data.instructions_file = ""
  config.data.cot_file = ""  # SFT chains of thought by qid (retrv_jax.teacher's output).
  config.data.num_candidates = 10 if tiny else 50
  # The tiny model gets a one-line system prompt (the full one is 99 of its ~240 prompt
  # tokens); the real presets the full one (retrv_jax/data/prompts.py SYSTEM_PROMPT).
  if tiny:
    config.data.system_prompt = "Find the candidate that best matches the query."
  # The last bucket holds K full candidates (the no-ICM ablation): tiny 10 x 32 tokens, real
  # presets 50 x 384; with the ICM every prompt fits the first (tiny) or first two.
  config.data.prompt_buckets = (192, 512) if tiny else (2048, 4096, 24576)
  config.data.max_candidate_tokens = 32 if tiny else 384
  config.data.max_response_tokens = 320 if tiny else 1536  # With the inspected blocks.
  config.data.max_description_tokens = 48 if tiny else 96
  config.data.max_inspections = 3
  config.data.min_pixels = 56 * 56 if tiny else 112 * 112
  config.data.max_pixels = 56 * 56 if tiny else 448 * 448
  config.data.worker_count = 0
  config.data.on_error = "raise"
  # The embedded benchmark (retrv_jax/data/synthetic.py BenchmarkConfig), when data_dir=''.
  config.benchmark = ml_collections.ConfigDict()
  config.benchmark.seed = 0
  config.benchmark.num_train = 500
  config.benchmark.num_val = 50
  # 40 per task: 200 test queries, so the four evaluations of the default run take about
  # 4 of its 20 minutes on 2 CPU cores (Recall@1's standard error at chance: 0.02).
  config.benchmark.num_test = 40
  config.benchmark.k = config.data.num_candidates

  # Stage -1 (tiny only): the vision tower learns scene attributes from rendered images.
  config.vision = _stage(steps=1000, batch_size=128, learning_rate=3e-3, warmup_steps=50)
  config.vision.log_every = 50
  config.vision.checkpoint.save_every_steps = 250
  config.vision.image_size = 112  # Rendering side in pixels: the embedded benchmark's.
  # Stage 0 (tiny only): caption and compare pretraining of the whole tiny VLM.
  config.pretrain = _stage(steps=400, batch_size=8, learning_rate=1e-3, warmup_steps=50)
  config.pretrain.candidates_per_example = 4  # Described candidates per example.
  # False: the vision tower stays as it starts (e.g. from the `vision` stage).
  config.pretrain.train_vision = True
  config.pretrain.tasks = "describe,template"  # And/or 'point' (retrv_jax/stages/pretrain.py).
  # The `point` task's lists, rungs 'size:easy|all[:steps]' (retrv_jax/stages/lists.py);
  # '' = every step the K stage-I candidates, hard negatives included.
  config.pretrain.point_curriculum = ""
  # The relation question after each candidate of a pointing list (stages/pointing.py).
  config.pretrain.point_workspace = False
  # Each candidate of a pointing list ends on its label again and a written verdict word
  # (" match" / "no"); the verdict loss (its weight; 0: off, needs the tag) trains it.
  config.pretrain.point_tag = False
  config.pretrain.point_verdict_weight = 0.0
  # The candidates' pieces in parallel: each sees the query and itself only, so its verdict
  # is judged alone and no tag sees another's word; the answer sees them all (needs tags).
  config.pretrain.point_parallel = False
  # Stage 1: ICM self-alignment (LM frozen).
  config.align = _stage(steps=60 if tiny else 2000, batch_size=8 if tiny else 64,
                        learning_rate=1e-3 if tiny else 1e-4, warmup_steps=10 if tiny else 100)
  config.align.candidates_per_example = 4  # Described candidates per example.
  # Targets: 'data' (the dataset's descriptions) or 'self' (what the frozen LM says from
  # the full tokens, PAPER.md §5.1).
  config.align.targets = "data" if tiny else "self"
  # Stage 2: SFT activation on chains of thought (ICM + LoRA).
  # Tiny: 160 steps teach the response format (greedy format errors 6.5 %; 0 % after 300).
  config.sft = _stage(steps=160 if tiny else 3000, batch_size=8 if tiny else 64,
                      learning_rate=2e-3 if tiny else 1e-4, warmup_steps=10 if tiny else 100)
  config.sft.optim.end_lr_ratio = 0.2
  # Stage 3: GRPO with the curriculum efficiency reward (PAPER.md §5.3).
  config.grpo = _stage(steps=48 if tiny else 1000, batch_size=2 if tiny else 64,
                       learning_rate=3e-4 if tiny else 1e-5, warmup_steps=2 if tiny else 20)
  config.grpo.log_every = 4 if tiny else 10
  config.grpo.checkpoint.save_every_steps = 24 if tiny else 50
  config.grpo.group_size = 8  # G samples per prompt.
  # Sampling temperature; the learner scores the same tempered policy (top_k / top_p are
  # not applied by the learner: keep them off for training).
  config.grpo.temperature = 0.7 if tiny else 1.0
  config.grpo.top_k = 0
  config.grpo.top_p = 1.0
  config.grpo.max_new_tokens = 192 if tiny else 1024
  config.grpo.epsilon_low = 0.2  # Clip range [1 - epsilon_low, 1 + epsilon_high].
  config.grpo.epsilon_high = 0.2
  config.grpo.beta = 0.01  # KL weight; 0 skips the reference pass.
  config.grpo.kl_estimator = "k3"  # 'k1', 'k2' or 'k3'.
  config.grpo.aggregation = "token_mean"  # 'token_mean', 'sequence_mean' or 'sequence_sum'.
  config.grpo.num_iterations = 1  # mu: optimizer steps per sampled batch.
  config.grpo.filter_zero_variance = False  # Drop groups whose rewards are all equal.
  config.grpo.curriculum_schedule = "linear"  # 'linear' (lambda = i / N) or 'fixed'.
  config.grpo.curriculum_value = 0.5  # lambda of the 'fixed' schedule.
  config.grpo.logprob_chunk = 128  # Generated positions per vocabulary-projection chunk.

  if not tiny:
    # Examples per forward pass, so that each stage's step fits a v5p-32 slice (16 chips of
    # 95 GiB; fsdp 4 x tensor 4), measured with `python -m retrv_jax.tpu_fit` (README).
    config.align.micro_batch_size = 16
    config.sft.micro_batch_size = 8
    config.grpo.micro_batch_size = 4

  # Evaluation on the held-out split, before the first stage and after each one.
  config.eval = ml_collections.ConfigDict()
  config.eval.split = "test"
  config.eval.batch_size = 50 if tiny else 64
  config.eval.num_examples = 0  # 0: the whole split.
  config.eval.max_new_tokens = config.grpo.get_ref("max_new_tokens")
  config.eval.after_each_stage = True
  # Recall@k scoring repeats each row's KV cache K times; chunks of this many candidates
  # bound that memory (0: all K at once).
  config.eval.candidate_chunk = 0 if tiny else 5

  # Device mesh sizes; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # Pure data parallel (across slices).
  config.mesh.fsdp = -1  # Params and batch sharded.
  config.mesh.tensor = 1 if tiny else 4  # Heads, mlp and vocab sharded.
  # Logical axis -> mesh axes (see retrv_jax/parallel.py).
  config.mesh.rules = parallel.DEFAULT_RULES
  # Multi-process runs: leave empty on Cloud TPU (auto-detected).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator = ""  # 'host:port' of process 0.
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  # Root of the PRNG streams.
  config.seed = 0
  # Where outputs and checkpoints go.
  config.workdir = "workdir"
  return config
