#!/usr/bin/env bash
# Create a Cloud TPU VM (or pod slice), install retrv_jax on every worker, and run a command
# on all of them at once (JAX multi-host: each worker runs the same program).
#
#   launch/tpu_vm.sh create                    # the TPU VM named $TPU_NAME
#   launch/tpu_vm.sh setup                     # copy this checkout, pip install on all workers
#   launch/tpu_vm.sh run python -m retrv_jax.train --config=configs/grpo.py:7b ...
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-32, v4-32, v5litepod-16),
# RUNTIME (the TPU software version), PROJECT. Logs of `run` go to ~/retrv_jax/run.log on
# every worker and stream back from worker 0.
set -euo pipefail

TPU_NAME=${TPU_NAME:-retrv-r1}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROJECT=${PROJECT:-$(gcloud config get-value project 2>/dev/null)}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }

case "${1:-}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    tar -C "$REPO_DIR" --exclude=.git --exclude=workdir --exclude=.venv -czf /tmp/retrv_jax.tgz .
    tpu scp /tmp/retrv_jax.tgz "$TPU_NAME":~/ --worker=all
    tpu ssh "$TPU_NAME" --worker=all --command="mkdir -p ~/retrv_jax && tar -xzf ~/retrv_jax.tgz \
      -C ~/retrv_jax && cd ~/retrv_jax && python3 -m pip install -q -e '.[tpu]'"
    ;;
  run)
    shift
    tpu ssh "$TPU_NAME" --worker=all --command="cd ~/retrv_jax && $* 2>&1 | tee run.log"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
