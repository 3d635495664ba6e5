"""
Specification of tasks/: the Task slicing view, TaskMixture/TaskSequence, the hub
loader (fixture switch, download path, offline error), and every task's
conversations and grading, all read from the hand-written rows in tasks/fixtures/.
No test touches the network: urllib's urlopen is replaced by one that fails.

python -m pytest tests/test_tasks.py -q
"""

import copy
import importlib.util
import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import Task, TaskMixture, TaskSequence, HubDataset, load_hub_dataset, render_mc
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.arc import ARC
from tasks.gsm8k import GSM8K, extract_answer

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_FIXTURES = REPO_ROOT / "tasks" / "fixtures"

# Other engineers' modules that some checks need; a check is skipped only while the file is absent.
HAVE_TOKENIZER = importlib.util.find_spec("nanochat.tokenizer") is not None
HAVE_EXECUTION = importlib.util.find_spec("nanochat.execution") is not None
needs_tokenizer = pytest.mark.skipif(not HAVE_TOKENIZER, reason="nanochat/tokenizer.py is not written yet")
needs_execution = pytest.mark.skipif(not HAVE_EXECUTION, reason="nanochat/execution.py (the HumanEval sandbox) is not written yet")


@pytest.fixture(autouse=True)
def offline_fixtures(monkeypatch):
    """Every test reads tasks/fixtures and any attempt to reach the network fails loudly."""
    def no_network(url, *args, **kwargs):
        raise AssertionError(f"test tried to open {url}")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(TASK_FIXTURES))


def read_rows(slug, subset, split):
    path = TASK_FIXTURES / slug / subset / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_humaneval(**kwargs):
    from tasks.humaneval import HumanEval
    return HumanEval(**kwargs)


# every task constructor and its row count in tasks/fixtures
TASK_BUILDERS = {
    "smoltalk-train": (lambda **kw: SmolTalk(split="train", **kw), 6),
    "smoltalk-test": (lambda **kw: SmolTalk(split="test", **kw), 3),
    "mmlu-aux": (lambda **kw: MMLU(subset="all", split="auxiliary_train", **kw), 5),
    "mmlu-test": (lambda **kw: MMLU(subset="all", split="test", **kw), 4),
    "mmlu-dev": (lambda **kw: MMLU(subset="all", split="dev", **kw), 2),
    "mmlu-validation": (lambda **kw: MMLU(subset="all", split="validation", **kw), 2),
    "gsm8k-main-train": (lambda **kw: GSM8K(subset="main", split="train", **kw), 5),
    "gsm8k-main-test": (lambda **kw: GSM8K(subset="main", split="test", **kw), 3),
    "gsm8k-socratic-train": (lambda **kw: GSM8K(subset="socratic", split="train", **kw), 2),
    "arc-easy-test": (lambda **kw: ARC(subset="ARC-Easy", split="test", **kw), 4),
    "arc-easy-train": (lambda **kw: ARC(subset="ARC-Easy", split="train", **kw), 2),
    "arc-easy-validation": (lambda **kw: ARC(subset="ARC-Easy", split="validation", **kw), 2),
    "arc-challenge-test": (lambda **kw: ARC(subset="ARC-Challenge", split="test", **kw), 3),
    "arc-challenge-train": (lambda **kw: ARC(subset="ARC-Challenge", split="train", **kw), 2),
    "arc-challenge-validation": (lambda **kw: ARC(subset="ARC-Challenge", split="validation", **kw), 2),
    "humaneval": (make_humaneval, 3),
}


def task_params():
    params = []
    for name, (build, count) in TASK_BUILDERS.items():
        marks = [needs_execution] if name == "humaneval" else []
        params.append(pytest.param(build, count, id=name, marks=marks))
    return params


class ToyTask(Task):
    """Example i is just ('tag', i), so slicing arithmetic is easy to read off."""

    def __init__(self, n, tag="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return (self.tag, index)

# -----------------------------------------------------------------------------
# Task slicing


SLICES = [(n, start, stop, step) for n in (0, 1, 7, 10) for start in (0, 1, 3)
          for stop in (None, 3, 7) for step in (1, 2, 3, 5) if start <= (n if stop is None else stop)]


@pytest.mark.parametrize("n, start, stop, step", SLICES)
def test_slice_matches_range(n, start, stop, step):
    task = ToyTask(n, start=start, stop=stop, step=step)
    expected = list(range(start, n if stop is None else stop, step))
    assert len(task) == len(expected)
    assert [task[i][1] for i in range(len(task))] == expected


@pytest.mark.parametrize("kwargs", [dict(start=-1), dict(start=4, stop=2), dict(step=0)])
def test_slice_rejects_bad_bounds(kwargs):
    with pytest.raises(AssertionError):
        ToyTask(10, **kwargs)


def test_start_past_the_end_is_caught_at_len():
    with pytest.raises(AssertionError, match="Negative number of examples"):
        len(ToyTask(2, start=5))


def test_index_must_be_int():
    with pytest.raises(AssertionError, match="Index must be an integer"):
        ToyTask(5)[np.int64(1)]


def test_slicing_a_real_task_views_the_same_rows():
    full = GSM8K(subset="main", split="train")
    view = GSM8K(subset="main", split="train", start=1, stop=5, step=2)
    assert len(view) == 2
    assert view[0] == full[1] and view[1] == full[3]

# -----------------------------------------------------------------------------
# TaskMixture and TaskSequence


def test_mixture_order_is_the_seed_42_shuffle():
    # chat_sft's data order depends on this exact shuffle: pairs listed task by task,
    # then random.Random(42).shuffle
    tasks = [ToyTask(3, "a"), ToyTask(5, "b"), ToyTask(2, "c")]
    mixture = TaskMixture(tasks)
    pairs = [(t, i) for t, n in enumerate([3, 5, 2]) for i in range(n)]
    random.Random(42).shuffle(pairs)
    tags = "abc"
    assert len(mixture) == 10
    assert [mixture[k] for k in range(10)] == [(tags[t], i) for t, i in pairs]
    # every example exactly once, and truly interleaved
    assert sorted(mixture[k] for k in range(10)) == sorted(tasks[t][i] for t in range(3) for i in range(len(tasks[t])))
    assert [mixture[k][0] for k in range(10)] != list("aaabbbbbcc")


def test_mixture_is_deterministic_and_oversamples():
    first = TaskMixture([ToyTask(4, "a"), ToyTask(4, "a")])
    second = TaskMixture([ToyTask(4, "a"), ToyTask(4, "a")])
    assert len(first) == 8
    assert [first[k] for k in range(8)] == [second[k] for k in range(8)]
    # a task listed twice contributes each of its examples twice
    assert sorted(first[k] for k in range(8)) == sorted([("a", i) for i in range(4)] * 2)


def test_mixture_respects_slices_of_its_parts_and_its_own():
    mixture = TaskMixture([ToyTask(10, "a", start=2, stop=8, step=3), ToyTask(3, "b")])
    assert mixture.lengths == [2, 3]
    assert sorted(mixture[k] for k in range(5)) == [("a", 2), ("a", 5), ("b", 0), ("b", 1), ("b", 2)]
    head = TaskMixture([ToyTask(10, "a", start=2, stop=8, step=3), ToyTask(3, "b")], stop=2)
    assert len(head) == 2 and [head[0], head[1]] == [mixture[0], mixture[1]]
    with pytest.raises(AssertionError, match="out of range"):
        mixture.get_example(5)


def test_sft_style_mixture_of_real_tasks():
    train = TaskMixture([
        SmolTalk(split="train"),
        MMLU(subset="all", split="auxiliary_train"),
        GSM8K(subset="main", split="train"),
        GSM8K(subset="main", split="train"),
    ])
    assert len(train) == 6 + 5 + 5 + 5
    conversations = [train[k] for k in range(len(train))]
    # GSM8K is in there twice, so each of its conversations shows up exactly twice
    gsm = GSM8K(subset="main", split="train")
    for i in range(len(gsm)):
        assert sum(c == gsm[i] for c in conversations) == 2


def test_sequence_concatenates_in_order():
    sequence = TaskSequence([ToyTask(2, "a"), ToyTask(0, "z"), ToyTask(3, "b")])
    assert len(sequence) == 5
    assert [sequence[k] for k in range(5)] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    tail = TaskSequence([ToyTask(2, "a"), ToyTask(3, "b")], start=1, step=2)
    assert [tail[k] for k in range(len(tail))] == [("a", 1), ("b", 1)]
    with pytest.raises(AssertionError, match="out of range"):
        sequence.get_example(5)


def test_render_mc_format():
    text = render_mc("2+2?", ("A", "B"), ("4", "5"))
    assert text == "Multiple Choice question: 2+2?\n- 4=A\n- 5=B\n\nRespond only with the letter of the correct answer."

# -----------------------------------------------------------------------------
# HubDataset and the loader


def test_hub_dataset_shuffle_is_the_datasets_permutation():
    table = pa.table({"x": list(range(50)), "s": [f"r{i}" for i in range(50)]})
    shuffled = HubDataset(table).shuffle(seed=42)
    order = np.random.default_rng(42).permutation(50)
    assert [shuffled[i]["x"] for i in range(50)] == order.tolist()
    assert shuffled[3] == {"x": int(order[3]), "s": f"r{order[3]}"}
    assert HubDataset(table)[3] == {"x": 3, "s": "r3"} # the shuffle is a new view
    assert shuffled[-1]["x"] == int(order[-1])
    with pytest.raises(IndexError, match="out of range for a dataset of 50 rows"):
        shuffled[50]


def test_tasks_apply_the_seed_42_shuffle_to_fixture_rows():
    rows = read_rows("openai--gsm8k", "main", "train")
    order = np.random.default_rng(42).permutation(len(rows))
    task = GSM8K(subset="main", split="train")
    assert [task[i]["messages"][0]["content"] for i in range(len(task))] == [rows[j]["question"] for j in order]


def test_fixture_rows_keep_the_hub_schema():
    arc = load_hub_dataset("allenai/ai2_arc", "ARC-Easy", split="test")
    assert set(arc.table.column_names) == {"id", "question", "choices", "answerKey"}
    assert set(arc[0]["choices"]) == {"text", "label"}
    mmlu = load_hub_dataset("cais/mmlu", "all", split="test")
    assert isinstance(mmlu[0]["answer"], int) and len(mmlu[0]["choices"]) == 4


def test_missing_fixture_file_names_the_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        GSM8K(subset="main", split="test")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "openai--gsm8k" / "main" / "test.jsonl") in message
    assert "unset NANOCHAT_TASK_FIXTURES" in message


def test_broken_fixture_line_is_reported_with_its_line_number(tmp_path, monkeypatch):
    split_dir = tmp_path / "openai--gsm8k" / "main"
    split_dir.mkdir(parents=True)
    (split_dir / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(tmp_path))
    with pytest.raises(ValueError, match=r"test\.jsonl:2 is not valid JSON"):
        GSM8K(subset="main", split="test")


def test_offline_hub_download_fails_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_FIXTURES")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(RuntimeError) as info:
        MMLU(subset="all", split="test")
    message = str(info.value)
    assert "\n" not in message
    assert "cais/mmlu" in message and "split=test" in message
    assert "go online" in message and "NANOCHAT_TASK_FIXTURES" in message
    assert "name resolution" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__ # no chained hub traceback
    # nothing half-done was recorded as complete, so going online later just works
    assert not (tmp_path / "task_data" / "cais--mmlu" / "all" / "test" / "manifest.json").exists()


class FakeResponse:
    def __init__(self, payload):
        self.payload = payload

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.payload


def test_hub_download_caches_shards_then_reads_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_TASK_FIXTURES")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    # the hub would serve two parquet shards for this split; build them from fixture rows
    rows = read_rows("openai--gsm8k", "main", "test")
    shard_bytes = []
    for part in (rows[:2], rows[2:]):
        path = tmp_path / f"shard{len(shard_bytes)}.parquet"
        pq.write_table(pa.Table.from_pylist(part), path)
        shard_bytes.append(path.read_bytes())
    listing = "https://huggingface.co/api/datasets/openai/gsm8k/parquet/main/test"
    served = {listing: json.dumps(["https://hub/s0", "https://hub/s1"]).encode(),
              "https://hub/s0": shard_bytes[0], "https://hub/s1": shard_bytes[1]}
    requested = []
    def fake_urlopen(url, *args, **kwargs):
        requested.append(url)
        return FakeResponse(served[url])
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    online = GSM8K(subset="main", split="test")
    assert requested == [listing, "https://hub/s0", "https://hub/s1"]
    shards_dir = tmp_path / "base" / "task_data" / "openai--gsm8k" / "main" / "test"
    assert json.loads((shards_dir / "manifest.json").read_text()) == ["00000.parquet", "00001.parquet"]
    # second load: served from the cache, the network is never asked
    requested.clear()
    cached = GSM8K(subset="main", split="test")
    assert requested == []
    assert [cached[i] for i in range(3)] == [online[i] for i in range(3)]
    # and it is the same data, in the same order, as the fixture path gives
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(TASK_FIXTURES))
    from_fixtures = GSM8K(subset="main", split="test")
    assert [from_fixtures[i] for i in range(3)] == [online[i] for i in range(3)]

# -----------------------------------------------------------------------------
# Every task: counts and conversation structure


def assert_well_formed(conversation):
    messages = conversation["messages"]
    dialogue = messages[1:] if messages[0]["role"] == "system" else messages
    assert len(dialogue) >= 2 and len(dialogue) % 2 == 0
    for i, message in enumerate(dialogue):
        assert message["role"] == ("user" if i % 2 == 0 else "assistant")
        content = message["content"]
        if message["role"] == "user":
            assert isinstance(content, str) and content
        elif isinstance(content, list):
            assert content and all(set(part) == {"type", "text"} for part in content)
            assert all(part["type"] in ("text", "python", "python_output") for part in content)
            assert all(isinstance(part["text"], str) for part in content)
        else:
            assert isinstance(content, str) and content


@pytest.mark.parametrize("build, count", task_params())
def test_every_task_loads_its_fixture_rows(build, count):
    task = build()
    assert task.num_examples() == count
    assert len(task) == count
    for i in range(count):
        assert_well_formed(task[i])
    # a sliced view counts and indexes consistently with the full task
    view = build(start=1, step=2)
    assert len(view) == count // 2
    assert [view[i] for i in range(len(view))] == [task[i] for i in range(1, count, 2)]


def test_smoltalk_keeps_the_system_message():
    task = SmolTalk(split="train")
    with pytest.raises(NotImplementedError): # a training-only task: no eval_type
        task.eval_type
    conversations = [task[i] for i in range(len(task))]
    with_system = [c for c in conversations if c["messages"][0]["role"] == "system"]
    assert len(with_system) == 1
    assert with_system[0]["messages"][0]["content"] == "You are a concise assistant. Answer in one sentence."
    assert set(conversations[0]) == {"messages"}


def test_smoltalk_rejects_a_row_whose_roles_do_not_alternate(tmp_path, monkeypatch):
    split_dir = tmp_path / "HuggingFaceTB--smol-smoltalk" / "default"
    split_dir.mkdir(parents=True)
    bad = {"messages": [{"content": "hi", "role": "user"}, {"content": "again", "role": "user"}], "source": "x"}
    (split_dir / "test.jsonl").write_text(json.dumps(bad) + "\n")
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(tmp_path))
    task = SmolTalk(split="test")
    with pytest.raises(AssertionError, match="should be assistant"):
        task[0]

# -----------------------------------------------------------------------------
# Multiple choice: MMLU and ARC


def test_mmlu_conversation_and_grading():
    rows = read_rows("cais--mmlu", "all", "test")
    task = MMLU(subset="all", split="test")
    assert task.eval_type == "categorical"
    for i in range(len(task)):
        conversation = task[i]
        row = next(r for r in rows if render_mc(r["question"], MMLU.letters, r["choices"]) == conversation["messages"][0]["content"])
        right = "ABCD"[row["answer"]]
        assert conversation["messages"][1]["content"] == right
        assert conversation["subject"] == row["subject"]
        assert conversation["letters"] == ("A", "B", "C", "D")
        assert task.evaluate(conversation, right) is True
        assert all(task.evaluate(conversation, wrong) is False for wrong in "ABCD" if wrong != right)
    with pytest.raises(AssertionError, match="expected to be one of"):
        task.evaluate(task[0], "E")
    with pytest.raises(AssertionError, match="must be all"):
        MMLU(subset="anatomy", split="test")


def test_arc_uses_the_rows_own_labels():
    rows = {r["question"]: r for r in read_rows("allenai--ai2_arc", "ARC-Easy", "test")}
    task = ARC(subset="ARC-Easy", split="test")
    assert task.eval_type == "categorical"
    seen_label_sets = set()
    for i in range(len(task)):
        conversation = task[i]
        prompt = conversation["messages"][0]["content"]
        row = next(r for q, r in rows.items() if f"question: {q}\n" in prompt)
        assert prompt == render_mc(row["question"], row["choices"]["label"], row["choices"]["text"])
        assert conversation["letters"] == row["choices"]["label"]
        seen_label_sets.add(tuple(conversation["letters"]))
        assert task.evaluate(conversation, row["answerKey"]) is True
        wrong = next(label for label in conversation["letters"] if label != row["answerKey"])
        assert task.evaluate(conversation, wrong) is False
    # the fixtures cover A-D, A-E and 1-4 labelled questions, as the real data has
    assert {("A", "B", "C", "D"), ("A", "B", "C", "D", "E"), ("1", "2", "3", "4")} <= seen_label_sets
    with pytest.raises(AssertionError):
        ARC(subset="ARC-Medium", split="test")

# -----------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize("text, expected", [
    ("so the total is 29.\n#### 29", "29"),
    ("#### 1,500", "1500"),
    ("they owe #### -7 dollars", "-7"),
    ("#### 2.5", "2.5"),
    ("first #### 3 then #### 4", "3"),
    ("the answer is 29", None),
    ("####29", None), # the marker needs its space
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_turns_calculator_calls_into_tool_parts():
    task = GSM8K(subset="main", split="train")
    conversations = [task[i] for i in range(len(task))]
    pencils = next(c for c in conversations if c["messages"][0]["content"].startswith("Maya buys"))
    assert pencils["messages"][1]["content"] == [
        {"type": "text", "text": "Maya buys 3*12 = "},
        {"type": "python", "text": "3*12"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": "36 pencils.\nAfter giving some away she has 36-7 = "},
        {"type": "python", "text": "36-7"},
        {"type": "python_output", "text": "29"},
        {"type": "text", "text": "29 pencils.\n#### 29"},
    ]
    # for every row, gluing the parts back together reproduces the original solution
    rows = {r["question"]: r["answer"] for r in read_rows("openai--gsm8k", "main", "train")}
    for conversation in conversations:
        glued = ""
        for part in conversation["messages"][1]["content"]:
            if part["type"] == "text":
                glued += part["text"]
            elif part["type"] == "python":
                glued += "<<" + part["text"]
            else:
                glued += "=" + part["text"] + ">>"
        assert glued == rows[conversation["messages"][0]["content"]]


def test_gsm8k_tool_call_without_equals_and_back_to_back_calls(tmp_path, monkeypatch):
    split_dir = tmp_path / "openai--gsm8k" / "main"
    split_dir.mkdir(parents=True)
    row = {"question": "q", "answer": "<<2+3>><<5*2=10>>so 10, and <<x=10-4=6>>6\n#### 6"}
    (split_dir / "test.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(tmp_path))
    parts = GSM8K(subset="main", split="test")[0]["messages"][1]["content"]
    assert parts == [
        {"type": "text", "text": ""},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": ""},
        {"type": "text", "text": ""},
        {"type": "python", "text": "5*2"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "so 10, and "},
        {"type": "python", "text": "x=10-4"}, # only the last '=' separates the result
        {"type": "python_output", "text": "6"},
        {"type": "text", "text": "6\n#### 6"},
    ]


def test_gsm8k_grading():
    task = GSM8K(subset="main", split="train")
    assert task.eval_type == "generative"
    conversations = [task[i] for i in range(len(task))]
    bakery = next(c for c in conversations if "bakery" in c["messages"][0]["content"]) # reference: '#### 1,500'
    assert task.evaluate(bakery, "125*4 = 500 a day, times 3.\n#### 1500") == 1
    assert task.evaluate(bakery, "#### 1,500") == 1
    assert task.evaluate(bakery, "#### 1,600") == 0
    assert task.evaluate(bakery, "The answer is 1500") == 0 # no marker, no credit
    assert task.reward(bakery, "#### 1500") == 1.0 and isinstance(task.reward(bakery, "#### 1500"), float)
    assert task.reward(bakery, "#### 15") == 0.0
    cold = next(c for c in conversations if "temperature" in c["messages"][0]["content"])
    assert task.evaluate(cold, "#### -7") == 1 and task.evaluate(cold, "#### 7") == 0
    with pytest.raises(AssertionError, match="simple string"):
        task.evaluate(bakery, [{"type": "text", "text": "#### 1500"}])

# -----------------------------------------------------------------------------
# HumanEval


@needs_execution
def test_humaneval_conversation_and_helpers():
    from tasks.humaneval import extract_imports, extract_program
    rows = {r["entry_point"]: r for r in read_rows("openai--openai_humaneval", "openai_humaneval", "test")}
    task = make_humaneval()
    assert task.eval_type == "generative"
    for i in range(len(task)):
        conversation = task[i]
        row = rows[conversation["entry_point"]]
        assert conversation["messages"][0]["content"] == row["prompt"]
        assert conversation["messages"][1]["content"] == row["prompt"] + "\n" + row["canonical_solution"]
        assert conversation["test"] == row["test"]
    assert extract_imports("# header\nimport math\n\nfrom typing import List\ndef f():\n    import os\n") == "import math\nfrom typing import List"
    assert extract_program("Sure:\n```python\ndef f():\n    return 1\n```\nand\n```\nx = 2\n```") == "def f():\n    return 1"
    assert extract_program("  def f():\n    return 1\n") == "def f():\n    return 1"


@needs_execution
def test_humaneval_grades_by_running_the_tests():
    task = make_humaneval()
    by_name = {task[i]["entry_point"]: task[i] for i in range(len(task))}
    for conversation in by_name.values():
        # the reference answer itself passes
        assert task.evaluate(conversation, conversation["messages"][1]["content"]) is True
    vowels = by_name["count_vowels"]
    wrong = "def count_vowels(text):\n    return sum(1 for ch in text if ch in 'aeiou')\n" # misses capitals
    assert task.evaluate(vowels, wrong) is False
    assert task.evaluate(vowels, "def count_vowels(text):\n    return (\n") is False # does not even parse
    # a chatty answer without the prompt's import still passes: the import is put back
    hyp = by_name["hypotenuse"]
    chatty = "Here you go:\n```python\ndef hypotenuse(a, b):\n    return math.sqrt(a * a + b * b)\n```\nDone."
    assert task.evaluate(hyp, chatty) is True

# -----------------------------------------------------------------------------
# Rendering with the real tokenizer


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


def specials(tokenizer):
    names = ["bos", "user_start", "user_end", "assistant_start", "assistant_end",
             "python_start", "python_end", "output_start", "output_end"]
    return {name: tokenizer.encode_special(f"<|{name}|>") for name in names}


@needs_tokenizer
@pytest.mark.parametrize("build, count", task_params())
def test_every_example_renders(tokenizer, build, count):
    ids_of = specials(tokenizer)
    task = build()
    for i in range(len(task)):
        conversation = task[i]
        ids, mask = tokenizer.render_conversation(conversation)
        assert len(ids) == len(mask) and ids[0] == ids_of["bos"]
        messages = [m for m in conversation["messages"] if m["role"] != "system"]
        assistants = [m for m in messages if m["role"] == "assistant"]
        assert ids.count(ids_of["user_start"]) == len(messages) - len(assistants)
        assert ids.count(ids_of["assistant_start"]) == len(assistants)
        assert ids.count(ids_of["assistant_end"]) == len(assistants)
        tool_calls = sum(1 for m in assistants if isinstance(m["content"], list)
                         for p in m["content"] if p["type"] == "python")
        assert ids.count(ids_of["python_start"]) == tool_calls == ids.count(ids_of["output_start"])
        # the model is trained on its own words and tool calls, never on tool outputs or prompts
        supervised = tokenizer.decode([t for t, m in zip(ids, mask) if m == 1])
        last = assistants[-1]["content"]
        final_text = last if isinstance(last, str) else last[-1]["text"]
        assert final_text in supervised
        for t, m in zip(ids, mask):
            if t in (ids_of["output_start"], ids_of["output_end"], ids_of["user_start"], ids_of["bos"]):
                assert m == 0
        # the completion prompt is the conversation minus the last answer, plus assistant_start
        prompt = tokenizer.render_for_completion(conversation)
        assert prompt[-1] == ids_of["assistant_start"]
        assert ids[:len(prompt)] == prompt


@needs_tokenizer
def test_special_token_text_in_a_user_message_stays_plain_text(tokenizer):
    ids_of = specials(tokenizer)
    # a fixture SmolTalk row asks about the literal "<|assistant_start|>"
    task = SmolTalk(split="train")
    conversation = next(task[i] for i in range(len(task)) if "<|assistant_start|>" in task[i]["messages"][0]["content"])
    ids, mask = tokenizer.render_conversation(conversation)
    assert ids.count(ids_of["assistant_start"]) == 1 # only the real turn boundary
    user_ids = ids[ids.index(ids_of["user_start"]) + 1: ids.index(ids_of["user_end"])]
    assert tokenizer.decode(user_ids) == conversation["messages"][0]["content"]
    # the same holds for every special token, typed into a prompt
    literal = "".join(f"<|{name}|>" for name in ids_of)
    crafted = {"messages": [{"role": "user", "content": literal}, {"role": "assistant", "content": "ok"}]}
    ids, _ = tokenizer.render_conversation(copy.deepcopy(crafted))
    assert [t for t in ids if t in ids_of.values()] == [ids_of[n] for n in ("bos", "user_start", "user_end", "assistant_start", "assistant_end")]
    assert literal in tokenizer.decode(ids)
