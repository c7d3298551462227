#!/usr/bin/env bash
# The whole test suite (CPU only): the lint step (ruff.toml), then the backend's tests and the Slicer module's tests.
# Installs what they need first. Arguments go to pytest (options such as -m "not slow" or -k, not paths).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" --testing
cd "$root"
"$root/.venv/bin/ruff" check .

# The two learning modules train for about half of the suite's time. They run side by side, one module per
# pytest-xdist worker, at the one torch thread their bars hold at (why: backend/tests/learning.py); then the rest.
# pytest's exit code 5 says that the arguments selected none of a part's tests: an error only when they selected
# none at all.
learning=(backend/tests/test_methods.py backend/tests/test_cmc_learning.py)
codes=()
part() {
  local rc=0
  "$root/.venv/bin/python" -m pytest "$@" || rc=$?
  codes+=("$rc")
}
part -n 2 --dist loadfile "${learning[@]}" "$@"
# The rest on two workers as well, one torch thread in every process (the servers and CLIs that tests start
# inherit it); the groups and their order: backend/tests/conftest.py.
export OMP_NUM_THREADS=1
part -n 2 --dist loadgroup --no-loadscope-reorder backend/tests Testing/Python "${learning[@]/#/--ignore=}" "$@"
case "${codes[*]}" in
  "0 0" | "0 5" | "5 0") exit 0 ;;
  "5 5") exit 5 ;;
  *) exit 1 ;;
esac
