# Sourced by the entry scripts: create .venv from a pinned lock file if missing or stale, install
# this project into it (editable), build the offline `dvc plots` page, then activate it. Needs
# python3.11 and a package index (PyPI or a configured mirror); the plots page also needs npm and
# its registry (or a mirror), and set-up goes on without them.
#   TAPEWORK_LOCK=requirements-gpu.lock  picks the lock (default requirements.lock: CPU-only TensorFlow).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOCK_NAME="${TAPEWORK_LOCK:-requirements.lock}"
LOCK="$ROOT/$LOCK_NAME"
if [ ! -f "$LOCK" ]; then
  echo "TAPEWORK_LOCK=$LOCK_NAME: no such lock file in $ROOT (requirements.lock or requirements-gpu.lock)" >&2
  return 2 2>/dev/null || exit 2
fi
# Two stamps. The checkout's path and the lock's name and bytes decide the packages: a change
# recreates .venv from scratch, so switching between the CPU and GPU locks leaves no package of
# the other behind. pyproject.toml decides the editable install of this project: a change
# reinstalls only that.
LOCK_STAMP="$ROOT/.venv/.lock.sha256"
PROJECT_STAMP="$ROOT/.venv/.pyproject.sha256"
want_lock="$( { echo "$ROOT"; echo "$LOCK_NAME"; cat "$LOCK"; } | sha256sum | cut -d' ' -f1)"
want_project="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$ROOT/.venv/bin/python" ] || [ "$(cat "$LOCK_STAMP" 2>/dev/null)" != "$want_lock" ]; then
  echo "setting up .venv from $LOCK_NAME (one time)..." >&2
  "$PYTHON" -m venv --clear "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$LOCK"
  echo "$want_lock" > "$LOCK_STAMP"
fi
if [ "$(cat "$PROJECT_STAMP" 2>/dev/null)" != "$want_project" ]; then
  # --no-deps: the lock above already holds every version; pip resolves nothing here.
  "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$ROOT"
  echo "$want_project" > "$PROJECT_STAMP"
fi
# The offline page for `dvc plots show/diff`: Vega, Vega-Lite and vega-embed from `npm pack` at the
# versions pinned in tools/offline_plots.pins, checked, inlined into .offline-plots/page.html and set
# as plots.html_template in .dvc/config.local. A no-op when current; a failure prints one line and
# leaves DVC on its default page (which loads Vega from the web), so set-up goes on.
"$ROOT/.venv/bin/python" -m tools.offline_plots || true
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
# No DVC telemetry (also set in .dvc/config) on air-gapped machines. TensorFlow's log level is
# not set here: each stage sets it itself (tapework/quiet.py), and a value exported by the user wins.
export DVC_NO_ANALYTICS=1
