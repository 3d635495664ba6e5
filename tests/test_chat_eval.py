"""
scripts/chat_eval.py: categorical tasks are graded at the assistant's first position over
the allowed letters only; generative tasks pass if any sample is right; the CLI evaluates
all five tasks offline into accuracies and a ChatCORE number; bad input is one line.
"""
import json
from pathlib import Path

import pytest
import torch

from nanochat.tokenizer import RustBPETokenizer
from scripts import chat_eval
from scripts.chat_eval import ALL_TASKS, BASELINE_ACCURACIES, run_categorical_eval, run_generative_eval, run_chat_eval
from tasks.gsm8k import GSM8K, extract_answer
from tasks.mmlu import MMLU

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline(monkeypatch):
    """Tasks read tasks/fixtures; no torch.compile."""
    monkeypatch.setenv("NANOCHAT_TASK_FIXTURES", str(REPO / "tasks" / "fixtures"))
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    monkeypatch.delenv("NANOCHAT_DEBUG", raising=False)


@pytest.fixture
def tokenizer(upstream_fixtures):
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


class MarkerModel(torch.nn.Module):
    """Fake model: favours letter `at_marker` where the input token is `marker`, and
    letter `elsewhere` at every other position (including the BOS padding)."""

    def __init__(self, vocab_size, marker, at_marker, elsewhere):
        super().__init__()
        self.vocab_size, self.marker, self.at_marker, self.elsewhere = vocab_size, marker, at_marker, elsewhere

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.elsewhere] = 5.0
        at_marker = ids == self.marker
        row = torch.zeros(self.vocab_size)
        row[self.at_marker] = 5.0
        logits[at_marker] = row
        return logits


def test_categorical_eval_reads_the_assistant_start_logits(offline, tokenizer):
    task = MMLU(subset="all", split="test")
    answers = [task[i]["messages"][-1]["content"] for i in range(len(task))]
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    letters = "ABCD"
    accuracies = {}
    for k, letter in enumerate(letters):
        decoy = letters[(k + 1) % 4]  # what a read at any other position would pick
        model = MarkerModel(tokenizer.get_vocab_size(), assistant_start, tokenizer.encode(letter)[0], tokenizer.encode(decoy)[0])
        # batch_size 3 over 4 problems: one padded batch and one batch of one
        accuracies[letter] = run_categorical_eval(task, tokenizer, model, batch_size=3)
        assert accuracies[letter] == pytest.approx(answers.count(letter) / len(answers))
    assert sum(accuracies.values()) == pytest.approx(1.0)  # every problem has exactly one right letter


def test_categorical_eval_restricts_the_choice_to_the_problem_letters(offline, tokenizer):
    task = MMLU(subset="all", split="test")
    # the model's favourite token everywhere is 'Z', which is not a choice: the argmax over
    # A-D must then fall back to the runner-up, which we make 'D'
    vocab = tokenizer.get_vocab_size()
    z, d = tokenizer.encode("Z")[0], tokenizer.encode("D")[0]

    class FavoursZThenD(torch.nn.Module):
        def get_device(self):
            return torch.device("cpu")

        def forward(self, ids):
            logits = torch.zeros(*ids.shape, vocab)
            logits[..., z] = 9.0
            logits[..., d] = 1.0
            return logits

    model = FavoursZThenD()
    answers = [task[i]["messages"][-1]["content"] for i in range(len(task))]
    assert run_categorical_eval(task, tokenizer, model, batch_size=8) == pytest.approx(answers.count("D") / len(answers))
    assert run_categorical_eval(task, tokenizer, model, batch_size=8, max_problems=1) == float(answers[0] == "D")


class ScriptedEngine:
    """Fake Engine: answers every prompt with fixed completion texts, one per sample."""

    def __init__(self, tokenizer, completions_for):
        self.tokenizer, self.completions_for, self.calls = tokenizer, completions_for, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append(dict(kwargs, num_samples=num_samples))
        texts = self.completions_for(tokens)[:num_samples]
        return [tokens + self.tokenizer.encode(t) for t in texts], [[0] * len(tokens) for _ in texts]


class CPUOnly:
    def get_device(self):
        return torch.device("cpu")


def test_generative_eval_is_pass_at_k_over_the_samples(offline, tokenizer):
    task = GSM8K(subset="main", split="test")
    right = {}
    for i in range(len(task)):
        conversation = task[i]
        right[tuple(tokenizer.render_for_completion(conversation))] = extract_answer(conversation["messages"][-1]["content"][-1]["text"])

    def wrong_then_right(tokens):
        return ["The answer is\n#### 123456789", f"So we get\n#### {right[tuple(tokens)]}"]

    engine = ScriptedEngine(tokenizer, wrong_then_right)
    assert run_generative_eval(task, tokenizer, CPUOnly(), engine, 2, 7, 0.5, 3) == 1.0
    assert engine.calls[0] == dict(num_samples=2, max_tokens=7, temperature=0.5, top_k=3)
    assert len(engine.calls) == len(task)
    # only the first (wrong) sample: nothing passes; max_problems bounds the work
    engine = ScriptedEngine(tokenizer, wrong_then_right)
    assert run_generative_eval(task, tokenizer, CPUOnly(), engine, 1, 7, 0.0, 3, max_problems=2) == 0.0
    assert len(engine.calls) == 2


def test_run_chat_eval_rejects_an_unknown_task():
    with pytest.raises(ValueError, match=r"unknown task name\(s\) 'gsm8k'; choose from ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval"):
        run_chat_eval("gsm8k", None, None, None)


def test_cli_evaluates_all_tasks_offline(fixture_base_dir, offline, capsys):
    out = chat_eval.main(["-i", "base", "-x", "2", "-m", "6", "-b", "2", "--device-type", "cpu"])
    results = out["results"]
    assert list(results) == ALL_TASKS
    assert all(0.0 <= acc <= 1.0 for acc in results.values())
    # tasks with 2 problems can only score 0, 1/2 or 1
    assert all(acc in (0.0, 0.5, 1.0) for acc in results.values())
    expected = sum((results[t] - BASELINE_ACCURACIES[t]) / (1 - BASELINE_ACCURACIES[t]) for t in ALL_TASKS) / 5
    assert out["chatcore"] == pytest.approx(expected)
    assert f"ChatCORE metric: {expected:.4f}" in capsys.readouterr().out
    record = json.loads((fixture_base_dir / "chat_eval" / "base_d2_000040.json").read_text())
    assert record["results"] == results and record["chatcore"] == out["chatcore"]
    assert record["model_tag"] == "d2" and record["step"] == 40


def test_cli_subset_of_tasks_has_no_chatcore(fixture_base_dir, offline):
    out = chat_eval.main(["-i", "base", "-a", "MMLU|ARC-Easy", "-x", "3", "--device-type", "cpu"])
    assert list(out["results"]) == ["MMLU", "ARC-Easy"]
    assert out["chatcore"] is None


@pytest.mark.parametrize("argv, message", [
    (["-i", "sft", "-a", "ARC-Easy|Nope"], "unknown task name(s) 'Nope'; choose from ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval"),
    (["-i", "sft"], "chatsft_checkpoints"),
    (["-i", "base", "-s", "7"], "no checkpoint for step 7"),
    (["-i", "what"], "unknown model source 'what'"),
])
def test_cli_bad_input_is_one_line(fixture_base_dir, offline, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        chat_eval.main(argv + ["--device-type", "cpu"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert message in err
