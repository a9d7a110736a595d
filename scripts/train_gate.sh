#!/usr/bin/env bash
# ECO-M2F step C: scripts/train_gate.sh CONFIG DERIVED_DIR BETA [K_USER] [KEY VALUE ...]
# K_USER is an integer; config keys are dotted upper-case names, so they are never taken for it.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 CONFIG DERIVED_DIR BETA [K_USER] [KEY VALUE ...]" >&2
  exit 2
fi
config=$1; derived=$2; beta=$3; shift 3
k_user_args=()
if [ "$#" -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  k_user_args=(--k-user "$1"); shift
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" "$here/train_gate.py" --config-file "$config" --derived "$derived" --beta "$beta" \
  "${k_user_args[@]}" "$@"
