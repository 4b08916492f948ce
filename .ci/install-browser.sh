#!/usr/bin/env bash
# Install Debian's Chromium and PyPI's playwright (the Python driver only: never `playwright install`).
#
#   bash .ci/install-browser.sh            # prints /usr/bin/chromium on stdout; logs go to stderr
#
# Idempotent: nothing is fetched when chromium is installed and playwright imports (about 0.3 s).
# PYTHON (default python3) chooses the interpreter/venv that gets playwright; PLAYWRIGHT_SPEC pins it.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PLAYWRIGHT_SPEC="${PLAYWRIGHT_SPEC:-playwright>=1.45}"
log() { echo "[install-browser] $*" >&2; }

apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  export DEBIAN_FRONTEND=noninteractive
  # `apt-get update` only when needed: no package lists yet, or the install fails on stale lists.
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "no apt package lists: apt-get update"
    apt-get update >&2
  fi
  log "apt-get install ${missing[*]}"
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    log "apt-get install failed; apt-get update and retry"
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
}

# Fonts so that screenshots show text (Debian's chromium only recommends them).
apt_install chromium fonts-liberation
[[ -x /usr/bin/chromium ]] || { log "/usr/bin/chromium missing"; exit 1; }
log "chromium $(dpkg-query -W -f='${Version}' chromium)"

if ! "$PYTHON" -c 'import playwright.async_api' 2>/dev/null; then
  log "pip install $PLAYWRIGHT_SPEC"
  # The pip package carries its own Node driver; browsers are NOT downloaded by pip.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    "$PLAYWRIGHT_SPEC" >&2
fi
log "playwright $("$PYTHON" -c 'from importlib.metadata import version; print(version("playwright"))')"
echo /usr/bin/chromium
