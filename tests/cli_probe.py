"""Run a CLI module as `python -m` would, in a fresh interpreter, and report how it exited and
whether torch got imported on the way (our CLIs must reject bad flags before torch loads)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def exit_before_torch(module, argv):
    """-> (last stdout line 'exit CODE TORCH_IMPORTED', stderr) of `python -m module *argv`."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['x', *{list(argv)!r}]\n"
             "try:\n"
             f"    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return r.stdout.strip(), r.stderr
