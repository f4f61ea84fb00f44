"""The paper's ablations on the embedded default: the main job and each one-switch variant,
on the same seed, into one table (PAPER.md §2-5).

  python benchmarks/ablations.py [--root runs/ablations] [--only no_icm,no_rl]

Each variant is `python -m retrv_jax.train --config=configs/grpo.py` with its switch, in
its own workdir under --root (a rerun resumes: finished variants are read back, not
retrained). "w/o RL" is the default run's evaluation after SFT (the same computation as
running align and SFT alone). The table (markdown, also written to <root>/ablations.md)
gives the last evaluation of each run: Recall@1, Recall@5, inspections per answer,
response tokens per query, evaluation seconds per query (greedy rollout, inspections and
the Recall@5 scoring) and the run's wall minutes. On 2 CPU cores the eight runs take about
two and a half hours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_ROOT = flags.DEFINE_string("root", "runs/ablations", "Where the runs' workdirs go.")
_ONLY = flags.DEFINE_list("only", [], "Variants to run (default: all).")

# name -> (the paper's row, command-line switches).
VARIANTS = {
    "default": ("Retrv-R1 (ICM, inspection, align -> SFT -> GRPO, curriculum λ)", []),
    "no_icm": ("w/o ICM (full candidate tokens)", ["--config.compression.enabled=False"]),
    "no_content": ("w/o t_con", ["--config.compression.use_content=False"]),
    "no_relation": ("w/o t_rel", ["--config.compression.use_relation=False"]),
    "no_inspection": ("w/o inspection", ["--config.inspection=False"]),
    "no_align": ("w/o self-alignment", ["--config.stages=sft,grpo"]),
    "no_sft": ("w/o SFT", ["--config.stages=align,grpo"]),
    "no_rl": ("w/o RL (the default run after SFT)", None),
    "fixed_lambda": ("fixed λ = 0.5", ["--config.grpo.curriculum_schedule=fixed"]),
}
COLUMNS = (("recall@1", "R@1"), ("recall@5", "R@5"), ("mean_inspections", "inspections"),
           ("mean_response_tokens", "tokens / query"), ("seconds_per_query", "s / query"))


def run_variant(root: str, name: str, switches: list[str]) -> float:
  """Trains (or resumes) one variant; its wall minutes, kept in <workdir>/wall_minutes."""
  workdir = os.path.join(root, name)
  stamp = os.path.join(workdir, "wall_minutes")
  if os.path.exists(stamp):
    with open(stamp) as f:
      return float(f.read())
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "retrv_jax.train", "--config=configs/grpo.py",
                  f"--config.workdir={workdir}", *switches], check=True)
  minutes = (time.perf_counter() - start) / 60
  with open(stamp, "w") as f:
    f.write(f"{minutes:.2f}")
  return minutes


def last_evaluation(workdir: str, stage: str | None = None) -> dict[str, float]:
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for name in ([stage] if stage else ["grpo", "sft", "align"]):
    if name in results:
      return results[name]
  raise ValueError(f"{workdir}/results.json: no evaluation of {stage or 'a stage'}")


def main(argv) -> None:
  del argv
  root = os.path.abspath(_ROOT.value)
  names = _ONLY.value or list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--only: unknown variants {unknown}; expected some of {list(VARIANTS)}")
  if "no_rl" in names and "default" not in names:
    names = ["default", *names]
  rows = []
  for name in names:
    label, switches = VARIANTS[name]
    if switches is None:  # w/o RL: the default run's SFT evaluation.
      rows.append((label, last_evaluation(os.path.join(root, "default"), "sft"), None))
      continue
    minutes = run_variant(root, name, switches)
    rows.append((label, last_evaluation(os.path.join(root, name)), minutes))
  lines = ["| variant | " + " | ".join(title for _, title in COLUMNS) + " | run minutes |",
           "|---|" + "---|" * (len(COLUMNS) + 1)]
  for label, metrics, minutes in rows:
    cells = [f"{metrics[key]:.3f}" if key in metrics else "—" for key, _ in COLUMNS]
    lines.append(f"| {label} | " + " | ".join(cells) +
                 f" | {'—' if minutes is None else f'{minutes:.1f}'} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(root, "ablations.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  app.run(main)
