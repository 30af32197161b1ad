#!/usr/bin/env bash
# The test job on a fresh machine (Python 3.11 + pip): creates .venv, installs gemma_scope_pz with its
# dev and offline extras (versions pinned by constraints.txt), installs Debian's Chromium for the HTML
# rendering test when it can (root or sudo), then runs the whole suite -- fast tests, the slow
# real-model tests and the notebooks -- in one pytest run on two workers.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,offline,kaggle]"
bash .ci/install_chromium.sh || echo "test.sh: Chromium not installed; the rendering test needs it"
bash scripts/install_offline_prose.sh || echo "offline prose packages not installed (load_corpus(\"default+prose\") needs them)"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# Two workers (pytest-xdist), one test file per worker at a time: most tests are bound by XLA's
# single-threaded compilation, so two of them keep both cores busy.
exec .venv/bin/python -m pytest -q --durations=25 -n "${PYTEST_WORKERS:-2}" --dist loadfile \
  --nbmake tests notebooks "$@"
