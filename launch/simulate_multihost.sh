#!/usr/bin/env bash
# A real multi-process run on one machine: NPROC processes x DEVICES fake CPU devices each, joined through
# jax.distributed on a loopback port (the coordination service listens on 127.0.0.1 only). Exercises the
# multi-host path (per-process data shards, global arrays from process-local batches, multi-process checkpoints)
# without a cluster.
#
#   NPROC=2 DEVICES=4 launch/simulate_multihost.sh configs/quickstart.py:tiny runs/mh [--config.x=y ...]
set -euo pipefail
config=${1:?usage: simulate_multihost.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: simulate_multihost.sh CONFIG WORKDIR [flags...]}
shift 2
nproc=${NPROC:-2}
devices=${DEVICES:-4}
timeout_s=${TIMEOUT_S:-1800}
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$workdir"
pids=()
for ((i = 0; i < nproc; i++)); do
  timeout "$timeout_s" python -m big_embed.main --config "$config" --workdir "$workdir" \
    --coordinator_address "127.0.0.1:$port" --config.distributed.coordinator_bind_address="127.0.0.1:$port" \
    --num_processes "$nproc" --process_id "$i" --cpu_devices "$devices" \
    "$@" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $workdir/process_$i.log" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && tail -n 12 "$workdir/process_0.log"
exit $status
