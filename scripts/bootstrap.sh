#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the pinned dependencies.
# torch goes first and pinned, so that pip takes the CPU wheel instead of pulling the CUDA stack.
# `--testing` also installs what the Slicer module's tests need (Testing/requirements.txt).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
files=("$root/backend/requirements.txt" "$root/backend/pyproject.toml" "$root/scripts/bootstrap.sh")
stamp="$venv/.crossmodalseg-installed"
if [ "${1:-}" = "--testing" ]; then
  files+=("$root/Testing/requirements.txt")
  stamp="$stamp-testing"
fi
want="$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] setting up $venv (the first run takes a few minutes)" >&2
log="$(mktemp)"
install() {
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --upgrade pip || true
  "$venv/bin/python" -m pip install torch==2.13.0
  "$venv/bin/python" -m pip install -r "$root/backend/requirements.txt"
  "$venv/bin/python" -m pip install --no-deps -e "$root/backend"
  if [ "${1:-}" = "--testing" ]; then
    "$venv/bin/python" -m pip install -r "$root/Testing/requirements.txt"
  fi
}
if ! install "${1:-}" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "[bootstrap] installation failed (full log: $log)" >&2
  exit 1
fi
rm -f "$log"
echo "$want" > "$stamp"
echo "[bootstrap] ready" >&2
