#!/usr/bin/env bash
# The project's one test command: sets up .venv with the dev extras if needed, then lint + the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_backbone.py -k rope).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh dev
ruff check .
# Two workers fit the 2-core CI machine; each test process keeps torch to one thread.
# --dist loadgroup: tests marked xdist_group("slurm") share one worker, hence one Slurm cluster and one reference run.
exec python -m pytest -n "${DINOCELL_TEST_WORKERS:-2}" --dist loadgroup "$@"
