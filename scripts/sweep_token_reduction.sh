#!/usr/bin/env bash
# Token-reduction trade-off sweep: scripts/sweep_token_reduction.sh CONFIG WEIGHTS [--dense-weights D] --setting NAME KEY VALUE ... [-- KEY VALUE ...]
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG WEIGHTS [--dense-weights D] --setting NAME KEY VALUE [...] [-- KEY VALUE ...]" >&2
  exit 2
fi
config=$1; weights=$2; shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" "$here/sweep_token_reduction.py" --config-file "$config" --weights "$weights" "$@"
