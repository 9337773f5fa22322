# shellcheck shell=bash
# Sourced by the launchers: activate the project's virtual environment, creating it from
# requirements.txt when it is missing or the requirements changed. Set LGDLM_PYTHON to use
# another interpreter, or LGDLM_NO_VENV=1 to use the current environment as it is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${LGDLM_NO_VENV:-0}" != "1" ]; then
  VENV="${LGDLM_VENV:-$ROOT/.venv}"
  stamp="$VENV/.requirements.sha256"
  want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
  if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[env] installing requirements.txt into $VENV" >&2
    "${LGDLM_PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
    echo "$want" > "$stamp"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
cd "$ROOT"
