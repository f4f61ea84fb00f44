r"""The embedded benchmark: procedurally drawn scenes in the M-BEIR layout, with stage-I lists.

  python -m retrv_jax.data.synthetic --out /tmp/synth --seed 0

writes (PAPER.md §7 layout; all paths relative to --out, all ids "dataset_id:index"):

  query/{split}/mbeir_{dataset}_task{t}_{split}.jsonl        one query per line
  cand_pool/local/mbeir_{dataset}_task{t}_cand_pool.jsonl    candidates of all splits
  cand_pool/global/mbeir_union_{split}_cand_pool.jsonl       candidates of one split, all tasks
  qrels/{split}/mbeir_{dataset}_task{t}_{split}_qrels.txt    "qid 0 did 1 task_id"
  instructions/query_instructions.tsv                        UniIR columns, one row per task
  stage1/{split}/mbeir_{dataset}_task{t}_{split}_topk.jsonl  the stage-I top-K of each query
  mbeir_images/{dataset}_images/task{t}/{split}/{q|c}{index}.png

Tasks (dataset, task id): synthcoco 0 (text -> image) and 3 (image -> text), synthweb 2
(text -> image,text; the candidate text only names the object count and background, the
details are in the image), synthnights 4 (image -> image; the positive is another rendering
of the same scene), synthcirr 7 (image,text -> image; "the same scene with the red circle
turned blue").

Fields beyond the M-BEIR schema, read by the alignment / SFT / GRPO stages:
  query record:  `task_id` (int); `query_src_content` is JSON with `scene` (what the query
                 shows), `target` (the ideal target's scene) and, for task 7, `edit`;
                 `neg_cand_list` holds the hard negatives (one attribute from the positive);
                 `reference_cot` (train split only): the four-phase chain of thought of
                 PAPER.md §4 in `prompts.format_response`'s format; its candidate labels
                 are 1-based positions in the query's stage-I `cand_list`.
  pool record:   `description`: the ground-truth content description (the scene caption);
                 `src_content` is JSON with `scene`.
  stage-I record: `qid`, `cand_list` (K dids, the positive at a random rank), `scores`
                 (K floats, descending), `relations` (K strings: how each candidate relates
                 to the ideal target, e.g. "matches the target except that the circle is
                 green, not red").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags, logging

from retrv_jax.data import prompts
from retrv_jax.data import scene as scene_lib
from retrv_jax.data.scene import Scene, SceneSpec

SPLITS = ("train", "val", "test")
INSTRUCTIONS_HEADER = ("query_modality", "cand_modality", "dataset", "dataset_id",
                       "prompt_1", "prompt_2", "prompt_3", "prompt_4")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  dataset: str
  dataset_id: int
  task_id: int
  query_modality: str
  cand_modality: str
  target_kind: str  # How the chain of thought names the target: 'an image of ...'.
  instructions: tuple[str, ...]


TASKS = (
    TaskSpec("synthcoco", 0, 0, "text", "image", "an image of",
             ("Find the image that matches the caption.", "Retrieve the image described here.")),
    TaskSpec("synthcoco", 0, 3, "image", "text", "a caption of",
             ("Find the caption that describes the image.", "Retrieve a text for this image.")),
    TaskSpec("synthweb", 1, 2, "text", "image,text", "an image and text of",
             ("Find the image and text that match the caption.",)),
    TaskSpec("synthnights", 2, 4, "image", "image", "an image of",
             ("Find the image that shows the same scene.", "Retrieve a similar image.")),
    TaskSpec("synthcirr", 3, 7, "image,text", "image", "an image of",
             ("Find the image that shows the reference image with the change applied.",)),
)
TASK_IDS = tuple(t.task_id for t in TASKS)


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What to generate; the defaults are the tiny preset (real presets: k=50)."""

  seed: int = 0
  num_train: int = 500  # Queries per (dataset, task) pair and split.
  num_val: int = 50
  num_test: int = 100
  k: int = 10  # Stage-I list length.
  image_size: int = 112  # Pixels per side.
  max_hard_negatives: int = 2  # Per query, drawn uniformly from [0, max_hard_negatives].
  max_inspections: int = 3  # Inspections per reference chain of thought.
  min_easy_distance: int = 2  # Easy negatives are at least this many edits from the target.
  tasks: tuple[int, ...] = TASK_IDS
  scene: SceneSpec = SceneSpec()

  def __post_init__(self):
    unknown = [t for t in self.tasks if t not in TASK_IDS]
    if unknown or not self.tasks:
      raise ValueError(f"tasks must be a non-empty subset of {TASK_IDS}, got {self.tasks}")
    if self.k < 2 or self.k < self.max_hard_negatives + 1:
      raise ValueError(f"k ({self.k}) must be >= 2 and > max_hard_negatives "
                       f"({self.max_hard_negatives})")
    if min(self.num_train, self.num_val, self.num_test, self.max_hard_negatives,
           self.max_inspections) < 0 or self.image_size < 16 or self.min_easy_distance < 2:
      raise ValueError(f"invalid BenchmarkConfig: {self}")

  def num_queries(self, split: str) -> int:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


@dataclasses.dataclass
class _Item:
  """A query or candidate before it is written: its content and how to draw it."""

  index: int
  scene: Scene
  seed: int  # Rendering jitter.
  text: str | None
  img_path: str | None


@dataclasses.dataclass
class _Query:
  item: _Item
  target: Scene
  positive: _Item
  hard: list[_Item]
  src: dict
  cands: list[_Item] = dataclasses.field(default_factory=list)  # Stage-I order.
  scores: list[float] = dataclasses.field(default_factory=list)  # Stage-I scores, descending.


class _PairBuilder:
  """Generates one (dataset, task) pair, split by split, with unique scenes across splits."""

  def __init__(self, config: BenchmarkConfig, task: TaskSpec):
    self.config, self.task = config, task
    self.used: set = set()
    self.pool: dict[str, list[_Item]] = {}

  def _new_item(self, rng, split: str, kind: str, counter: list[int], s: Scene) -> _Item:
    index = counter[0]
    counter[0] += 1
    t = self.task
    modality = t.query_modality if kind == "q" else t.cand_modality
    img_path = (f"mbeir_images/{t.dataset}_images/task{t.task_id}/{split}/{kind}{index}.png"
                if "image" in modality else None)
    if "text" not in modality or (kind == "q" and t.task_id == 7):
      text = None  # The composed query's text (the edit) is set by the caller.
    elif kind == "c" and t.task_id == 2:
      text = s.summary()
    else:
      text = s.caption()
    return _Item(index, s, int(rng.integers(2**31)), text, img_path)

  def _fresh_scene(self, rng, tries: int = 10_000) -> Scene:
    for _ in range(tries):
      s = scene_lib.sample_scene(rng, self.config.scene)
      if s.key() not in self.used:
        self.used.add(s.key())
        return s
    raise ValueError(f"SceneSpec {self.config.scene} is too small: {tries} draws found no "
                     f"unused scene after {len(self.used)}; allow more objects or attributes")

  def _edited(self, rng, s: Scene, tries: int = 20) -> Scene | None:
    for _ in range(tries):
      out = scene_lib.apply_edit(s, scene_lib.random_edit(rng, s, self.config.scene))
      if out.key() not in self.used:
        self.used.add(out.key())
        return out
    return None

  def split(self, split: str, qids: list[int], dids: list[int]) -> list[_Query]:
    """Queries with positives and hard negatives, then distractors, then stage-I lists."""
    cfg, t = self.config, self.task
    rng = np.random.default_rng([cfg.seed, t.task_id, SPLITS.index(split)])
    pool = self.pool.setdefault(split, [])
    queries = []
    while len(queries) < cfg.num_queries(split):
      src: dict = {}
      if t.task_id == 7:
        reference = self._fresh_scene(rng)
        edit = scene_lib.random_edit(rng, reference, cfg.scene)
        target = scene_lib.apply_edit(reference, edit)
        if target.key() in self.used:
          continue  # Rare: the edit recreated a scene in use; draw another reference.
        self.used.add(target.key())
        item = self._new_item(rng, split, "q", qids, reference)
        item.text = scene_lib.describe_edit(reference, edit)
        src["edit"] = dataclasses.asdict(edit)
      else:
        target = self._fresh_scene(rng)
        item = self._new_item(rng, split, "q", qids, target)
      positive = self._new_item(rng, split, "c", dids, target)
      hard_scenes = []
      num_hard = int(rng.integers(cfg.max_hard_negatives + 1))
      if t.task_id == 7 and num_hard and rng.random() < 0.5:
        hard_scenes.append(item.scene)  # The unedited reference: the classic composed trap.
      while len(hard_scenes) < num_hard:
        edited = self._edited(rng, target)
        if edited is None:
          break
        hard_scenes.append(edited)
      hard = [self._new_item(rng, split, "c", dids, s) for s in hard_scenes]
      src.update(scene=item.scene.to_json(), target=target.to_json())
      queries.append(_Query(item, target, positive, hard, src))
      pool.extend([positive, *hard])
    while queries and len(pool) < 2 * cfg.k:
      pool.append(self._new_item(rng, split, "c", dids, self._fresh_scene(rng)))
    for q in queries:
      self._stage1(rng, split, q, dids)
    return queries

  def _stage1(self, rng, split: str, q: _Query, dids: list[int]) -> None:
    cfg, pool = self.config, self.pool[split]
    taken = {id(q.positive), *(id(h) for h in q.hard)}
    easy: list[_Item] = []
    need = cfg.k - 1 - len(q.hard)
    for i in rng.permutation(len(pool)):
      if len(easy) == need:
        break
      c = pool[int(i)]
      if id(c) not in taken and scene_lib.distance(q.target, c.scene) >= cfg.min_easy_distance:
        easy.append(c)
    while len(easy) < need:  # A pool too small or too similar: add distractors.
      c = self._new_item(rng, split, "c", dids, self._fresh_scene(rng))
      if scene_lib.distance(q.target, c.scene) >= cfg.min_easy_distance:
        pool.append(c)
        easy.append(c)
    cands = [q.positive, *q.hard, *easy]
    q.cands = [cands[int(i)] for i in rng.permutation(len(cands))]
    q.scores = [round(float(x), 4) for x in np.sort(rng.uniform(0.2, 0.9, cfg.k))[::-1]]


def relation(target: Scene, candidate: Scene) -> str:
  """How a candidate relates to the ideal target, in one clause."""
  diffs = scene_lib.differences(target, candidate)
  if not diffs:
    return "matches the target in every detail"
  first = scene_lib.describe_difference(target, diffs[0])
  if len(diffs) == 1 and diffs[0].kind == "edit":
    return f"matches the target except that {first}"
  return f"does not match the target, for example {first}"


def _labels(labels: Sequence[int]) -> str:
  """'Candidate 3' or 'Candidates 1, 3 and 5'."""
  if len(labels) == 1:
    return f"Candidate {labels[0]}"
  return "Candidates " + ", ".join(map(str, labels[:-1])) + f" and {labels[-1]}"


def reference_cot(target_phrase: str, roles: Sequence[str], relations: Sequence[str],
                  max_inspections: int) -> str:
  """The four-phase chain of thought (PAPER.md §4) from ground truth, in the response
  format of `prompts.format_response` (one headed line per phase).

  roles[i] in {'positive', 'hard', 'easy'} and relations[i] describe candidate label i + 1.
  Inspected: the positive and the hard negatives (at most `max_inspections`, the positive
  always among them), in label order; every other candidate is eliminated by label.
  """
  answer = roles.index("positive") + 1
  hard = [i + 1 for i, r in enumerate(roles) if r == "hard"]
  inspected = sorted(([answer] + hard)[:max_inspections]) if hard else []
  eliminated = [i + 1 for i in range(len(roles)) if i + 1 != answer and i + 1 not in inspected]
  elimination = "No candidate is clearly out."
  if eliminated:
    verb = "does" if len(eliminated) == 1 else "do"
    elimination = f"{_labels(eliminated)} clearly {verb} not match."
  if inspected:
    checks = [f"{prompts.inspection_tag(label)}Candidate {label} {relations[label - 1]}."
              for label in inspected]
    verification = " ".join([f"{_labels(inspected)} look close, so I inspect them.", *checks])
  else:
    verification = f"Only candidate {answer} is left."
  return prompts.format_response(
      target=f"The target is {target_phrase}.", elimination=elimination,
      verification=verification, answer=answer,
      conclusion=f"So the answer is candidate {answer}.")


def _dumps(record: dict) -> str:
  return json.dumps(record, ensure_ascii=False)


def _src(data: dict) -> str:
  return json.dumps(data, sort_keys=True, separators=(",", ":"))


class _Writer:
  """Writes every file of the benchmark under one root (a temporary folder)."""

  def __init__(self, root: str, config: BenchmarkConfig):
    self.root, self.config = root, config
    self.files: dict[str, list[str]] = {}

  def add(self, rel_path: str, line: str) -> None:
    self.files.setdefault(rel_path, []).append(line)

  def image(self, item: _Item) -> None:
    path = os.path.join(self.root, item.img_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = scene_lib.render(item.scene, self.config.image_size, np.random.default_rng(item.seed))
    img.save(path, format="PNG")

  def flush(self) -> None:
    for rel_path, lines in self.files.items():
      path = os.path.join(self.root, rel_path)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _pool_record(task: TaskSpec, c: _Item) -> dict:
  return {"did": f"{task.dataset_id}:{c.index}", "txt": c.text, "img_path": c.img_path,
          "modality": task.cand_modality, "src_content": _src({"scene": c.scene.to_json()}),
          "description": c.scene.caption()}


def _write_pair_split(w: _Writer, task: TaskSpec, split: str, queries: list[_Query],
                      pool: list[_Item]) -> None:
  cfg, name = w.config, f"mbeir_{task.dataset}_task{task.task_id}"
  did = lambda c: f"{task.dataset_id}:{c.index}"
  for c in pool:
    record = _dumps(_pool_record(task, c))
    w.add(f"cand_pool/local/{name}_cand_pool.jsonl", record)
    w.add(f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl", record)
    if c.img_path:
      w.image(c)
  for q in queries:
    qid = f"{task.dataset_id}:{q.item.index}"
    roles = ["positive" if c is q.positive else "hard" if any(c is h for h in q.hard)
             else "easy" for c in q.cands]
    relations = [relation(q.target, c.scene) for c in q.cands]
    record = {"qid": qid, "query_txt": q.item.text, "query_img_path": q.item.img_path,
              "query_modality": task.query_modality, "query_src_content": _src(q.src),
              "pos_cand_list": [did(q.positive)], "neg_cand_list": [did(h) for h in q.hard],
              "task_id": task.task_id}
    if split == "train":
      phrase = f"{task.target_kind} {q.target.caption()}"
      record["reference_cot"] = reference_cot(phrase, roles, relations, cfg.max_inspections)
    w.add(f"query/{split}/{name}_{split}.jsonl", _dumps(record))
    if q.item.img_path:
      w.image(q.item)
    w.add(f"qrels/{split}/{name}_{split}_qrels.txt",
          f"{qid} 0 {did(q.positive)} 1 {task.task_id}")
    w.add(f"stage1/{split}/{name}_{split}_topk.jsonl", _dumps({
        "qid": qid, "cand_list": [did(c) for c in q.cands], "scores": q.scores,
        "relations": relations}))


def generate(out_dir: str, config: BenchmarkConfig = BenchmarkConfig(), *,
             overwrite: bool = False) -> dict[str, int]:
  """Writes the benchmark to `out_dir` atomically (built in a sibling temp dir, then renamed).

  Returns counts: queries, candidates, images, bytes.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    w = _Writer(tmp, config)
    stats = {"queries": 0, "candidates": 0}
    counters: dict[int, tuple[list[int], list[int]]] = {}
    for task in (t for t in TASKS if t.task_id in config.tasks):
      qids, dids = counters.setdefault(task.dataset_id, ([0], [0]))
      builder = _PairBuilder(config, task)
      for split in SPLITS:
        queries = builder.split(split, qids, dids)
        _write_pair_split(w, task, split, queries, builder.pool[split])
        stats["queries"] += len(queries)
        stats["candidates"] += len(builder.pool[split])
      prompts = list(task.instructions) + [""] * (4 - len(task.instructions))
      w.add("instructions/query_instructions.tsv", "\t".join(
          [task.query_modality, task.cand_modality, task.dataset, str(task.dataset_id),
           *prompts]))
    w.files["instructions/query_instructions.tsv"].insert(0, "\t".join(INSTRUCTIONS_HEADER))
    w.flush()
    stats.update(_disk_usage(tmp))
    if os.path.exists(out_dir):
      trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.replace(out_dir, os.path.join(trash, "old"))
      os.replace(tmp, out_dir)
      shutil.rmtree(trash)
    else:
      os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return stats


def _disk_usage(root: str) -> dict[str, int]:
  files = images = size = 0
  for dirpath, _, names in os.walk(root):
    for n in names:
      files += 1
      images += n.endswith(".png")
      size += os.path.getsize(os.path.join(dirpath, n))
  return {"files": files, "images": images, "bytes": size}


def _jsonl(path: str) -> Iterator[dict]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield json.loads(line)


def _files(root: str, sub: str, suffix: str) -> list[str]:
  base = os.path.join(root, sub)
  if not os.path.isdir(base):
    return []
  return sorted(os.path.join(d, n) for d, _, names in os.walk(base) for n in names
                if n.endswith(suffix))


def iter_corpus_text(data_dir: str) -> Iterator[str]:
  """Every text of a benchmark (instructions, queries, CoTs, candidate texts, descriptions,
  relations), for training a tokenizer. Global pools repeat local ones and are left out."""
  tsv = os.path.join(data_dir, "instructions", "query_instructions.tsv")
  if os.path.exists(tsv):
    with open(tsv, encoding="utf-8") as f:
      next(f, None)
      for line in f:
        yield from (p for p in line.rstrip("\n").split("\t")[4:] if p)
  fields = {"query": ("query_txt", "reference_cot"), "cand_pool/local": ("txt", "description")}
  for sub, keys in fields.items():
    for path in _files(data_dir, sub, ".jsonl"):
      for record in _jsonl(path):
        yield from (record[k] for k in keys if isinstance(record.get(k), str) and record[k])
  for path in _files(data_dir, "stage1", ".jsonl"):
    for record in _jsonl(path):
      yield from record.get("relations") or ()


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags exist only when this module runs as a program, so importing it defines none."""
  flags.DEFINE_string("out", None, "Output directory (the M-BEIR root).", required=True)
  flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes byte-identical files.")
  flags.DEFINE_integer("num_train", BenchmarkConfig.num_train, "Train queries per task.")
  flags.DEFINE_integer("num_val", BenchmarkConfig.num_val, "Val queries per task.")
  flags.DEFINE_integer("num_test", BenchmarkConfig.num_test, "Test queries per task.")
  flags.DEFINE_integer("k", BenchmarkConfig.k, "Stage-I list length K (50 for real presets).")
  flags.DEFINE_integer("image_size", BenchmarkConfig.image_size, "Image side in pixels.")
  flags.DEFINE_list("num_objects", ["2", "3"], "Allowed object counts per scene.")
  flags.DEFINE_integer("max_hard_negatives", BenchmarkConfig.max_hard_negatives,
                       "Most hard negatives (one attribute off) per query.")
  flags.DEFINE_integer("max_inspections", BenchmarkConfig.max_inspections,
                       "Most inspections per reference chain of thought.")
  flags.DEFINE_list("tasks", [str(t) for t in TASK_IDS], "M-BEIR task ids to generate.")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv: Sequence[str]) -> None:
  del argv
  config = BenchmarkConfig(
      seed=FLAGS.seed, num_train=FLAGS.num_train, num_val=FLAGS.num_val,
      num_test=FLAGS.num_test, k=FLAGS.k, image_size=FLAGS.image_size,
      max_hard_negatives=FLAGS.max_hard_negatives, max_inspections=FLAGS.max_inspections,
      tasks=tuple(int(t) for t in FLAGS.tasks),
      scene=SceneSpec(num_objects=tuple(int(n) for n in FLAGS.num_objects)))
  start = time.perf_counter()
  stats = generate(FLAGS.out, config, overwrite=FLAGS.overwrite)
  logging.info("wrote %s in %.1f s: %s", FLAGS.out, time.perf_counter() - start, stats)
  print(f"wrote {FLAGS.out} in {time.perf_counter() - start:.1f} s: {stats}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
