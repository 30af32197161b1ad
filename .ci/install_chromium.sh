#!/usr/bin/env bash
# Install Debian's chromium for the headless rendering test (tests/test_analysis_render.py).
# Idempotent: does nothing when a chromium binary is already on PATH. Needs root (CI containers).
set -euo pipefail

for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "install_chromium: $name already present at $(command -v "$name"); nothing to do"
    exit 0
  fi
done

if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium: chromium missing and not running as root; not installing" >&2
  exit 1
fi

echo "install_chromium: running apt-get update && apt-get install -y chromium"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
echo "install_chromium: installed $(command -v chromium) ($(chromium --version 2>/dev/null || echo 'version unknown'))"
