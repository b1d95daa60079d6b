#!/usr/bin/env bash
# Installs what the Flower screenshot needs, if missing: Debian's chromium and playwright-core from npm
# (package-lock.json pins it). Nothing downloads a browser build of its own.
set -euo pipefail
cd "$(dirname "$0")"

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ] || ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "ensure-browser: installing Debian's chromium (and nodejs/npm if missing)" >&2
    apt-get update -qq
    packages="chromium"
    command -v node >/dev/null || packages="$packages nodejs"
    command -v npm >/dev/null || packages="$packages npm"
    # shellcheck disable=SC2086 # a list of package names
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
  else
    echo "ensure-browser: need $chromium, node and npm (Debian: apt-get install chromium nodejs npm)" >&2
    exit 1
  fi
fi
if [ ! -f node_modules/playwright-core/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
