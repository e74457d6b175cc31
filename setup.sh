#!/usr/bin/env bash
# Sets up a fresh machine for rrvf_jax: system packages, then .venv at the repo root (created or
# reused). `bash setup.sh` installs what the library and the demo need; `--test` adds the tests'.
set -euo pipefail
cd "$(dirname "$0")"

# System packages: bubblewrap (sandbox namespaces), Chromium (HTML renderer), fixed fonts (charts).
APT_PACKAGES=(bubblewrap chromium fonts-liberation fonts-dejavu-core)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup.sh: installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup.sh: WARNING: missing system packages ${missing[*]}; install them with" \
      "'sudo apt-get install ${missing[*]}' (sandbox isolation and the HTML renderer need them)." >&2
  fi
fi

requirements=requirements.txt
[ "${1:-}" = "--test" ] && requirements=requirements-test.txt
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r "$requirements"
.venv/bin/pip install -q --no-deps -e .
echo "setup.sh: ready (.venv, $requirements)"
