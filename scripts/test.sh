#!/usr/bin/env bash
# The whole test suite (CPU only): the lint step (ruff.toml), then the backend's tests and the Slicer module's tests.
# Installs what they need first. Arguments go to pytest (options such as -m "not slow" or -k, not paths).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap.sh" --testing
cd "$root"
"$root/.venv/bin/ruff" check .

# One pytest run on two pytest-xdist workers, one torch thread in every process (the servers and CLIs that tests
# start inherit it; the learning tests' bars hold at one thread: backend/tests/learning.py). A group of tests runs
# on one worker (a module, or the modules that share the session model), the longest groups first: the two learning
# modules side by side, then whichever worker is free takes the next group (backend/tests/conftest.py). Two phases
# (learning, then the rest) left one worker idle between the two learning modules' ends (about 11 min, estimated).
export OMP_NUM_THREADS=1
exec "$root/.venv/bin/python" -m pytest -n 2 --dist loadgroup --no-loadscope-reorder backend/tests Testing/Python "$@"
