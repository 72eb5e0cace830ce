#!/usr/bin/env bash
# Single host, all local devices:  launch/local.sh configs/quickstart.py runs/quickstart [--config.x=y ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
exec python -m big_embed.main --config "$config" --workdir "$workdir" "$@"
