#!/usr/bin/env bash
# The main job: installs what it needs, then builds the offline phantom dataset, trains, predicts and reports.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/crossmodalseg" demo --out "${DEMO_OUT:-$root/demo_output}" "$@"
