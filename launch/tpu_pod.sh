#!/usr/bin/env bash
# Run GOLD on every host of a TPU pod slice: one process per host, same command everywhere.
# jax.distributed.initialize() finds the coordinator from the TPU metadata by itself;
# config.distributed.num_processes > 1 turns it on.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--config.KEY=VALUE ...]
#
# The repo must be at the same path on every host (e.g. cloned by a startup script).
# On-policy batches are sampled per host (rollout.engine=jax: each host samples its own rows with
# the student gathered to its own chips); every host must get the same config (checked at start-up)
# and makes the same λ/end-of-data decisions (checked before every batch).
# The CPU test of the same path: tests/test_multiprocess.py.
set -euo pipefail
TPU_NAME=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE [config overrides]}
ZONE=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE [config overrides]}
shift 2
REPO=${GOLD_JAX_REPO:-$HOME/gold_jax}
NUM_HOSTS=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --format='value(networkEndpoints.len())')
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && . .venv/bin/activate &&
  python -m gold_jax.train --config configs/gold.py \
    --config.distributed.num_processes=$NUM_HOSTS $*"
