#!/usr/bin/env bash
# Smoke check of the installed code-server: start it on loopback with a throwaway HOME, wait for /healthz,
# fetch / and check the workbench HTML, then stop it.   bash .ci/check-code-server.sh [path-to-code-server]
set -euo pipefail

CS="${1:-$(bash "$(dirname "$0")/install-code-server.sh")}"
work="$(mktemp -d)"
pid=""
cleanup() {
  # Kill the whole process group: SIGTERM to the main pid alone leaves its fileWatcher, agentHost and
  # copilot-runtime children running (re-parented to init).
  if [[ -n "$pid" ]] && kill -0 -- "-$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$work/home" "$work/data" "$work/folder"
echo 'print("hello")' >"$work/folder/hello.py"

t0=$(date +%s.%N)
# setsid: own process group (pgid = $pid), so cleanup can stop every child.
HOME="$work/home" setsid "$CS" --auth none --bind-addr "127.0.0.1:$port" --disable-telemetry \
  --disable-update-check --disable-workspace-trust --disable-getting-started-override \
  --user-data-dir "$work/data" "$work/folder" >"$work/log" 2>&1 &
pid=$!

ok=""
for _ in $(seq 300); do
  if health="$(curl -fsS --max-time 2 "http://127.0.0.1:$port/healthz" 2>/dev/null)"; then ok=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
t_ready=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f}')")
if [[ -z "$ok" ]]; then
  echo "code-server did not answer /healthz; log:" >&2
  cat "$work/log" >&2
  exit 1
fi

# / redirects to /?folder=... when a folder is given; follow it.
html="$(curl -fsSL --max-time 10 "http://127.0.0.1:$port/")"
grep -q 'workbench' <<<"$html" || { echo "no workbench in / :" >&2; head -c 2000 <<<"$html" >&2; exit 1; }
commit="$(grep -oE 'stable-[0-9a-f]{40}' <<<"$html" | head -1 || true)"

echo "OK $(HOME="$work/home" "$CS" --version 2>/dev/null | grep -E '^[0-9]+\.' | head -1): /healthz $health after ${t_ready}s; / has the workbench${commit:+ ($commit)}"
