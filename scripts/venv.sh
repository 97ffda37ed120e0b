# Sourced by scripts/demo and scripts/test: make sure .venv exists (Python 3.11+) and
# holds crmscore with its dev dependencies, reinstalling only when pyproject.toml changed.
# shellcheck shell=bash

venv_python() {
  if [ ! -x .venv/bin/python ]; then
    local py="" candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
      if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        py=$candidate
        break
      fi
    done
    if [ -z "$py" ]; then
      echo "crmscore needs Python 3.11 or newer; found: $(python3 --version 2>&1 || echo none)." >&2
      echo "Install one (e.g. apt-get install python3.11) or set PYTHON=/path/to/python3.11." >&2
      exit 1
    fi
    echo "creating .venv with $py ($("$py" --version 2>&1)) ..." >&2
    if ! "$py" -m venv .venv; then
      rm -rf .venv
      echo "'$py -m venv' failed; on Debian/Ubuntu install the python3-venv package." >&2
      exit 1
    fi
  fi
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo ".venv has $(.venv/bin/python --version 2>&1); crmscore needs 3.11+: remove .venv" >&2
    exit 1
  fi
  local stamp=.venv/.crmscore-installed want
  want=$(cksum < pyproject.toml)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing crmscore and its dependencies into .venv ..." >&2
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' \
      >.venv/pip-install.log 2>&1; then
      tail -n 30 .venv/pip-install.log >&2
      echo "pip install -e '.[dev]' failed (full log: .venv/pip-install.log)" >&2
      exit 1
    fi
    echo "$want" > "$stamp"
  fi
}
