#!/usr/bin/env bash
# What the browser test (tests/test_browser.py) needs besides .venv: Debian's
# chromium (driven by the playwright package) and a CJK font, without which
# Chinese renders as empty boxes. Installed here when missing and we can (root +
# apt: about 1-2 minutes); otherwise the test fails and says what to run.
# `make test BROWSER=0` opts out explicitly; CI (CI=true) never opts out.
set -euo pipefail
if [ "${KNOWLM_BROWSER:-1}" = "0" ] && [ "${CI:-}" != "true" ]; then
  echo "==> browser test opted out (BROWSER=0)"
  exit 0
fi
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
fc-list :lang=zh family 2>/dev/null | grep -q "Noto Sans CJK" || need+=(fonts-noto-cjk)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing ${need[*]} for the browser test (about 1-2 minutes)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y "${need[@]}" >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
else
  echo "==> the browser test needs ${need[*]}: run  sudo apt-get install -y ${need[*]}" \
       " (or opt out: make test BROWSER=0); until then it fails" >&2
fi
