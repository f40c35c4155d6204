#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's chromium (browser test of the
# labelling pages) and docker-compose (validates docker-compose.yml without a Docker engine).
# Installs them with apt-get when missing and we are root; otherwise says what to install.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "madseg: the tests need these system packages: ${missing[*]}" >&2
  echo "        install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "madseg: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
