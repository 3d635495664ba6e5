"""
A one-page report card of a run: the headline numbers of every stage in one markdown
table, printed and written to <base_dir>/report.md (speedrun.sh calls this at the end).

It only reads what the stages already left in the base dir, and skips whatever is missing:
  speedrun_logs/tok_eval.log                compression (bytes per token) of `python -m scripts.tok_eval`
  speedrun_logs/tok_train.log               tokenizer training time
  base_checkpoints/<tag>/meta_<step>.json   base model size, steps, val bpb, training time
  speedrun_logs/base_eval.log               train/val bpb of `python -m scripts.base_eval`
  base_eval/base_model_<step>.csv           CORE metric
  chatsft_checkpoints/<tag>/meta_<step>.json  SFT steps and val bpb
  speedrun_logs/chat_sft.log                SFT training time
  chatrl_checkpoints/<tag>/                 RL steps
  chat_eval/<source>_<tag>_<step>.json      per-task accuracies and ChatCORE of `python -m scripts.chat_eval`
The logs are whatever a pipeline tee'd there; the names above are the ones speedrun.sh uses.

    python -m scripts.report_card [--model-tag cpu_tiny] [--wall-time-s 312]

No torch import: it runs in a second and works on a machine that only has the artifacts.
"""

import os
import re
import csv
import json
import glob
import argparse
import datetime

# -----------------------------------------------------------------------------
# Readers: each returns None (or an empty dict) when its input is not there


def get_base_dir():
    # the same rule as nanochat.common.get_base_dir, without importing torch through it
    return os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")


def read_text(path):
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def pick_model_tag(checkpoints_dir, model_tag=None):
    """The requested tag if it exists, else the most recently written tag directory."""
    if not os.path.isdir(checkpoints_dir):
        return None
    if model_tag is not None:
        return model_tag if os.path.isdir(os.path.join(checkpoints_dir, model_tag)) else None
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        return None
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def latest_checkpoint(checkpoints_dir, model_tag=None):
    """(tag, step, meta dict) of the highest saved step under checkpoints_dir/<tag>, or None."""
    tag = pick_model_tag(checkpoints_dir, model_tag)
    if tag is None:
        return None
    steps = []
    for path in glob.glob(os.path.join(checkpoints_dir, tag, "model_*.pt")):
        m = re.search(r"model_(\d+)\.pt$", path)
        if m:
            steps.append(int(m.group(1)))
    if not steps:
        return None
    step = max(steps)
    text = read_text(os.path.join(checkpoints_dir, tag, f"meta_{step:06d}.json"))
    try:
        meta = json.loads(text) if text else {}
    except json.JSONDecodeError:
        meta = {}
    return tag, step, meta


def parse_tokenizer_compression(log_text):
    """Mean bytes/token over the rows of tok_eval's 'Our tokenizer' table, and the row count."""
    if not log_text or "Our tokenizer:" not in log_text:
        return None
    table = log_text.split("Our tokenizer:", 1)[1]
    ratios = []
    for line in table.splitlines():
        # data rows look like: "news            1819     455      4.00"
        m = re.match(r"^\s*(\S+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s*$", line)
        if m:
            ratios.append(float(m.group(4)))
        elif ratios and not line.strip():
            break  # the blank line after the table
    if not ratios:
        return None
    return sum(ratios) / len(ratios), len(ratios)


def parse_float_after(log_text, label):
    """The last number printed after `label` in a log (e.g. 'val bpb:'), or None."""
    if not log_text:
        return None
    found = re.findall(re.escape(label) + r"\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", log_text)
    return float(found[-1]) if found else None


def read_core_metric(base_dir, step=None):
    """The CORE line of base_eval's CSV for `step` (else the newest CSV)."""
    if step is not None:
        paths = [os.path.join(base_dir, "base_eval", f"base_model_{step:06d}.csv")]
    else:
        paths = sorted(glob.glob(os.path.join(base_dir, "base_eval", "*.csv")), key=os.path.getmtime)[-1:]
    for path in paths:
        text = read_text(path)
        if not text:
            continue
        for row in csv.reader(text.splitlines()):
            if row and row[0].strip() == "CORE":
                return float(row[-1])
    return None


def read_chat_eval(base_dir, source, model_tag=None):
    """The newest chat_eval result for a source ('sft' or 'rl'), optionally for one model tag."""
    pattern = f"{source}_{model_tag}_*.json" if model_tag else f"{source}_*.json"
    paths = sorted(glob.glob(os.path.join(base_dir, "chat_eval", pattern)), key=os.path.getmtime)
    for path in reversed(paths):
        try:
            return json.loads(read_text(path))
        except (TypeError, json.JSONDecodeError):
            continue
    return None

# -----------------------------------------------------------------------------
# The card


def fmt(value, digits=4):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# Bits per byte is only comparable on the same text: the base rows are measured on the
# pretraining shards, the SFT row on the chat conversations of the SFT val mixture
PRETRAIN_DATA = "pretraining data"
CHAT_DATA = "chat data (SFT val mixture)"
BPB_NOTE = (f"bpb rows say which text they are measured on: {PRETRAIN_DATA} (the val shard of the corpus) "
            f"for the base model, {CHAT_DATA} for SFT. Numbers on different text are not comparable.")


def collect(base_dir, model_tag=None, logs_dir=None, wall_time_s=None):
    """Rows of (stage, metric, value string) for everything found in base_dir."""
    logs_dir = logs_dir or os.path.join(base_dir, "speedrun_logs")
    log = lambda name: read_text(os.path.join(logs_dir, name))
    rows = []

    # Tokenizer (its vocab size is in the base model's row)
    compression = parse_tokenizer_compression(log("tok_eval.log"))
    if compression:
        rows.append(("tokenizer", f"compression, bytes/token (mean of {compression[1]} texts)", fmt(compression[0], 2)))
    tok_time = parse_float_after(log("tok_train.log"), "Training time:")
    if tok_time is not None:
        rows.append(("tokenizer", "training time", f"{tok_time:.1f}s"))

    # Base model
    base = latest_checkpoint(os.path.join(base_dir, "base_checkpoints"), model_tag)
    if base:
        tag, step, meta = base
        cfg = meta.get("model_config", {})
        if cfg:
            rows.append(("base", "model", f"{tag}: depth {cfg.get('n_layer')}, width {cfg.get('n_embd')}, "
                                          f"seq len {cfg.get('sequence_len')}, vocab {cfg.get('vocab_size')}"))
        rows.append(("base", "steps", fmt(step)))
        if meta.get("val_bpb") is not None:
            rows.append(("base", f"val bpb, {PRETRAIN_DATA} (last training eval)", fmt(meta["val_bpb"])))
        train_time = meta.get("loop_state", {}).get("total_training_time")
        if train_time:
            rows.append(("base", "training time (excl. first 10 steps)", f"{train_time / 60:.2f}m"))
    base_eval_log = log("base_eval.log")
    for split in ("train", "val"):
        bpb = parse_float_after(base_eval_log, f"{split} bpb:")
        if bpb is not None:
            rows.append(("base", f"{split} bpb, {PRETRAIN_DATA} (base_eval)", fmt(bpb)))
    core = read_core_metric(base_dir, base[1] if base else None)
    if core is not None:
        rows.append(("base", "CORE", fmt(core)))

    # SFT
    sft = latest_checkpoint(os.path.join(base_dir, "chatsft_checkpoints"), model_tag)
    if sft:
        tag, step, meta = sft
        rows.append(("sft", "steps", fmt(step)))
        if meta.get("val_bpb") is not None:
            rows.append(("sft", f"val bpb, {CHAT_DATA}", fmt(meta["val_bpb"])))
    sft_time = parse_float_after(log("chat_sft.log"), "Total training time:")
    if sft_time is not None:
        rows.append(("sft", "training time (excl. first 10 steps)", f"{sft_time:.2f}m"))

    # RL
    rl = latest_checkpoint(os.path.join(base_dir, "chatrl_checkpoints"), model_tag)
    if rl:
        rows.append(("rl", "steps", fmt(rl[1] + 1)))  # RL saves at step index num_steps - 1

    # Chat evaluations
    for source in ("sft", "rl"):
        result = read_chat_eval(base_dir, source, model_tag)
        if not result:
            continue
        for task_name, accuracy in result.get("results", {}).items():
            rows.append((f"chat eval ({source})", f"{task_name} accuracy", fmt(accuracy)))
        if result.get("chatcore") is not None:
            rows.append((f"chat eval ({source})", "ChatCORE", fmt(result["chatcore"])))

    if wall_time_s is not None:
        rows.append(("run", "wall-clock time", f"{wall_time_s / 60:.1f}m"))
    return rows


def render_markdown(rows, base_dir):
    lines = [
        "# nanochat report card",
        "",
        f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')} from `{base_dir}`.",
        "",
    ]
    if not rows:
        lines.append("Nothing to report yet: no tokenizer, checkpoints or eval results found.")
        return "\n".join(lines) + "\n"
    lines += ["| stage | metric | value |", "|---|---|---|"]
    lines += [f"| {stage} | {metric} | {value} |" for stage, metric, value in rows]
    if any(" bpb, " in metric for _, metric, _ in rows):
        lines += ["", BPB_NOTE]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a markdown report card of a run to <base_dir>/report.md")
    parser.add_argument("--base-dir", type=str, default=None, help="run artifacts (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    parser.add_argument("--model-tag", type=str, default=None, help="model tag to report on (default: most recently written)")
    parser.add_argument("--logs-dir", type=str, default=None, help="where the stage logs are (default: <base_dir>/speedrun_logs)")
    parser.add_argument("--wall-time-s", type=float, default=None, help="total wall-clock seconds of the run, if known")
    parser.add_argument("--out", type=str, default=None, help="output path (default: <base_dir>/report.md)")
    args = parser.parse_args(argv)

    base_dir = args.base_dir or get_base_dir()
    if not os.path.isdir(base_dir):
        raise SystemExit(f"error: base dir {base_dir} does not exist; pass --base-dir or set NANOCHAT_BASE_DIR")
    markdown = render_markdown(collect(base_dir, args.model_tag, args.logs_dir, args.wall_time_s), base_dir)
    out_path = args.out or os.path.join(base_dir, "report.md")
    tmp_path = os.path.join(os.path.dirname(os.path.abspath(out_path)), f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(markdown)
        os.replace(tmp_path, out_path)  # a crash never leaves half a report over the last one
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise SystemExit(f"error: cannot write the report to {out_path} ({e.strerror}); pass --out PATH")
    print(markdown, end="")
    print(f"\nReport written to {out_path}")
    return out_path


if __name__ == "__main__":
    main()
