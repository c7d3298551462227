#!/usr/bin/env bash
# The whole test suite (CPU only): the lint step (ruff.toml), then the backend's tests and the Slicer module's tests.
# Installs what they need first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" --testing
cd "$root"
"$root/.venv/bin/ruff" check .
exec "$root/.venv/bin/python" -m pytest backend/tests Testing/Python "$@"
