#!/usr/bin/env bash
# The Qwen2.5-VL-7B run on a TPU pod slice: prepare the checkpoint once, build M-BEIR as
# tfds ArrayRecords once, then align -> sft -> grpo (resumes if rerun), on every worker.
#
#   BUCKET=/gcs/my-bucket launch/train_7b.sh
#
# BUCKET is a path every worker sees: a Cloud Storage bucket mounted with gcsfuse
# (`gcsfuse --implicit-dirs my-bucket /gcs/my-bucket` on each worker) or a shared disk; the
# entry points read and write plain paths. Expects $BUCKET/Qwen2.5-VL-7B-Instruct (the public checkpoint), $BUCKET/M-BEIR (the
# UniIR release: query/, cand_pool/, qrels/, instructions/, mbeir_images/) and
# $BUCKET/cots.jsonl (the SFT chains of thought, from `python -m retrv_jax.teacher`).
set -euo pipefail
: "${BUCKET:?set BUCKET=/gcs/my-bucket (a gcsfuse mount on every worker)}"
PRESET=${PRESET:-7b}
QWEN=${QWEN:-$BUCKET/Qwen2.5-VL-7B-Instruct}
HERE=$(dirname "$0")

"$HERE/tpu_vm.sh" run "python -m retrv_jax.hf.prepare --src=$QWEN --out=$QWEN-retrv"
"$HERE/tpu_vm.sh" run "python -m retrv_jax.data.tfds_mbeir --manual_dir=$BUCKET/M-BEIR \
  --data_dir=$BUCKET/mbeir_tfds"
"$HERE/tpu_vm.sh" run "python -m retrv_jax.train --config=configs/grpo.py:$PRESET \
  --config.init_checkpoint=$QWEN-retrv --config.tokenizer=$QWEN-retrv \
  --config.data.data_dir=$BUCKET/mbeir_tfds --config.data.cot_file=$BUCKET/cots.jsonl \
  --config.workdir=$BUCKET/runs/retrv-r1-$PRESET"
