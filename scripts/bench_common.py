"""
What the benchmark scripts (scripts/bench_train.py, bench_decode.py, bench_megacontext.py)
share: where docs/benchmarks.md is, the opt-in `--record` flag that appends a dated section
to it, the machine line (CPU, cores, torch, GPU), the commit, the load average, and the
one-line error wrapper of their command lines.

Recording is explicit: without --record a benchmark prints its figures and leaves every
tracked file alone, so running a README example never dirties the checkout.

It imports no torch (the machine probe runs torch in a subprocess), so a script can parse
its flags and reject a typo before paying for that import. It must never hold a
benchmark's own logic.
"""

import os
import sys
import json
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"


def add_record_flag(parser):
    parser.add_argument("--record", action="store_true",
                        help="also append the figures as a dated section to docs/benchmarks.md "
                             "(default: print only, tracked files stay as they are)")
    return parser


def append_section(docs_path, section):
    """Append a markdown section to the benchmarks doc (creating it if needed). The new text
    goes to a temporary file that then replaces the doc, so a crash leaves the old doc whole."""
    docs_path = Path(docs_path)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    existing = docs_path.read_text() if docs_path.exists() else "# Benchmarks\n"
    tmp = docs_path.with_name(f".{docs_path.name}.{os.getpid()}.tmp")
    tmp.write_text(existing.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")
    os.replace(tmp, docs_path)


def record_section(section, docs_path=None):
    """--record: append `section` to docs/benchmarks.md and say so."""
    docs_path = docs_path or DOCS_PATH
    append_section(docs_path, section)
    print(f"appended to {docs_path}")

# -----------------------------------------------------------------------------
# Machine, commit, load


def cpu_model(cpuinfo_text):
    """The 'model name' of /proc/cpuinfo (the first one), or 'unknown CPU'."""
    for line in cpuinfo_text.splitlines():
        if line.lower().startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def rss_mib(pid="self"):
    """(current RSS, peak RSS) in MiB of a process (default this one), from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def git_commit(repo_dir):
    """Short commit of repo_dir, with '+dirty' when tracked files differ from it; None if not a git checkout."""
    try:
        top = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != Path(repo_dir).resolve():
            return None  # a plain directory that merely sits inside some other repository
        commit = subprocess.run(["git", "-C", str(repo_dir), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def describe_machine(python):
    """CPU model, core count, torch version and GPU (if any) as seen by `python`."""
    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = platform.processor() or "unknown CPU"
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads(), "
             "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "
             "'num_gpus': torch.cuda.device_count()}))")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"could not import torch with {python}: {out.stderr.strip().splitlines()[-1:]}; pass --python")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info.update(cpu=cpu, cores=os.cpu_count())
    return info


def machine_line(info):
    gpu = f"{info['num_gpus']}x {info['gpu']}" if info.get("gpu") else "no GPU"
    return f"{info['cpu']}, {info['cores']} cores (torch threads: {info['threads']}), {gpu}, torch {info['torch']}"

# -----------------------------------------------------------------------------
# Command lines


def run_cli(main):
    """Run a benchmark's main(); bad input (a missing checkpoint, a bad flag value, a failed
    subprocess) ends as one 'error: ...' line and exit status 1. NANOCHAT_DEBUG=1 shows the
    traceback instead."""
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:  # OSError covers FileNotFoundError
        if os.environ.get("NANOCHAT_DEBUG") == "1":
            raise
        # the message is the one line; a failed subprocess's message also quotes its last lines
        print(f"error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
