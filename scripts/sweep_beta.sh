#!/usr/bin/env bash
# ECO-M2F trade-off sweep: scripts/sweep_beta.sh CONFIG DERIVED_DIR "BETA1 BETA2 ..." [KEY VALUE ...]
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 CONFIG DERIVED_DIR \"BETA1 BETA2 ...\" [KEY VALUE ...]" >&2
  exit 2
fi
config=$1; derived=$2; betas=$3; shift 3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" "$here/sweep_beta.py" --config-file "$config" --derived "$derived" --betas "$betas" "$@"
