"""
What every Task shares: the Task base class (a sliceable view over a dataset of
conversations, plus how to grade an answer), the TaskMixture/TaskSequence
combinators used to build SFT data, the multiple-choice prompt format, and a small
loader for HuggingFace hub datasets that needs no `datasets` package.

Where the rows come from:
- Normally from the hub's automatic parquet export, downloaded once into
  <NANOCHAT_BASE_DIR>/task_data/<owner>--<name>/<subset>/<split>/ and read with pyarrow.
- If NANOCHAT_TASK_FIXTURES=<dir> is set, from local files instead, one per split:
  <dir>/<owner>--<name>/<subset>/<split>.jsonl (one JSON row per line, the same
  columns as the hub dataset). Nothing touches the network then. The repo ships a
  few hand-written rows per task in tasks/fixtures/ for tests and offline runs.
Either way the rows land in the same HubDataset, so everything after loading is
the same code path.
"""

import os
import json
import random
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from nanochat.common import get_base_dir

# the environment variable that redirects every task to local fixture files
TASK_FIXTURES_ENV = "NANOCHAT_TASK_FIXTURES"


class HubDataset:
    """
    The little of a HuggingFace `datasets.Dataset` that the tasks use: len(), row
    access by index (a dict of plain Python values per row) and a seeded shuffle.
    Rows stay in a pyarrow Table and are converted only when asked for.
    """

    def __init__(self, table, permutation=None):
        self.table = table
        self.permutation = permutation # logical -> physical row index, or None for identity

    def __len__(self):
        return self.table.num_rows

    def shuffle(self, seed):
        # datasets.Dataset.shuffle(seed=s) draws np.random.default_rng(s).permutation(n),
        # so doing the same here gives users of either library the identical row order
        order = np.random.default_rng(seed).permutation(len(self))
        return HubDataset(self.table, order)

    def __getitem__(self, index):
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} is out of range for a dataset of {n} rows")
        row_index = index if self.permutation is None else int(self.permutation[index])
        return {name: self.table[name][row_index].as_py() for name in self.table.column_names}


def _dataset_slug(repo_id):
    # "openai/gsm8k" -> "openai--gsm8k": one directory level per dataset
    return repo_id.replace("/", "--")


def _load_fixture_table(fixtures_dir, repo_id, subset, split):
    """Read <fixtures_dir>/<slug>/<subset>/<split>.jsonl into a pyarrow Table."""
    path = os.path.join(fixtures_dir, _dataset_slug(repo_id), subset, f"{split}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{TASK_FIXTURES_ENV}={fixtures_dir} has no rows for {repo_id} "
            f"(subset={subset}, split={split}): expected {path}; "
            f"add that file or unset {TASK_FIXTURES_ENV} to download from the hub")
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({e.msg}); "
                                 f"fixture files hold one JSON object per line") from None
    if not rows:
        raise ValueError(f"{path} holds no rows; add at least one JSON object per line")
    return pa.Table.from_pylist(rows)


def _fetch(url, repo_id, subset, split):
    """GET url and return the body; a network failure becomes one line saying how to fix it."""
    try:
        with urllib.request.urlopen(url) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(
            f"could not download {repo_id} (subset={subset}, split={split}) from the "
            f"HuggingFace hub ({reason}); go online, or set {TASK_FIXTURES_ENV}=<dir> to read "
            f"<dir>/{_dataset_slug(repo_id)}/{subset}/{split}.jsonl instead") from None


def _download_hub_shards(repo_id, subset, split, shards_dir, manifest_path):
    """Fetch the hub's parquet export of one split into shards_dir; the manifest goes last."""
    listing_url = f"https://huggingface.co/api/datasets/{repo_id}/parquet/{subset}/{split}"
    shard_urls = json.loads(_fetch(listing_url, repo_id, subset, split))
    shard_names = []
    for i, shard_url in enumerate(shard_urls):
        shard_name = f"{i:05d}.parquet"
        print(f"Downloading {shard_url} ...")
        payload = _fetch(shard_url, repo_id, subset, split)
        with open(os.path.join(shards_dir, shard_name), "wb") as f:
            f.write(payload)
        shard_names.append(shard_name)
    # written only once every shard is on disk, so its presence means "download complete"
    with open(manifest_path, "w") as f:
        json.dump(shard_names, f)


def load_hub_dataset(repo_id, subset="default", split="train"):
    """
    Load one split of a hub dataset as a HubDataset, much like
    datasets.load_dataset(repo_id, subset, split=split). Reads local fixture files when
    NANOCHAT_TASK_FIXTURES is set; otherwise downloads the hub's parquet export once
    into the base dir (under torchrun one rank downloads while the others wait on a lock).
    """
    fixtures_dir = os.environ.get(TASK_FIXTURES_ENV)
    if fixtures_dir:
        return HubDataset(_load_fixture_table(fixtures_dir, repo_id, subset, split))

    shards_dir = os.path.join(get_base_dir(), "task_data", _dataset_slug(repo_id), subset, split)
    manifest_path = os.path.join(shards_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        os.makedirs(shards_dir, exist_ok=True)
        with FileLock(manifest_path + ".lock"):
            # whoever waited on the lock re-checks: the holder may have finished the job
            if not os.path.exists(manifest_path):
                _download_hub_shards(repo_id, subset, split, shards_dir, manifest_path)
    with open(manifest_path, "r") as f:
        shard_names = json.load(f)
    tables = [pq.read_table(os.path.join(shards_dir, name)) for name in shard_names]
    return HubDataset(pa.concat_tables(tables))

# -----------------------------------------------------------------------------
# Tasks


class Task:
    """
    A dataset of conversations, viewed through an optional start/stop/step slice
    (like range()), so a task can be cut into train/val parts without copying rows.
    Subclasses say how many examples there are, how to build example i, and how to
    grade an answer.
    """

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"Start must be non-negative, got {start}"
        assert stop is None or stop >= start, f"Stop should be greater than or equal to start, got {stop} and {start}"
        assert step >= 1, f"Step must be strictly positive, got {step}"
        self.start = start
        self.stop = stop # None means "until the end of the dataset"
        self.step = step

    @property
    def eval_type(self):
        # 'categorical' (pick among the letters) or 'generative' (sample, then grade)
        raise NotImplementedError

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else self.stop
        count = -(-(stop - self.start) // self.step) # ceil division, as range() counts
        assert count >= 0, f"Negative number of examples???: {count}"
        return count

    def __getitem__(self, index: int):
        assert isinstance(index, int), f"Index must be an integer, got {type(index)}"
        return self.get_example(self.start + index * self.step)

    def evaluate(self, problem, completion):
        raise NotImplementedError


class TaskMixture(Task):
    """
    Several tasks interleaved into one, for SFT. The interleaving is a fixed shuffle
    (seed 42), so every run sees the same order. Listing a task twice oversamples it.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)
        # one (which task, index inside it) entry per conversation, then shuffled;
        # the list is built task by task so that the shuffle's outcome is reproducible
        self.index_map = [(t, i) for t, n in enumerate(self.lengths) for i in range(n)]
        rng = random.Random(42)
        rng.shuffle(self.index_map)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, f"Index {index} out of range for mixture with {self.num_conversations} conversations"
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """Several tasks one after another, in the order given (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.lengths = [len(task) for task in self.tasks]
        self.num_conversations = sum(self.lengths)

    def num_examples(self):
        return self.num_conversations

    def get_example(self, index):
        assert 0 <= index < self.num_conversations, f"Index {index} out of range for sequence with {self.num_conversations} conversations"
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length


def render_mc(question, letters, choices):
    """
    The user prompt for a multiple-choice question. Two details matter for small models:
    - the letter comes *after* its choice ("- Paris=A"), which binds them better;
    - nothing separates "=" from the letter, because the tokenizer gives "A" and " A"
      different ids and the assistant answers with a bare "A": the prompt must show
      the very token the model is expected to produce.
    """
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


if __name__ == "__main__":
    # quick look at slicing: python -m tasks.common (set NANOCHAT_TASK_FIXTURES to stay offline)
    from tasks.mmlu import MMLU

    full = MMLU(subset="all", split="auxiliary_train")
    print(f"MMLU auxiliary_train: {len(full)} examples")
    window = MMLU(subset="all", split="auxiliary_train", start=1, stop=3)
    print(f"slice [1:3]: {len(window)} examples; window[0] == full[1]: {window[0] == full[1]}")
