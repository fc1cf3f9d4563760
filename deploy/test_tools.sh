#!/usr/bin/env bash
# Tools the monitoring tests run for real: Prometheus + promtool (Debian package `prometheus`) and
# amtool (`prometheus-alertmanager`). Installed when missing and this user may (root with apt-get);
# otherwise one line says which tests will skip. Idempotent, quiet when everything is there.
set -uo pipefail
missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null || missing+=(prometheus-alertmanager)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[test tools] installing ${missing[*]} (Debian packages) for the monitoring tests"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends "${missing[@]}"; } >/dev/null 2>&1 && exit 0
fi
echo "[test tools] ${missing[*]} not installed (apt-get install ${missing[*]}): the monitoring" \
  "tests that need them will skip" >&2
exit 0
