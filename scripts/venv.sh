# shellcheck shell=bash
# Sourced by scripts/test, scripts/demo and scripts/bench: create or reuse .venv at the
# repository root with a Python >= 3.12 and the project's dependencies (not the project
# itself: the addon must work as a plain `mitmdump -s fp_addon.py` script).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# A candidate counts only if running it works and reports >= 3.12: pyenv shims exist
# on PATH but fail unless their version is selected.
_python_ok() {
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local name candidate root
    for name in python3.14 python3.13 python3.12 python3 python; do
        candidate="$(command -v "$name" 2>/dev/null)" || continue
        if _python_ok "$candidate"; then echo "$candidate"; return 0; fi
    done
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in $(ls -d "$root"/versions/3.*/bin/python3 2>/dev/null | sort -rV); do
        if _python_ok "$candidate"; then echo "$candidate"; return 0; fi
    done
    return 1
}

# ensure_venv [extras]: extras is "test" for the test and bench tools, empty for runtime.
ensure_venv() {
    local extras="${1:-}" python stamp want
    if ! [ -x "$VENV/bin/python" ] || ! _python_ok "$VENV/bin/python"; then
        if ! python="$(find_python)"; then
            cat >&2 <<'MSG'
error: fp-tap needs Python 3.12 or newer (mitmproxy 12 does), and none was found.
Tried python3.14, python3.13, python3.12, python3 and python on PATH, and pyenv's versions.
Install one, e.g.:  apt-get install python3.12 python3.12-venv   or   pyenv install 3.13
MSG
            return 1
        fi
        echo "setting up $VENV with $python ($("$python" --version 2>&1))" >&2
        rm -rf "$VENV"
        # A Python without ensurepip (Debian's python3.X without python3.X-venv) leaves
        # a .venv without pip, which the next run would take for a working one.
        "$python" -m venv "$VENV" || { rm -rf "$VENV"; return 1; }
    fi
    # Reinstall only when the dependency list changed; one stamp per set of extras, so
    # running the demo after the tests (or the other way round) installs nothing.
    want="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)"
    stamp="$VENV/.fp-tap-deps${extras:+-$extras}"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
    if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        # Left by a run whose venv creation failed half-way: start again next time.
        echo "error: $VENV has no pip (made by a Python without ensurepip?); removing it." >&2
        echo "Install the venv module for that Python (e.g. apt-get install python3.12-venv) and run again." >&2
        rm -rf "$VENV"
        return 1
    fi
    echo "installing dependencies into $VENV ..." >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip \
        2> >(grep -v "is ignored: it is neither" >&2) >&2 || return 1
    "$VENV/bin/python" - "$extras" <<'PY' > "$VENV/.fp-tap-requirements.txt" || return 1
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(project["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    deps += project["optional-dependencies"][extra]
print("\n".join(deps))
PY
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r "$VENV/.fp-tap-requirements.txt" 2> >(grep -v "is ignored: it is neither" >&2)) || return 1
    echo "$want" > "$stamp"
}
