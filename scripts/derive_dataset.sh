#!/usr/bin/env bash
# ECO-M2F step B. Usage: scripts/derive_dataset.sh CONFIG WEIGHTS OUTPUT_DIR [--num-gpus N] [KEY VALUE ...]
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 CONFIG WEIGHTS OUTPUT_DIR [--num-gpus N] [--num-machines M --machine-rank R] [KEY VALUE ...]" >&2
  exit 2
fi
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" "$(dirname "$0")/derive_dataset.py" "$@"
