r"""M-BEIR (or the embedded benchmark) as ArrayRecord files, built by tensorflow-datasets.

  python -m retrv_jax.data.tfds_mbeir --manual_dir /tmp/synth --data_dir /tmp/tfds

One example is one query with its K stage-I candidates (see `FEATURES`); splits are the
M-BEIR splits that have query files. The builder is a `tfds.core.GeneratorBasedBuilder`
writing `file_format='array_record'`; neither building nor reading needs TensorFlow (tfds
serializes tf.train.Example protos with its own copy of the proto). tfds stores examples in
a fixed order shuffled by key hash (scalable past memory); each carries its `qid` and
`dataset`. `rerank_dataset` reads a split as a `grain.MapDataset` with random access and
plain Python / numpy values.

Configs: 'local' (candidates looked up in each pair's local pool) and 'global' (the split's
union pool). Pairs with a query file but no stage-I file are an error: build the stage-I
lists first, or pick pairs with `--pairs`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

from retrv_jax.data import mbeir
from retrv_jax.data.mbeir import CandidatePool, Layout, RerankExample
from retrv_jax.data.records import ReadReport, resolve_image

BUILDER_NAME = "mbeir_rerank"
_TEXT = ("qid", "dataset", "query_modality", "query_text", "query_img_path", "reference_cot")
_TEXT_LISTS = ("cand_dids", "cand_modalities", "cand_texts", "cand_img_paths",
               "cand_descriptions", "cand_relations")
_bytes = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
_list = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)

# One example; absent texts / images are '' / b''. Lists have length K, in stage-I order.
FEATURES = {
    "qid": tfds.features.Text(),
    "dataset": tfds.features.Text(),
    "task_id": tfds.features.Scalar(np.int32),
    "query_modality": tfds.features.Text(),
    "query_text": tfds.features.Text(),
    "query_img_path": tfds.features.Text(),  # Relative to the M-BEIR root.
    "query_image": _bytes(),  # The encoded file (PNG / JPEG), not decoded pixels.
    "cand_dids": tfds.features.Sequence(tfds.features.Text()),
    "cand_modalities": tfds.features.Sequence(tfds.features.Text()),
    "cand_texts": tfds.features.Sequence(tfds.features.Text()),
    "cand_img_paths": tfds.features.Sequence(tfds.features.Text()),
    "cand_images": _list(np.object_),  # b'' for all when the config has embed_images=False.
    "cand_descriptions": tfds.features.Sequence(tfds.features.Text()),  # Ours, else ''.
    "cand_relations": tfds.features.Sequence(tfds.features.Text()),  # Ours, else ''.
    "cand_scores": _list(np.float32),  # Stage-I similarity.
    "cand_is_positive": _list(np.bool_),
    "cand_is_hard_negative": _list(np.bool_),  # In the query's neg_cand_list.
    "gt_index": tfds.features.Scalar(np.int32),  # First positive's position, -1 if none.
    "reference_cot": tfds.features.Text(),  # Train split of the embedded benchmark, else ''.
}


@dataclasses.dataclass
class MbeirRerankConfig(tfds.core.BuilderConfig):
  pool: str = "local"  # 'local' or 'global'.
  pairs: tuple[str, ...] = ()  # 'dataset:task_id' to include; empty: every pair found.
  splits: tuple[str, ...] = mbeir.SPLITS
  stage1_dir: str = "stage1"  # Relative to manual_dir, or absolute.
  on_error: str = "raise"  # 'skip' drops bad records and logs counts per reason.
  verify_images: bool = True  # Decode-check every image that goes into an example.
  # Store image bytes in the examples. K copies of candidate images per query are fine for
  # the embedded benchmark but not for full M-BEIR (50 x ~20 KB per query): there, set
  # False and read images from the *_img_path fields under the M-BEIR root.
  embed_images: bool = True


class MbeirRerank(tfds.core.GeneratorBasedBuilder):
  """Queries with their stage-I top-K candidates, from an M-BEIR directory (manual_dir)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "One example per query: K candidates with texts and images.",
                   "1.1.0": "cand_is_hard_negative: the candidates in neg_cand_list."}
  BUILDER_CONFIGS = [MbeirRerankConfig(name="local"),
                     MbeirRerankConfig(name="global", pool="global")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "manual_dir is an M-BEIR root (query/, cand_pool/, qrels/, instructions/, mbeir_images/) "
      "with stage-I lists under stage1/; `python -m retrv_jax.data.synthetic --out DIR` "
      "writes the embedded one.")
  # Nothing is downloaded, so no checksums file: this also keeps tfds from resolving the
  # code path (which needs importlib_resources, absent from some environments).
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=tfds.features.FeaturesDict(FEATURES),
        homepage="https://huggingface.co/datasets/TIGER-Lab/M-BEIR")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    cfg = self.builder_config
    if cfg.pool not in ("local", "global"):
      raise ValueError(f"MbeirRerankConfig.pool must be 'local' or 'global', got {cfg.pool!r}")
    layout = Layout(os.fspath(dl_manager.manual_dir), cfg.stage1_dir)
    out = {}
    for split in cfg.splits:
      pairs = _select_pairs(layout, split, cfg.pairs)
      if pairs:
        out[split] = self._generate_examples(layout=layout, split=split, pairs=pairs)
    if not out:
      raise ValueError(f"no query files for splits {cfg.splits} and pairs {cfg.pairs} under "
                       f"{layout.root}/query")
    return out

  def _generate_examples(self, layout: Layout, split: str, pairs: list[tuple[str, int]]
                         ) -> Iterator[tuple[str, dict[str, Any]]]:
    cfg = self.builder_config
    pools: dict[str, CandidatePool] = {}
    k = None
    for dataset, task_id in pairs:
      pool_file = (layout.local_pool_file(dataset, task_id) if cfg.pool == "local"
                   else layout.global_pool_file(split))
      if pool_file not in pools:
        pools.clear()  # Keep at most one pool's index in memory.
        pools[pool_file] = CandidatePool(
            pool_file, image_root=layout.root, on_error=cfg.on_error,
            verify_images="lazy" if cfg.verify_images else "none")
      report = ReadReport(f"{layout.query_file(dataset, task_id, split)} (joined)")
      for ex in mbeir.iter_rerank_examples(
          layout, dataset, task_id, split, pools[pool_file], on_error=cfg.on_error,
          verify_images=cfg.verify_images, report=report):
        k = k or len(ex.candidates)
        if len(ex.candidates) != k:
          raise ValueError(f"{layout.stage1_file(dataset, task_id, split)}: K = "
                           f"{len(ex.candidates)}, but earlier pairs of split {split!r} have "
                           f"K = {k}; one split needs one K")
        yield (f"{dataset}_task{task_id}/{ex.query.qid}",
               to_features(ex, layout.root if cfg.embed_images else None))
      logging.info("%s", report.summary())


def _select_pairs(layout: Layout, split: str, wanted: Sequence[str]) -> list[tuple[str, int]]:
  found = layout.pairs(split)
  if wanted:
    chosen = []
    for name in wanted:
      dataset, _, task = name.rpartition(":")
      if not task.isdigit() or (dataset, int(task)) not in found:
        raise ValueError(f"pair {name!r} has no query file for split {split!r}; pairs found: "
                         f"{[f'{d}:{t}' for d, t in found]}")
      chosen.append((dataset, int(task)))
    found = chosen
  for dataset, task_id in found:
    path = layout.stage1_file(dataset, task_id, split)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no stage-I file {path} for pair {dataset}:{task_id} "
                              f"({split}); build it first or choose pairs with --pairs")
  return found


def _read_bytes(root: str | None, rel_path: str | None) -> bytes:
  if not rel_path or root is None:
    return b""
  path = resolve_image(root, rel_path)
  if path is None:
    raise ValueError(f"image path {rel_path!r} leaves the data root {root}")
  with open(path, "rb") as f:
    return f.read()


def to_features(ex: RerankExample, root: str | None) -> dict[str, Any]:
  """A `RerankExample` as a `FEATURES` dict; image files under `root` are read as bytes
  (root None: no bytes, only paths)."""
  q, cands = ex.query, ex.candidates
  positives, hard = set(q.pos_cand_list), set(q.neg_cand_list)
  return {
      "qid": q.qid, "dataset": ex.dataset, "task_id": ex.task_id,
      "query_modality": q.modality, "query_text": q.text or "",
      "query_img_path": q.img_path or "",
      "query_image": _read_bytes(root, q.img_path),
      "cand_dids": [c.did for c in cands],
      "cand_modalities": [c.modality for c in cands],
      "cand_texts": [c.text or "" for c in cands],
      "cand_img_paths": [c.img_path or "" for c in cands],
      "cand_images": np.array([_read_bytes(root, c.img_path) for c in cands], dtype=object),
      "cand_descriptions": [c.description or "" for c in cands],
      "cand_relations": list(ex.relations) if ex.relations else [""] * len(cands),
      "cand_scores": np.asarray(ex.scores, np.float32),
      "cand_is_positive": np.array([c.did in positives for c in cands], bool),
      "cand_is_hard_negative": np.array([c.did in hard for c in cands], bool),
      "gt_index": ex.gt_index,
      "reference_cot": q.reference_cot or "",
  }


def build(manual_dir: str, data_dir: str, config: MbeirRerankConfig | str = "local"
          ) -> str:
  """Builds (or reuses) the ArrayRecord files; returns the dataset directory."""
  predefined = {c.name: c for c in MbeirRerank.BUILDER_CONFIGS}
  if isinstance(config, MbeirRerankConfig) and predefined.get(config.name) == config:
    config = config.name  # tfds refuses a custom config named like a predefined one.
  builder = MbeirRerank(config=config, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return os.fspath(builder.data_dir)


def dataset_dir(data_dir: str, config: str = "local", version: str | None = None) -> str:
  """The folder of one built config: {data_dir}/mbeir_rerank/{config}/{version}."""
  base = os.path.join(data_dir, BUILDER_NAME, config)
  if version is None:
    versions = sorted((v for v in os.listdir(base) if v[0].isdigit()),
                      key=lambda v: tuple(map(int, v.split(".")))) if os.path.isdir(base) else []
    if not versions:
      raise FileNotFoundError(f"no built version of {BUILDER_NAME}/{config} under {data_dir}")
    version = versions[-1]
  return os.path.join(base, version)


def _decode(example: dict[str, Any]) -> dict[str, Any]:
  """Raw data-source values -> str for texts, lists of str, python ints, numpy arrays."""
  out = dict(example)
  for name in _TEXT:
    out[name] = example[name].decode("utf-8")
  for name in _TEXT_LISTS:
    out[name] = [v.decode("utf-8") for v in example[name]]
  out["cand_images"] = list(example["cand_images"])
  out["task_id"] = int(example["task_id"])
  out["gt_index"] = int(example["gt_index"])
  return out


def rerank_dataset(data_dir: str, split: str, *, config: str = "local",
                   version: str | None = None) -> grain.MapDataset:
  """Random access to one split: `ds[i]` is a dict with FEATURES' keys, decoded."""
  builder = tfds.builder_from_directory(dataset_dir(data_dir, config, version))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not built; available: {list(builder.info.splits)}")
  return grain.MapDataset.source(builder.as_data_source(split=split)).map(_decode)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Flags exist only when this module runs as a program, so importing it defines none."""
  flags.DEFINE_string("manual_dir", None, "The M-BEIR root to convert.", required=True)
  flags.DEFINE_string("data_dir", None, "Where tfds writes the dataset.", required=True)
  flags.DEFINE_enum("pool", "local", ["local", "global"], "Which candidate pool to read.")
  flags.DEFINE_string("name", None, "Config name; default: the pool name.")
  flags.DEFINE_list("pairs", [], "'dataset:task_id' pairs to include; default all.")
  flags.DEFINE_list("splits", list(mbeir.SPLITS), "Splits to build.")
  flags.DEFINE_string("stage1_dir", "stage1", "Stage-I lists folder, relative to manual_dir.")
  flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "What a bad record does.")
  flags.DEFINE_bool("embed_images", True, "Store image bytes (else only paths).")


def main(argv: Sequence[str]) -> None:
  del argv
  config = MbeirRerankConfig(
      name=FLAGS.name or FLAGS.pool, pool=FLAGS.pool, pairs=tuple(FLAGS.pairs),
      splits=tuple(FLAGS.splits), stage1_dir=FLAGS.stage1_dir, on_error=FLAGS.on_error,
      embed_images=FLAGS.embed_images)
  predefined = {c.name: c for c in MbeirRerank.BUILDER_CONFIGS}
  if config.name in predefined and config != predefined[config.name]:
    raise app.UsageError(f"these options differ from the predefined config {config.name!r}; "
                         "name the custom config with --name")
  print(f"built {build(FLAGS.manual_dir, FLAGS.data_dir, config)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
