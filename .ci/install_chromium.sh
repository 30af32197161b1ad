#!/usr/bin/env bash
# Install Debian's chromium for the headless rendering test (tests/test_analysis_render.py).
# Idempotent: does nothing when a chromium binary is already on PATH. Installs as root
# (CI containers), or through passwordless sudo when available; otherwise only warns
# (the render test then fails under CI with a clear message).
set -euo pipefail

for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "install_chromium: $name already present at $(command -v "$name"); nothing to do"
    exit 0
  fi
done

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo"
else
  echo "install_chromium: chromium missing, not root and no passwordless sudo; not installing" >&2
  exit 0
fi

echo "install_chromium: running ${SUDO:+$SUDO }apt-get update && apt-get install -y chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
echo "install_chromium: installed $(command -v chromium)"
