"""
Specification of nanochat/core_eval.py (with the CORE driver moved there from scripts/base_eval.py) and of scripts/base_eval.py.

Prompt rendering is pinned with hand-written expected strings for each task type; the
token bookkeeping (which positions are scored) is checked with an "oracle" model that
knows the gold prompt and nothing else; evaluate_core runs end to end on the tiny local
eval bundle in tests/fixtures/eval_bundle with the upstream fixture checkpoint, offline.
"""
import json
import math
import random
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # scripts/ is imported as a top-level package, as upstream does

import nanochat.core_eval as core_eval
from nanochat.core_eval import (batch_sequences_lm, batch_sequences_mc, batch_sequences_schema, evaluate_example,
                                evaluate_task, find_common_length, forward_model, render_prompts_lm,
                                render_prompts_mc, render_prompts_schema, stack_sequences)

BUNDLE = REPO_ROOT / "tests" / "fixtures" / "eval_bundle"
LABELS = ["tiny_capitals", "tiny_pronouns", "tiny_endings"]

# -----------------------------------------------------------------------------
# Rendering


def test_render_mc():
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shot = {"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}
    assert render_prompts_mc(item, " A: ") == ["Q: 2+2? A: 3", "Q: 2+2? A: 4"]
    assert render_prompts_mc(item, " A: ", []) == ["Q: 2+2? A: 3", "Q: 2+2? A: 4"]
    assert render_prompts_mc(item, " A: ", [shot, shot]) == [
        "Q: 1+1? A: 2\n\nQ: 1+1? A: 2\n\nQ: 2+2? A: 3",
        "Q: 1+1? A: 2\n\nQ: 1+1? A: 2\n\nQ: 2+2? A: 4",
    ]


def test_render_schema():
    item = {"context_options": ["Ann fed the dog because Ann", "Ann fed the dog because the dog"],
            "continuation": "was hungry.", "gold": 1}
    shot = {"context_options": ["wrong ctx", "right ctx"], "continuation": "cont", "gold": 1}
    assert render_prompts_schema(item, " ") == [
        "Ann fed the dog because Ann was hungry.", "Ann fed the dog because the dog was hungry."]
    assert render_prompts_schema(item, " ", [shot]) == [
        "right ctx cont\n\nAnn fed the dog because Ann was hungry.",
        "right ctx cont\n\nAnn fed the dog because the dog was hungry.",
    ]


def test_render_lm_trims_contexts_and_the_short_prompt():
    item = {"context": "  The sky is ", "continuation": "blue"}
    shot = {"context": "Grass is\t", "continuation": "green"}
    assert render_prompts_lm(item, " ") == ["The sky is", "The sky is blue"]
    assert render_prompts_lm(item, " ", [shot]) == ["Grass is green\n\nThe sky is", "Grass is green\n\nThe sky is blue"]
    # a delimiter that is pure whitespace disappears from the short prompt only
    assert render_prompts_lm({"context": "Hi ", "continuation": "there"}, "\n") == ["Hi", "Hi\nthere"]


def test_inputs_are_not_mutated():
    item = {"query": "q", "choices": ["a", "b"], "gold": 0}
    shots = [{"query": "s", "choices": ["x"], "gold": 0}]
    snapshot = json.dumps([item, shots])
    render_prompts_mc(item, " ", shots)
    assert json.dumps([item, shots]) == snapshot

# -----------------------------------------------------------------------------
# Token bookkeeping


def test_find_common_length():
    assert find_common_length([[1, 2, 3], [1, 2, 4], [1, 2]], 'left') == 2
    assert find_common_length([[9, 2, 3], [1, 2, 3]], 'right') == 2
    assert find_common_length([[1, 2, 3], [5, 2, 3], [3]], 'right') == 1
    assert find_common_length([[1, 2], [1, 2]], 'left') == 2  # identical: the whole (shortest) length
    assert find_common_length([[1, 2], [3, 4]], 'left') == 0
    assert find_common_length([[1, 2], [3, 4]], 'right') == 0
    with pytest.raises(ValueError, match="direction"):
        find_common_length([[1]], 'up')


def test_stack_sequences_pads_on_the_right():
    ids = stack_sequences([[5, 6, 7], [8], []], pad_token_id=0)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]


@pytest.fixture
def tokenizer(fixture_base_dir):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


def test_batch_sequences_mc(tokenizer):
    prompts = render_prompts_mc({"query": "What is a list?", "choices": [" a sequence", " a mapping type"], "gold": 0}, " ->")
    tokens, starts, ends = batch_sequences_mc(tokenizer, prompts)
    bos = tokenizer.get_bos_token_id()
    for seq, prompt in zip(tokens, prompts):
        assert seq[0] == bos and tokenizer.decode(seq[1:]) == prompt
    s = starts[0]
    assert starts == [s, s] and ends == [len(t) for t in tokens]
    assert tokens[0][:s] == tokens[1][:s] and tokens[0][s] != tokens[1][s]


def test_batch_sequences_schema(tokenizer):
    prompts = render_prompts_schema({"context_options": ["The dog barked because it", "The function failed because it"],
                                     "continuation": "was called with no arguments.", "gold": 0}, " ")
    tokens, starts, ends = batch_sequences_schema(tokenizer, prompts)
    assert ends == [len(t) for t in tokens]
    suffix = [t[s:e] for t, s, e in zip(tokens, starts, ends)]
    assert suffix[0] == suffix[1] and len(suffix[0]) > 0
    assert tokens[0][starts[0] - 1] != tokens[1][starts[1] - 1]  # the suffix is maximal


def test_batch_sequences_lm(tokenizer):
    prompts = render_prompts_lm({"context": "The import statement loads a", "continuation": "module"}, " ")
    tokens, starts, ends = batch_sequences_lm(tokenizer, prompts)
    assert len(tokens) == 1
    without = tokenizer(prompts[0], prepend=tokenizer.get_bos_token_id())
    assert starts == [len(without)] and ends == [len(tokens[0])]
    assert tokens[0][:starts[0]] == without
    assert tokenizer.decode(tokens[0][starts[0]:]).strip() == "module"
    with pytest.raises(AssertionError, match="prefix"):
        batch_sequences_lm(tokenizer, ["abc def", "abd"])

# -----------------------------------------------------------------------------
# Scoring, with stand-in models


class OracleModel(torch.nn.Module):
    """Knows one token sequence: wherever the input so far equals its prefix, it predicts
    the next token of it with high confidence; everywhere else all logits are equal."""

    def __init__(self, known, vocab_size, max_seq_len=None):
        super().__init__()
        self.known = list(known)
        self.vocab_size = vocab_size
        self.seen = []
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len

    def forward(self, input_ids):
        self.seen.append(input_ids.clone())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(T):
                if t + 1 < len(self.known) and row[:t + 1] == self.known[:t + 1]:
                    logits[b, t, self.known[t + 1]] = 12.0
        return logits


def test_forward_model_losses_and_predictions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    model = lambda ids: logits  # noqa: E731
    ids = torch.randint(0, 11, (2, 5), generator=g)
    losses, preds = forward_model(model, ids)
    assert torch.isnan(losses[:, -1]).all()
    for b in range(2):
        for t in range(4):
            expected = -torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
            assert losses[b, t].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(preds, logits.argmax(-1))


def fewshot_for(data, idx, k):
    """The documented few-shot rule: random.Random(1234 + idx) samples k of the other items."""
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(1234 + idx).sample(others, k)] if k else []


MC_DATA = [
    {"query": "Q: colour of the sky?", "choices": [" green", " blue", " red"], "gold": 1},
    {"query": "Q: opposite of hot?", "choices": [" cold", " warm"], "gold": 0},
    {"query": "Q: two plus two?", "choices": [" five", " three", " four"], "gold": 2},
    {"query": "Q: a keyword for loops?", "choices": [" while", " class"], "gold": 0},
]
SCHEMA_DATA = [
    {"context_options": ["The cup fell off the table so the cup", "The cup fell off the table so the table"],
     "continuation": "broke.", "gold": 0},
    {"context_options": ["Sam called Max because Sam", "Sam called Max because Max"],
     "continuation": "wanted to talk.", "gold": 0},
    {"context_options": ["The file was empty so the parser", "The file was empty so the file"],
     "continuation": "returned nothing.", "gold": 0},
]
LM_DATA = [
    {"context": "A for loop repeats a block of code for each item in a", "continuation": "sequence"},
    {"context": "The import statement loads a", "continuation": "module"},
    {"context": "An exception is raised when an error", "continuation": "occurs"},
]

RENDER = {"multiple_choice": (render_prompts_mc, lambda it, p: p[it["gold"]]),
          "schema": (render_prompts_schema, lambda it, p: p[it["gold"]]),
          "language_modeling": (render_prompts_lm, lambda it, p: p[1])}


def gold_tokens(tokenizer, task_type, data, idx, k, delimiter):
    render, pick = RENDER[task_type]
    prompts = render(data[idx], delimiter, fewshot_for(data, idx, k))
    return tokenizer(pick(data[idx], prompts), prepend=tokenizer.get_bos_token_id())


@pytest.mark.parametrize("task_type,data,k,delimiter", [
    ("multiple_choice", MC_DATA, 0, ":"),
    ("multiple_choice", MC_DATA, 2, "\nAnswer:"),
    ("schema", SCHEMA_DATA, 0, " "),
    ("schema", SCHEMA_DATA, 1, " "),
    ("language_modeling", LM_DATA, 0, " "),
    ("language_modeling", LM_DATA, 2, " "),
])
def test_oracle_for_the_gold_prompt_is_right_and_others_are_wrong(tokenizer, task_type, data, k, delimiter):
    meta = {"task_type": task_type, "num_fewshot": k, "continuation_delimiter": delimiter}
    V = tokenizer.get_vocab_size()
    for idx in range(len(data)):
        oracle = OracleModel(gold_tokens(tokenizer, task_type, data, idx, k, delimiter), V)
        assert evaluate_example(idx, oracle, tokenizer, data, "cpu", meta) is True
        # an oracle for another item's prompt knows nothing useful here
        if task_type == "language_modeling":
            wrong = OracleModel(gold_tokens(tokenizer, task_type, data, (idx + 1) % len(data), k, delimiter), V)
            assert evaluate_example(idx, wrong, tokenizer, data, "cpu", meta) is False
        else:
            # an oracle for a wrong option's prompt picks that option
            item = data[idx]
            render, _ = RENDER[task_type]
            prompts = render(item, delimiter, fewshot_for(data, idx, k))
            wrong_choice = (item["gold"] + 1) % len(prompts)
            wrong = OracleModel(tokenizer(prompts[wrong_choice], prepend=tokenizer.get_bos_token_id()), V)
            assert evaluate_example(idx, wrong, tokenizer, data, "cpu", meta) is False


def test_lm_needs_every_continuation_token(tokenizer):
    meta = {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "}
    data = [{"context": "The import statement loads a", "continuation": "module object"}]
    known = gold_tokens(tokenizer, "language_modeling", data, 0, 0, " ")
    assert evaluate_example(0, OracleModel(known, 500), tokenizer, data, "cpu", meta) is True
    # an oracle that goes astray on the last token only
    assert evaluate_example(0, OracleModel(known[:-1] + [known[-1] + 1], 500), tokenizer, data, "cpu", meta) is False


def test_long_prompts_are_cropped_to_max_seq_len(tokenizer):
    meta = {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": " "}
    known = gold_tokens(tokenizer, "language_modeling", LM_DATA, 0, 2, " ")
    limit = len(known) - 7
    model = OracleModel([], 500, max_seq_len=limit)
    evaluate_example(0, model, tokenizer, LM_DATA, "cpu", meta)
    (seen,) = model.seen
    assert seen.shape == (1, limit) and seen[0].tolist() == known[-limit:]


def test_too_few_examples_for_the_shots(tokenizer):
    meta = {"task_type": "multiple_choice", "num_fewshot": 2, "continuation_delimiter": " "}
    with pytest.raises(ValueError, match="2-shot evaluation needs at least 3 examples but the task has 2"):
        evaluate_example(0, OracleModel([], 500), tokenizer, MC_DATA[:2], "cpu", meta)


def test_unknown_task_type(tokenizer):
    with pytest.raises(ValueError, match="Unsupported task type: 'ranking'"):
        evaluate_example(0, OracleModel([], 500), tokenizer, LM_DATA, "cpu",
                         {"task_type": "ranking", "num_fewshot": 0, "continuation_delimiter": " "})


def test_evaluate_task_strides_over_ranks_and_sums(monkeypatch):
    seen = []

    def fake_example(idx, model, tokenizer, data, device, task_meta):
        seen.append(idx)
        return idx % 3 == 0
    reduced = []

    def fake_all_reduce(tensor, op=None):
        reduced.append(op)
        tensor[0::2] += 1.0  # the other rank got all of its (even) examples right
    monkeypatch.setattr(core_eval, "evaluate_example", fake_example)
    monkeypatch.setattr(core_eval.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(core_eval.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(core_eval.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(core_eval.dist, "barrier", lambda: None)
    monkeypatch.setattr(core_eval.dist, "all_reduce", fake_all_reduce)
    acc = evaluate_task(None, None, list(range(7)), "cpu", {})
    assert seen == [1, 3, 5]
    assert reduced == [torch.distributed.ReduceOp.SUM]
    assert acc == pytest.approx((4 + 1) / 7)  # evens 0,2,4,6 from rank 0; 3 from rank 1


def test_evaluate_task_single_process_is_the_mean(tokenizer):
    meta = {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": ":"}
    oracle = OracleModel(gold_tokens(tokenizer, "multiple_choice", MC_DATA, 2, 0, ":"), 500)
    # only item 2 is known; the rest are ties broken toward choice 0, which is gold for item 1 and 3
    expected = [evaluate_example(i, oracle, tokenizer, MC_DATA, "cpu", meta) for i in range(4)]
    assert expected == [False, True, True, True]
    assert evaluate_task(oracle, tokenizer, MC_DATA, "cpu", meta) == pytest.approx(0.75)

# -----------------------------------------------------------------------------
# evaluate_core on the local mini bundle (moved from scripts/core_driver.py into the library)


@pytest.fixture
def core_driver(monkeypatch):
    import nanochat.core_eval as core_driver

    def no_download(*args, **kwargs):
        raise AssertionError("evaluate_core tried to download the eval bundle")
    monkeypatch.setattr(core_driver, "download_file_with_lock", no_download)
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE_DIR", raising=False)
    return core_driver


@pytest.fixture
def model_and_tokenizer(fixture_base_dir):
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, _ = load_model("base", torch.device("cpu"), phase="eval")
    return model, tokenizer


def check_core_output(out, n_items):
    assert list(out["results"]) == LABELS and list(out["centered_results"]) == LABELS
    baselines = {"tiny_capitals": 25.0, "tiny_pronouns": 50.0, "tiny_endings": 0.0}
    for label in LABELS:
        acc = out["results"][label]
        assert 0.0 <= acc <= 1.0
        assert (acc * n_items[label]) == pytest.approx(round(acc * n_items[label]))  # a whole number right
        b = baselines[label] / 100
        assert out["centered_results"][label] == pytest.approx((acc - b) / (1 - b))
    assert math.isfinite(out["core_metric"])
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)


def test_evaluate_core_uses_a_bundle_placed_in_the_base_dir(fixture_base_dir, core_driver, model_and_tokenizer):
    shutil.copytree(BUNDLE, fixture_base_dir / "eval_bundle")
    model, tokenizer = model_and_tokenizer
    out = core_driver.evaluate_core(model, tokenizer, torch.device("cpu"))
    check_core_output(out, {"tiny_capitals": 6, "tiny_pronouns": 5, "tiny_endings": 5})
    # deterministic: same prompts, same few-shot draws, same answers
    assert core_driver.evaluate_core(model, tokenizer, torch.device("cpu")) == out


def test_evaluate_core_env_override_and_max_per_task(fixture_base_dir, core_driver, model_and_tokenizer, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_DIR", str(BUNDLE))
    model, tokenizer = model_and_tokenizer
    out = core_driver.evaluate_core(model, tokenizer, torch.device("cpu"), max_per_task=3)
    check_core_output(out, {label: 3 for label in LABELS})
    assert not (fixture_base_dir / "eval_bundle").exists()
    # the subset is the first max_per_task items after a fixed shuffle
    seen = []
    real = core_driver.evaluate_task
    monkeypatch.setattr(core_driver, "evaluate_task", lambda m, t, data, d, meta: seen.append(data) or real(m, t, data, d, meta))
    core_driver.evaluate_core(model, tokenizer, torch.device("cpu"), max_per_task=3, eval_bundle_dir=str(BUNDLE))
    lines = (BUNDLE / "eval_data" / "world_knowledge" / "tiny_capitals.jsonl").read_text().splitlines()
    full = [json.loads(line) for line in lines]
    random.Random(1337).shuffle(full)
    assert seen[0] == full[:3]


def test_missing_bundle_is_downloaded_and_unpacked(fixture_base_dir, monkeypatch, model_and_tokenizer):
    """The real downloader path, with the network swapped for a local zip."""
    import nanochat.core_eval as core_driver
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE_DIR", raising=False)
    calls = []

    def fake_download(url, filename, postprocess_fn=None):
        calls.append((url, filename))
        zip_path = fixture_base_dir / filename
        with zipfile.ZipFile(zip_path, "w") as zf:
            for p in BUNDLE.rglob("*"):
                if p.is_file():
                    zf.write(p, Path("eval_bundle") / p.relative_to(BUNDLE))
        postprocess_fn(str(zip_path))
        return str(zip_path)
    monkeypatch.setattr(core_driver, "download_file_with_lock", fake_download)
    model, tokenizer = model_and_tokenizer
    out = core_driver.evaluate_core(model, tokenizer, torch.device("cpu"), max_per_task=3)
    assert calls == [(core_driver.EVAL_BUNDLE_URL, "eval_bundle.zip")]
    assert (fixture_base_dir / "eval_bundle" / "core.yaml").read_bytes() == (BUNDLE / "core.yaml").read_bytes()
    assert list(out["results"]) == LABELS


def test_bundle_errors_are_one_line(tmp_path, core_driver, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as ei:
        core_driver.get_eval_bundle_dir(str(missing))
    assert str(missing) in str(ei.value) and "NANOCHAT_EVAL_BUNDLE_DIR" in str(ei.value) and "\n" not in str(ei.value)

    broken = tmp_path / "broken"
    shutil.copytree(BUNDLE, broken)
    (broken / "core.yaml").unlink()
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_DIR", str(broken))
    with pytest.raises(FileNotFoundError, match="has no core.yaml"):
        core_driver.get_eval_bundle_dir()

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE_DIR")
    (tmp_path / "base" / "eval_bundle").mkdir(parents=True)  # an empty leftover directory
    with pytest.raises(FileNotFoundError, match="so it is downloaded again"):
        core_driver.get_eval_bundle_dir()


def test_task_without_random_baseline(tmp_path, core_driver, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    csv_path = bundle / "eval_meta_data.csv"
    rows = [line for line in csv_path.read_text().splitlines() if not line.startswith("tiny_pronouns")]
    csv_path.write_text("\n".join(rows) + "\n")
    # scoring is beside the point here
    monkeypatch.setattr(core_driver, "evaluate_task", lambda *args, **kwargs: 0.5)
    with pytest.raises(ValueError, match="'tiny_pronouns' from core.yaml has no row"):
        core_driver.evaluate_core(None, None, "cpu", eval_bundle_dir=str(bundle))


def test_bad_task_data_line(tmp_path, core_driver, monkeypatch):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE, bundle)
    data = bundle / "eval_data" / "world_knowledge" / "tiny_capitals.jsonl"
    data.write_text(data.read_text() + '{"query": oops}\n')
    monkeypatch.setattr(core_driver, "evaluate_task", lambda *args, **kwargs: 0.5)
    with pytest.raises(ValueError, match=r"tiny_capitals.jsonl:7 is not valid JSON"):
        core_driver.evaluate_core(None, None, "cpu", eval_bundle_dir=str(bundle))

# -----------------------------------------------------------------------------
# The script


def run_main(monkeypatch, *argv):
    import scripts.base_eval as base_eval
    monkeypatch.setattr(sys, "argv", ["base_eval", "--device-type", "cpu", *argv])
    base_eval.main()


def test_main_core_and_bpb_write_the_csv(fixture_base_dir, monkeypatch, capsys):
    shutil.copytree(BUNDLE, fixture_base_dir / "eval_bundle")
    run_main(monkeypatch, "--eval", "core,bpb", "--max-per-task", "3", "--device-batch-size", "1", "--split-tokens", "400")
    out = capsys.readouterr().out
    assert "Adjusted split_tokens to 320 (must be divisible by 160)" in out
    bpb = {line.split()[0]: float(line.split()[2]) for line in out.splitlines() if " bpb: " in line}
    assert set(bpb) == {"train", "val"} and all(math.isfinite(v) and v > 0 for v in bpb.values())
    rows = (fixture_base_dir / "base_eval" / "base_model_000040.csv").read_text().splitlines()
    assert [r.split(",")[0].strip() for r in rows] == ["Task", *LABELS, "CORE"]
    core = float(rows[-1].split(",")[2])
    assert f"CORE metric: {core:.4f}" in out


@pytest.mark.slow
def test_main_all_modes(fixture_base_dir, monkeypatch, capsys):
    shutil.copytree(BUNDLE, fixture_base_dir / "eval_bundle")
    run_main(monkeypatch, "--max-per-task", "3", "--device-batch-size", "1", "--split-tokens", "320")
    out = capsys.readouterr().out
    assert "Conditioned samples:" in out and "Unconditioned samples:" in out and "CORE metric:" in out


def test_main_bad_input_is_one_line(fixture_base_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit) as ei:
        run_main(monkeypatch, "--eval", "bpb", "--model-tag", "d99")
    assert ei.value.code == 1
    err_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Error:")]
    assert len(err_lines) == 1 and "d99" in err_lines[0] and "does not exist" in err_lines[0]
    # a missing CORE bundle override is reported before any evaluation starts
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_DIR", str(fixture_base_dir / "no_bundle"))
    with pytest.raises(SystemExit):
        run_main(monkeypatch, "--eval", "core,bpb")
    out = capsys.readouterr().out
    assert "Error: eval bundle directory" in out and "BPB Evaluation" not in out
    with pytest.raises(SystemExit) as ei:
        run_main(monkeypatch, "--eval", "core,perplexity")
    assert ei.value.code == 2  # argparse's usage error
