# Sourced by the entry scripts: create .venv from the pinned lock file if missing or stale,
# then activate it. Needs only python3.11 and a package index (PyPI or a configured mirror).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOCK="$ROOT/requirements.lock"
STAMP="$ROOT/.venv/.lock.sha256"
want="$(sha256sum "$LOCK" | cut -d' ' -f1)"
if [ ! -x "$ROOT/.venv/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv from requirements.lock (one time)..." >&2
  "$PYTHON" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$LOCK"
  echo "$want" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
# Quieter TensorFlow logs; no DVC telemetry (also set in .dvc/config) on air-gapped machines.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export DVC_NO_ANALYTICS=1
