# Sourced by speedrun.sh and test.sh: make sure uv exists, then sync the locked environment.
# uv comes from PyPI (pip) so this works on machines that reach only package registries.
if ! command -v uv >/dev/null 2>&1; then
    export PATH="$HOME/.local/bin:$PATH"
    if ! command -v uv >/dev/null 2>&1; then
        echo "uv not found: installing it with pip"
        python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
        hash -r
    fi
fi
# Use the interpreter on the machine (>=3.10) rather than downloading one.
export UV_PYTHON_PREFERENCE="${UV_PYTHON_PREFERENCE:-system}"
uv sync --frozen ${UV_SYNC_EXTRA_ARGS:-}
