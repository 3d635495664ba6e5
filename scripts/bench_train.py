"""
Training throughput benchmark: tok/s and MFU of scripts.base_train, optionally side by side
with upstream nanochat's own base_train at exactly the same flags.

It runs base_train as a subprocess for a few steps, reads the per-step log line that both
implementations print

    step 00012/00020 (60.00%) | loss: ... | dt: 2821.06ms | tok/sec: 725 | bf16_mfu: 0.00 | ...

drops the first steps (torch.compile and warm-up), and reports the median. With
--upstream-dir the two are run interleaved (ours, upstream, upstream, ours, ours, ...) so that
noise from a shared machine lands on both alike (who goes first alternates between repeats,
so a load that drifts over the benchmark favours neither), and the ratio ours/upstream is printed.

Get an upstream checkout (the commit this project tracks) with either of

    git clone https://github.com/karpathy/nanochat /tmp/nanochat-upstream && git -C /tmp/nanochat-upstream checkout 92d63d4
    mkdir /tmp/nanochat-upstream && git -C <bare mirror> archive 92d63d4 | tar -x -C /tmp/nanochat-upstream

then, from the root of this repo (CPU-sized config, the one recorded in docs/benchmarks.md):

    python -m scripts.bench_train --upstream-dir /tmp/nanochat-upstream

base_train flags go after `--` and are passed to both sides unchanged, e.g. on 8 GPUs:

    python -m scripts.bench_train --upstream-dir /tmp/nanochat-upstream --nproc-per-node 8 --steps 30 -- --depth=12

Data: both sides read the same NANOCHAT_BASE_DIR. By default a temporary one is built with
this repo's scripts.offline_data + scripts.tok_train (no network); --base-dir DIR reuses the
tokenizer/ and base_data_climbmix/ of an existing one (linked, never written: checkpoints
go to the temporary dir). Each side gets its own fresh inductor cache, so the first run of
each pays a cold torch.compile (reported separately) and later repeats start warm;
--cache-dir DIR keeps those caches between invocations (every repeat then starts warm).

It prints the figures; with --record it also appends a dated section with them, the command,
the commit and the machine (CPU model, cores, torch version, load average) to
docs/benchmarks.md (scripts/bench_common.py).
"""

import os
import re
import sys
import shutil
import argparse
import datetime
import statistics
import subprocess
import tempfile
from pathlib import Path

from scripts.bench_common import (REPO_ROOT, DOCS_PATH, add_record_flag, record_section, load_average, git_commit,
                                  describe_machine, machine_line, run_cli)

REQUIRED_RATIO = 0.95  # on CPU at equal flags, ours must reach this fraction of upstream's tok/s

# The CPU-sized config used for the recorded comparison (and the default when no flags are given)
CPU_TRAIN_FLAGS = ["--depth=4", "--max-seq-len=256", "--device-batch-size=8", "--total-batch-size=2048", "--window-pattern=L"]
# Always appended: no evals, samples or CORE inside the timed window
QUIET_FLAGS = ["--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1"]

STEP_LINE = re.compile(
    r"^step (?P<step>\d+)/(?P<total>\d+) .*?\| dt: (?P<dt_ms>[\d.]+)ms \| tok/sec: (?P<tok_per_sec>[\d,]+) \| bf16_mfu: (?P<mfu>[\d.]+)"
)

# -----------------------------------------------------------------------------
# Parsing and summarising (pure functions, tested in tests/test_bench.py)

def parse_step_lines(text):
    """Every per-step training log line in `text`, as dicts {step, total, dt_ms, tok_per_sec, mfu}."""
    steps = []
    for line in text.splitlines():
        m = STEP_LINE.match(line.strip())
        if m is None:
            continue
        steps.append({
            "step": int(m["step"]),
            "total": int(m["total"]),
            "dt_ms": float(m["dt_ms"]),
            "tok_per_sec": int(m["tok_per_sec"].replace(",", "")),
            "mfu": float(m["mfu"]),
        })
    return steps


def summarize_run(steps, skip):
    """
    Median figures of one run, leaving out steps with index < skip (compile and warm-up).
    The first logged step is kept apart as `first_step_s`: with torch.compile it is
    dominated by compilation, which is worth knowing but is not throughput.
    """
    if not steps:
        raise ValueError("no 'step NNNNN/NNNNN ... | tok/sec: N | bf16_mfu: M' lines in the training log; "
                         "did base_train fail or print a different format?")
    kept = [s for s in steps if s["step"] >= skip]
    if not kept:
        raise ValueError(f"all {len(steps)} logged steps are warm-up (--skip {skip}); run more --steps or lower --skip")
    return {
        "first_step_s": steps[0]["dt_ms"] / 1000,
        "num_steps": len(kept),
        "median_tok_per_sec": statistics.median(s["tok_per_sec"] for s in kept),
        "median_dt_ms": statistics.median(s["dt_ms"] for s in kept),
        "median_mfu": statistics.median(s["mfu"] for s in kept),
        "tok_per_sec": [s["tok_per_sec"] for s in kept],
    }


def summarize_side(runs):
    """Pool the kept steps of all runs of one side (ours or upstream)."""
    pooled = [t for r in runs for t in r["tok_per_sec"]]
    return {
        "median_tok_per_sec": statistics.median(pooled),
        "num_steps": len(pooled),
        "median_mfu": statistics.median(r["median_mfu"] for r in runs),
        "first_step_s": [r["first_step_s"] for r in runs],
    }


def compare(ours_runs, upstream_runs):
    """
    Two ratios ours/upstream: of the pooled medians, and the median over repeats of the
    per-repeat ratio (run i of ours against run i of upstream, which ran right after it;
    this one is less sensitive to load that drifts over the whole benchmark).
    """
    ours, up = summarize_side(ours_runs), summarize_side(upstream_runs)
    pooled = ours["median_tok_per_sec"] / up["median_tok_per_sec"]
    paired = statistics.median(o["median_tok_per_sec"] / u["median_tok_per_sec"] for o, u in zip(ours_runs, upstream_runs))
    return {"pooled_ratio": pooled, "paired_ratio": paired, "passes": pooled >= REQUIRED_RATIO}


def format_table(rows, markdown=False):
    """rows: list of dicts with side, run, first_step_s, median_tok_per_sec, median_dt_ms, median_mfu, load, wall_s."""
    header = ["side", "run", "first step (s)", "median tok/s", "median dt (ms)", "bf16_mfu", "load avg 1m (start/end)", "wall (s)"]
    body = []
    for r in rows:
        body.append([
            r["side"], str(r["run"]),
            f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "",
            f"{r['median_tok_per_sec']:,.0f}",
            f"{r['median_dt_ms']:.1f}" if r.get("median_dt_ms") is not None else "",
            f"{r['median_mfu']:.2f}",
            r.get("load", ""),
            f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "",
        ])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(cells) for cells in body])


# -----------------------------------------------------------------------------
# Running base_train

def default_python():
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def check_upstream_dir(path):
    path = Path(path).resolve()
    if not (path / "scripts" / "base_train.py").is_file() or not (path / "nanochat" / "gpt.py").is_file():
        raise FileNotFoundError(
            f"--upstream-dir {path} is not a nanochat checkout (no scripts/base_train.py + nanochat/gpt.py); get one with: "
            f"git clone https://github.com/karpathy/nanochat {path} && git -C {path} checkout 92d63d4")
    if path == REPO_ROOT:
        raise ValueError("--upstream-dir points at this repo itself; give it a separate upstream checkout")
    return path


def prepare_base_dir(work_dir, python, source_base_dir=None):
    """
    A base dir for both sides. From source_base_dir: links to its tokenizer/ and data shards
    (so checkpoints written at the end of each run land in work_dir, not in the user's dir).
    Otherwise: offline shards from CPython's docs and a 4096-token tokenizer, built with this
    repo's scripts (same files for both sides, so the data cannot favour either).
    """
    base = Path(work_dir) / "base"
    base.mkdir(parents=True, exist_ok=True)
    if source_base_dir is not None:
        src = Path(source_base_dir).resolve()
        for name in ("tokenizer", "base_data_climbmix"):
            if not (src / name).is_dir():
                raise FileNotFoundError(f"--base-dir {src} has no {name}/ directory; prepare it with scripts.offline_data "
                                        f"and scripts.tok_train, or leave --base-dir out to build a temporary one")
            (base / name).symlink_to(src / name)
        return base
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    for cmd in (["-m", "scripts.offline_data"], ["-m", "scripts.tok_train", "--vocab-size=4096", "--max-chars=5000000"]):
        print(f"preparing data: python {' '.join(cmd)}", flush=True)
        out = subprocess.run([python, *cmd], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"data preparation failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return base


def train_command(python, nproc_per_node, train_flags, steps, model_tag):
    launcher = [python]
    if nproc_per_node > 1:
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]
    return launcher + ["-m", "scripts.base_train", *train_flags, f"--num-iterations={steps}", *QUIET_FLAGS, f"--model-tag={model_tag}"]


def run_once(side, repo_dir, cmd, base_dir, cache_dir, log_dir, run_index):
    """One base_train run; returns (log text, wall seconds, load average at start, at end)."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("NANOCHAT_COMPILE", None)  # our dev knob to skip compile; upstream always compiles, so we must too
    load_start = load_average()[0]
    t0 = datetime.datetime.now()
    out = subprocess.run(cmd, cwd=repo_dir, env=env, capture_output=True, text=True)
    wall_s = (datetime.datetime.now() - t0).total_seconds()
    load_end = load_average()[0]
    log_path = Path(log_dir) / f"{side}_{run_index}.log"
    log_path.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{side} base_train exited with {out.returncode} (full log: {log_path}):\n{tail}")
    return out.stdout, wall_s, load_start, load_end

# -----------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Training tok/s and MFU of base_train (optionally vs upstream's). base_train flags go after --.",
        allow_abbrev=False)
    parser.add_argument("--upstream-dir", type=str, default=None, help="upstream nanochat checkout to compare against (see the docstring)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (--num-iterations)")
    parser.add_argument("--skip", type=int, default=3, help="leave out steps 0..skip-1 (compile, warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved ours/upstream")
    parser.add_argument("--nproc-per-node", type=int, default=1, help=">1: launch with torch.distributed.run (torchrun)")
    parser.add_argument("--python", type=str, default=None, help="interpreter for both sides (default: .venv/bin/python)")
    parser.add_argument("--base-dir", type=str, default=None, help="reuse tokenizer/ and base_data_climbmix/ from this base dir")
    parser.add_argument("--cache-dir", type=str, default=None, help="keep each side's inductor cache here across invocations "
                        "(default: fresh caches in the temporary dir, so repeat 1 compiles cold)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, base dir, inductor caches)")
    add_record_flag(parser)
    return parser


def split_train_flags(argv):
    """Split argv at `--`: our own flags before it, base_train flags after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_flags = split_train_flags(argv)
    args = build_parser().parse_args(own)
    train_flags = train_flags or list(CPU_TRAIN_FLAGS)
    if args.steps <= args.skip:
        raise ValueError(f"--steps {args.steps} leaves nothing after skipping {args.skip} warm-up steps; use more --steps")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    python = args.python or default_python()
    upstream_dir = check_upstream_dir(args.upstream_dir) if args.upstream_dir else None
    sides = [("ours", REPO_ROOT)] + ([("upstream", upstream_dir)] if upstream_dir else [])

    machine = describe_machine(python)
    work_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        base_dir = prepare_base_dir(work_dir, python, args.base_dir)
        rows, runs = [], {name: [] for name, _ in sides}
        for i in range(1, args.repeats + 1):
            # alternate who goes first (ours, upstream, upstream, ours, ...) so a load that
            # steadily rises or falls over the benchmark does not favour either side
            for name, repo_dir in (sides if i % 2 == 1 else sides[::-1]):
                cmd = train_command(python, args.nproc_per_node, train_flags, args.steps, f"bench_{name}")
                print(f"[{name} {i}/{args.repeats}] {' '.join(cmd[1:])}  (cwd {repo_dir})", flush=True)
                cache_dir = Path(args.cache_dir or work_dir).resolve() / f"inductor_{name}"
                log, wall_s, load0, load1 = run_once(name, repo_dir, cmd, base_dir, cache_dir, work_dir, i)
                summary = summarize_run(parse_step_lines(log), args.skip)
                runs[name].append(summary)
                rows.append(dict(summary, side=name, run=i, load=f"{load0:.2f} / {load1:.2f}", wall_s=wall_s))
                print(f"    median tok/s {summary['median_tok_per_sec']:,.0f} | first step {summary['first_step_s']:.1f}s | "
                      f"load {load0:.2f} -> {load1:.2f}", flush=True)
        for name, _ in sides:
            side = summarize_side(runs[name])
            rows.append(dict(side=name, run="all", first_step_s=None, median_dt_ms=None,
                             median_tok_per_sec=side["median_tok_per_sec"], median_mfu=side["median_mfu"], load="", wall_s=None))
        result = compare(runs["ours"], runs["upstream"]) if upstream_dir else None
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    # --- report
    print()
    print(format_table(rows))
    verdict = ""
    if result is not None:
        verdict = (f"ours/upstream tok/s: {result['pooled_ratio']:.3f} (pooled medians), {result['paired_ratio']:.3f} "
                   f"(median of per-repeat ratios); requirement >= {REQUIRED_RATIO}: {'PASS' if result['passes'] else 'FAIL'}")
        print(verdict)
    print(f"machine: {machine_line(machine)}; load average now {' '.join(f'{x:.2f}' for x in load_average())}")

    if args.record:
        command = "python -m scripts.bench_train " + " ".join(own + ["--"] + train_flags)
        upstream_note = ""
        if upstream_dir:
            upstream_note = f"- upstream: `{upstream_dir}` at {git_commit(upstream_dir) or '92d63d4 (git archive, not a checkout)'}\n"
        section = (
            f"### Training throughput, {datetime.date.today().isoformat()}\n\n"
            f"- commit: {git_commit(REPO_ROOT) or 'unknown'}\n"
            f"{upstream_note}"
            f"- device: {machine_line(machine)}\n"
            f"- command: `{command}` ({args.repeats} repeat{'s' if args.repeats != 1 else ''}, {args.steps} steps each, steps < {args.skip} skipped, "
            f"same python and data for both sides, interleaved)\n"
            f"- load average (1 min) at the start/end of each run is in the table; the machine is shared\n\n"
            f"{format_table(rows, markdown=True)}\n"
        )
        if verdict:
            section += f"\n{verdict}\n"
        record_section(section, DOCS_PATH)
    return result


if __name__ == "__main__":
    run_cli(main)
