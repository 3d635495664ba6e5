"""
Specification of nanochat/tokenizer.py and scripts/tok_train.py / tok_eval.py.

Most checks compare against upstream's recorded outputs (expected/tokenizer.json in the
shared fixtures): the vocabulary a training run must produce, the ids every encode call
must return, and the rendering of a chat conversation with its loss mask. The rest pin
down invariants (special-token literals are plain text, inputs are not mutated, save/load
round-trips) and the error messages a user sees when something is missing.
"""
import copy
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import tiktoken
import torch

import nanochat.tokenizer as tokenizer_module
from nanochat.tokenizer import (RustBPETokenizer, SPECIAL_TOKENS, SPLIT_PATTERN,
                                get_tokenizer, get_token_bytes)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def expected(upstream_fixtures):
    return json.loads((upstream_fixtures / "expected" / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def corpus(upstream_fixtures):
    return json.loads((upstream_fixtures / "tokenizer_corpus.json").read_text())


@pytest.fixture(scope="module")
def trained(corpus):
    """Our own training run on the fixture corpus, with upstream's vocab size."""
    return RustBPETokenizer.train_from_iterator(iter(corpus), 500)


@pytest.fixture(scope="module")
def saved_tok(upstream_fixtures):
    """The tokenizer upstream trained and saved (tokenizer/tokenizer.pkl)."""
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


def special_ids(tok):
    return {tok.encode_special(name) for name in SPECIAL_TOKENS}

# -----------------------------------------------------------------------------
# Module constants


def test_constants_match_upstream(expected):
    assert SPLIT_PATTERN == expected["split_pattern"]
    assert SPECIAL_TOKENS == list(expected["special_tokens"])  # order fixes the ids
    assert SPECIAL_TOKENS[0] == "<|bos|>"

# -----------------------------------------------------------------------------
# tokenizer_train: training on the fixture corpus reproduces upstream's vocabulary


def test_train_reproduces_upstream_vocab(trained, expected):
    assert trained.get_vocab_size() == expected["vocab_size"] == 500
    hex_vocab = expected["token_bytes_hex"]
    assert len(hex_vocab) == 500 - len(SPECIAL_TOKENS)
    ours = [trained.decode_single_token_bytes(i).hex() for i in range(len(hex_vocab))]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, hex_vocab)) if a != b]
    assert not mismatches, f"{len(mismatches)} token ids differ, first: {mismatches[:5]}"


def test_train_special_ids_follow_the_learned_vocab(trained, expected):
    for name, token_id in expected["special_tokens"].items():
        assert trained.encode_special(name) == token_id
    assert trained.get_bos_token_id() == expected["bos_token_id"]
    assert sorted(trained.get_special_tokens()) == expected["special_tokens_set"]


def test_train_encodes_like_upstream(trained, expected):
    for text, ids in zip(expected["strings"], expected["encode"]):
        assert trained.encode(text) == ids, text


def test_train_rejects_too_small_vocab(corpus):
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small.*at least 265"):
        RustBPETokenizer.train_from_iterator(iter(corpus), 200)

# -----------------------------------------------------------------------------
# tokenizer_encode: the saved tokenizer, loaded both ways, gives upstream's ids


@pytest.fixture(params=["from_directory", "get_tokenizer"])
def loaded(request, fixture_base_dir):
    if request.param == "from_directory":
        return RustBPETokenizer.from_directory(str(fixture_base_dir / "tokenizer"))
    return get_tokenizer()  # reads NANOCHAT_BASE_DIR, which fixture_base_dir sets


def test_loaded_metadata(loaded, expected):
    assert isinstance(loaded.enc, tiktoken.Encoding)
    assert loaded.enc._pat_str == expected["split_pattern"]
    assert loaded.get_vocab_size() == expected["vocab_size"]
    assert loaded.get_bos_token_id() == expected["bos_token_id"]
    assert sorted(loaded.get_special_tokens()) == expected["special_tokens_set"]
    for name, token_id in expected["special_tokens"].items():
        assert loaded.encode_special(name) == token_id
    ours = [loaded.decode_single_token_bytes(i).hex() for i in range(len(expected["token_bytes_hex"]))]
    assert ours == expected["token_bytes_hex"]


def test_loaded_encode_calls(loaded, expected):
    strings = expected["strings"]
    bos = loaded.get_bos_token_id()
    assert [loaded.encode(s) for s in strings] == expected["encode"]
    assert [loaded(s) for s in strings] == expected["encode"]
    assert loaded.encode(strings) == expected["encode_batch"]
    assert loaded.encode(strings, num_threads=1) == expected["encode_batch"]
    # upstream recorded the prepend/append variants on the first few strings only
    want = expected["encode_prepend_bos"]
    assert [loaded.encode(s, prepend="<|bos|>") for s in strings[:len(want)]] == want
    want = expected["encode_prepend_id_append_name"]
    assert [loaded.encode(s, prepend=bos, append="<|assistant_end|>") for s in strings[:len(want)]] == want
    want = expected["encode_batch_prepend_append"]
    assert loaded.encode(strings[:len(want)], prepend="<|user_start|>", append="<|user_end|>") == want


def test_loaded_decode_and_id_to_token(loaded, expected):
    roundtrips = [loaded.decode(loaded.encode(s)) == s for s in expected["strings"]]
    assert roundtrips == expected["decode_roundtrip"]
    assert loaded.decode(expected["encode_prepend_id_append_name"][0]) == expected["decode_with_specials"]
    for token_id, text in expected["id_to_token"].items():
        assert loaded.id_to_token(int(token_id)) == text


def test_get_token_bytes(fixture_base_dir, expected):
    token_bytes = get_token_bytes(device="cpu")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (expected["vocab_size"],)
    lengths = [len(h) // 2 for h in expected["token_bytes_hex"]] + [0] * len(SPECIAL_TOKENS)
    assert token_bytes.tolist() == lengths


def test_encode_rejects_other_types(saved_tok):
    with pytest.raises(ValueError, match="Invalid input type"):
        saved_tok.encode(("a tuple", "of strings"))

# -----------------------------------------------------------------------------
# Special-token literals in ordinary text are just text


def test_special_literals_are_plain_text(saved_tok, expected):
    specials = special_ids(saved_tok)
    for name in SPECIAL_TOKENS:
        ids = saved_tok.encode(f"before {name} after")
        assert not specials & set(ids), name
        assert saved_tok.decode(ids) == f"before {name} after"
    literal_text = "The <|bos|> token and <|assistant_start|> are plain text here."
    assert literal_text in expected["strings"]
    batch = saved_tok.encode([literal_text] * 3)
    assert all(not specials & set(row) for row in batch)


def test_prepend_append_are_the_only_way_in(saved_tok):
    ids = saved_tok.encode("<|bos|>", prepend="<|bos|>", append="<|bos|>")
    bos = saved_tok.get_bos_token_id()
    assert ids[0] == bos and ids[-1] == bos
    assert bos not in ids[1:-1] and len(ids) > 3

# -----------------------------------------------------------------------------
# tokenizer_render: chat conversations -> (ids, mask)


def test_render_conversation_matches_upstream(saved_tok, expected):
    conversation = expected["conversation"]
    before = copy.deepcopy(conversation)
    ids, mask = saved_tok.render_conversation(conversation)
    assert ids == expected["render_conversation"]["ids"]
    assert mask == expected["render_conversation"]["mask"]
    assert conversation == before, "render_conversation mutated its input"


def test_render_conversation_max_tokens(saved_tok, expected):
    want = expected["render_conversation_max_tokens"]
    ids, mask = saved_tok.render_conversation(expected["conversation"], max_tokens=want["max_tokens"])
    assert want["max_tokens"] == 30
    assert (ids, mask) == (want["ids"], want["mask"])


def test_render_for_completion_matches_upstream(saved_tok, expected):
    conversation = expected["conversation"]
    before = copy.deepcopy(conversation)
    ids = saved_tok.render_for_completion(conversation)
    assert ids == expected["render_for_completion"]
    assert ids[-1] == saved_tok.encode_special("<|assistant_start|>")
    assert conversation == before, "render_for_completion mutated its input"


def test_render_without_system_message_does_not_mutate(saved_tok):
    conversation = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]}
    before = copy.deepcopy(conversation)
    ids, mask = saved_tok.render_conversation(conversation)
    saved_tok.render_for_completion(conversation)
    assert conversation == before
    # only the assistant's words and its end token are supervised
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == saved_tok.encode("hello") + [saved_tok.encode_special("<|assistant_end|>")]


@pytest.mark.parametrize("messages, message", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "hi"}], "Message 0 is from assistant but should be from user"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
    ([{"role": "user", "content": ["not", "a", "string"]}], "User messages must be strings"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "Unknown part type: image"),
])
def test_render_rejects_malformed_conversations(saved_tok, messages, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        saved_tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_a_final_assistant_message(saved_tok):
    with pytest.raises(ValueError, match="Last message must be from the Assistant"):
        saved_tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


def test_visualize_tokenization(saved_tok, expected):
    # ordinary tokens only: the special tokens' own names contain the '|' separator
    ids = expected["render_conversation"]["ids"][2:14]
    assert not set(ids) & special_ids(saved_tok)
    mask = [0, 1] * 6
    text = saved_tok.visualize_tokenization(ids, mask, with_token_id=True)
    pieces = text.split("|")
    assert len(pieces) == 2 * len(ids)
    for k, (token_id, m) in enumerate(zip(ids, mask)):
        color = "\033[92m" if m else "\033[91m"
        assert pieces[2 * k] == f"{color}{saved_tok.decode([token_id])}\033[0m"
        assert pieces[2 * k + 1] == f"\033[90m({token_id})\033[0m"
    assert len(saved_tok.visualize_tokenization(ids, mask).split("|")) == len(ids)

# -----------------------------------------------------------------------------
# Saving and loading


def test_save_load_roundtrip(trained, expected, tmp_path):
    out_dir = tmp_path / "nested" / "tok"
    trained.save(str(out_dir))
    assert (out_dir / "tokenizer.pkl").exists()
    loaded = RustBPETokenizer.from_directory(str(out_dir))
    assert loaded.enc.name == "rustbpe"
    assert loaded.enc._mergeable_ranks == trained.enc._mergeable_ranks
    assert loaded.enc._special_tokens == trained.enc._special_tokens
    assert loaded.get_bos_token_id() == trained.get_bos_token_id()
    assert loaded.encode(expected["strings"]) == trained.encode(expected["strings"])


def test_missing_tokenizer_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty_base"))
    with pytest.raises(FileNotFoundError) as info:
        get_tokenizer()
    message = str(info.value)
    assert "\n" not in message
    assert "tokenizer.pkl" in message and "python -m scripts.tok_train" in message
    with pytest.raises(FileNotFoundError, match=re.escape("python -m scripts.tok_train")):
        get_token_bytes()


def test_from_pretrained_offline_error(monkeypatch):
    def no_network(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")
    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", no_network)
    with pytest.raises(RuntimeError, match=r"could not load tiktoken encoding 'gpt2'.*TIKTOKEN_CACHE_DIR"):
        RustBPETokenizer.from_pretrained("gpt2")

# -----------------------------------------------------------------------------
# scripts/tok_train.py end to end, on tiny local shards


def write_shards(data_dir, corpus):
    """Two shards in upstream's layout: a 'text' column in several row groups.
    The last shard is the val split, so shard 0 is all the train data."""
    data_dir.mkdir(parents=True)
    pq.write_table(pa.table({"text": corpus[:400]}), data_dir / "shard_00000.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": corpus[400:]}), data_dir / "shard_00001.parquet", row_group_size=64)


def run_script(module, base_dir, *args):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def run_in_process(module, monkeypatch, *args):
    """Run a script the way `python -m` would, but in this process (importing torch in a
    fresh subprocess costs seconds); returns its exit code."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))  # scripts/ is importable from the repo root only
    monkeypatch.setattr(sys, "argv", [module, *args])
    sys.modules.pop(module, None)
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


# The subprocess run is the real CLI, but a fresh interpreter spends seconds importing
# torch, so by default the same script runs in-process and the subprocess run is slow-marked.
@pytest.mark.parametrize("how", ["in_process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_tok_train_end_to_end(how, tmp_path, corpus, monkeypatch, capsys):
    base = tmp_path / "base"
    write_shards(base / "base_data_climbmix", corpus)
    max_chars, doc_cap, vocab_size = 20_000, 300, 300
    args = [f"--max-chars={max_chars}", f"--doc-cap={doc_cap}", f"--vocab-size={vocab_size}"]
    if how == "subprocess":
        proc = run_script("scripts.tok_train", base, *args)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    else:
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
        assert run_in_process("scripts.tok_train", monkeypatch, *args) == 0
        out = capsys.readouterr().out

    tok = RustBPETokenizer.from_directory(str(base / "tokenizer"))
    assert tok.get_vocab_size() == vocab_size

    # the script must train on exactly upstream's text stream: train split in order, each
    # doc cut to doc_cap, stopping right after the doc that pushes the total past max_chars
    stream, total = [], 0
    for doc in corpus[:400]:
        stream.append(doc[:doc_cap])
        total += len(stream[-1])
        if total > max_chars:
            break
    assert any(len(doc) > doc_cap for doc in corpus[:len(stream)])  # the cap really bites
    assert f"Trained on {total:,} chars from {len(stream):,} docs" in out
    reference = RustBPETokenizer.train_from_iterator(iter(stream), vocab_size)
    assert tok.enc._mergeable_ranks == reference.enc._mergeable_ranks

    token_bytes = torch.load(base / "tokenizer" / "token_bytes.pt")
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (vocab_size,)
    specials = special_ids(tok)
    want = [0 if i in specials else len(tok.decode_single_token_bytes(i)) for i in range(vocab_size)]
    assert token_bytes.tolist() == want
    assert token_bytes[:256].tolist() == [1] * 256  # raw bytes, even the non-UTF-8 ones


def test_tok_train_without_data_fails_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    assert run_in_process("scripts.tok_train", monkeypatch, "--vocab-size=300") == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("Error:") and "nanochat.dataset" in last_line
    assert not (tmp_path / "base" / "tokenizer").exists()


def test_tok_train_rejects_tiny_vocab(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    assert run_in_process("scripts.tok_train", monkeypatch, "--vocab-size=100") == 2
    assert "--vocab-size must be at least 265" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# scripts/tok_eval.py


def run_tok_eval(monkeypatch, capsys):
    assert run_in_process("scripts.tok_eval", monkeypatch) == 0
    return capsys.readouterr().out


def test_tok_eval_without_reference_encodings(fixture_base_dir, monkeypatch, capsys):
    def offline(name):
        raise requests.exceptions.ConnectionError("no network")
    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", offline)
    out = run_tok_eval(monkeypatch, capsys)
    assert "GPT-2 tokenizer unavailable" in out and "GPT-4 tokenizer unavailable" in out
    assert "Ours: 500" in out
    assert "Comparison with" not in out
    # our own table still covers every text, including both climbmix splits
    for name in ["news", "korean", "code", "math", "science", "climbmix-train", "climbmix-val"]:
        assert re.search(rf"^{name}\s+\d+\s+\d+\s+\d+\.\d\d", out, re.M), name


def test_tok_eval_comparison_tables(fixture_base_dir, monkeypatch, capsys):
    # stand in for the downloadable references with our own tokenizer: every row must tie
    monkeypatch.setattr(RustBPETokenizer, "from_pretrained", classmethod(lambda cls, name: get_tokenizer()))
    out = run_tok_eval(monkeypatch, capsys)
    assert "Comparison with GPT-2:" in out and "Comparison with GPT-4:" in out
    rows = [line for line in out.splitlines() if line.startswith("climbmix-val")]
    assert len(rows) == 3  # our table + two comparisons
    assert all("Tie" in row and "+0.0%" in row for row in rows[1:])
