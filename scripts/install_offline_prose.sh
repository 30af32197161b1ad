#!/usr/bin/env bash
# Installs the Debian packages behind the offline English prose corpus (gemma_scope_pz/data/prose.py,
# used by `load_corpus("default+prose")`): fortunes-min and fortunes (BSD fortune quotations, BSD
# licence), cfi-en ("Copyright Does Not Exist", public domain) and dict-devil ("The Devil's
# Dictionary", public domain); about 1.3 MB of downloads.
# Idempotent: does nothing when they are installed. Installs as root, or through passwordless sudo;
# otherwise prints the command and exits 0 (the prose tests then fail with the same command).
set -euo pipefail

PACKAGES="fortunes-min fortunes cfi-en dict-devil"
installed=$(dpkg-query -W -f='${Status}\n' $PACKAGES 2>/dev/null | grep -c "install ok installed" || true)
if [ "$installed" -eq 4 ]; then
  echo "install_offline_prose: $PACKAGES already installed; nothing to do"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo"
else
  echo "install_offline_prose: not root and no passwordless sudo; run: apt-get install $PACKAGES" >&2
  exit 0
fi

echo "install_offline_prose: running ${SUDO:+$SUDO }apt-get install -y $PACKAGES"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $PACKAGES
