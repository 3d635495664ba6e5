"""
Telemetry: MegaContext's run metrics as JSON lines on disk, and to wandb when asked.

Every record is one JSON object on one line, written with a single write() call and
flushed, so a crash can leave at most a torn *last* line, which read_jsonl() drops.
Files live under $MEGACONTEXT_ARTIFACT_ROOT/run_logs/<run>.jsonl (default root:
$NANOCHAT_BASE_DIR/megacontext). Set MEGACONTEXT_ENABLE_WANDB=1 to mirror every record
to wandb (project "megacontext"); wandb stays untouched otherwise.

This module only records; it never changes what is trained or evaluated.
"""

import os
import json
import time

from nanochat.common import get_base_dir


def artifact_root():
    return os.environ.get("MEGACONTEXT_ARTIFACT_ROOT") or os.path.join(get_base_dir(), "megacontext")


class Telemetry:
    """Append-only JSONL log for one run (rank 0 writes; other ranks get a no-op logger)."""

    def __init__(self, run_name, config=None, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(artifact_root(), "run_logs", f"{run_name}.jsonl")
        self.wandb_run = None
        if not enabled:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if os.environ.get("MEGACONTEXT_ENABLE_WANDB") == "1":
            import wandb
            self.wandb_run = wandb.init(project="megacontext", name=run_name, config=config or {})
        self.log({"event": "start", "config": config or {}})

    def log(self, record, step=None):
        if not self.enabled:
            return
        record = dict(record)
        record.setdefault("time", time.time())
        if step is not None:
            record["step"] = step
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}
            self.wandb_run.log(numbers, step=step)

    def close(self):
        if not self.enabled:
            return
        self.log({"event": "end"})
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.enabled = False


def read_jsonl(path):
    """All whole records of a telemetry file; a torn last line (crash mid-write) is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn tail: the writer died mid-line
            records.append(json.loads(line))
    return records
