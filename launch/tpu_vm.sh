#!/usr/bin/env bash
# Cloud TPU VM (a single- or multi-host slice): the same command on every worker, joined by JAX's own distributed
# runtime (it detects the TPU workers itself; no coordinator flags).
#
#   TPU=my-tpu ZONE=us-central2-b launch/tpu_vm.sh configs/quickstart.py /mnt/shared/runs/qs [--config.x=y ...]
#
# Each worker needs the code and:  pip install -U "jax[tpu]"   (e.g. SETUP="cd big_embed && pip install -e . &&
# pip install -U 'jax[tpu]'" runs once per worker before the command). REPO (default big_embed) is the checkout's
# directory on the workers. The workdir must be storage every worker sees. A lost worker stops the others within
# config.distributed.heartbeat_timeout_s; rerun the same command to resume from the last checkpoint.
set -euo pipefail
config=${1:?usage: TPU=name ZONE=zone launch/tpu_vm.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: TPU=name ZONE=zone launch/tpu_vm.sh CONFIG WORKDIR [flags...]}
shift 2
tpu=${TPU:?set TPU to the TPU VM name}
zone=${ZONE:?set ZONE to its zone}
repo=${REPO:-big_embed}
quoted=$(printf ' %q' "$@")
command="cd $(printf %q "$repo") && python -m big_embed.main --config $(printf %q "$config")"
command+=" --workdir $(printf %q "$workdir")${quoted}"
if [[ -n ${SETUP:-} ]]; then
  command="$SETUP && $command"
fi
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$command"
