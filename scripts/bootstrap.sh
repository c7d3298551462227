#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the pinned dependencies.
# torch goes first and pinned, so that pip takes the CPU wheel instead of pulling the CUDA stack.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
stamp="$venv/.crossmodalseg-installed"
want="$(cat "$root/backend/requirements.txt" "$root/backend/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -r "$root/backend/requirements.txt"
"$venv/bin/python" -m pip install -q --no-deps -e "$root/backend"
echo "$want" > "$stamp"
