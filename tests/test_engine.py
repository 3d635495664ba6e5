"""
Specification of nanochat/engine.py: the KV-cached Engine must reproduce upstream's
recorded generations exactly, agree with the naive cache-free GPT.generate, keep the
KVCache bookkeeping straight, and drive the calculator tool / row completion the way
upstream does. Also a smoke check of scripts/infer_bench.py's measurement helpers.

python -m pytest tests/test_engine.py -q
"""

import json
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from nanochat.engine import Engine, KVCache, RowState, eval_with_timeout, sample_next_token, use_calculator
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
# Fixtures: the upstream-trained d2 checkpoint, loaded the way build_model does

@pytest.fixture(scope="module")
def expected(upstream_fixtures):
    return json.loads((upstream_fixtures / "expected" / "engine.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


@pytest.fixture(scope="module")
def model(upstream_fixtures):
    ckpt = upstream_fixtures / "base_checkpoints" / "d2"
    meta = json.loads((ckpt / "meta_000040.json").read_text())
    state = torch.load(ckpt / "model_000040.pt", map_location="cpu")
    with torch.device("meta"):
        m = GPT(GPTConfig(**meta["model_config"]))
    m.to_empty(device=torch.device("cpu"))
    m.init_weights()
    m.load_state_dict(state, strict=True, assign=True)
    m.eval()
    return m


@pytest.fixture(scope="module")
def greedy_run(model, tokenizer, expected):
    """The recorded greedy call, run once and shared by the tests that inspect it."""
    call = expected["greedy"]["call"]
    steps = list(Engine(model, tokenizer).generate(expected["prompt"], **call))
    return [list(col) for col, _ in steps], [list(mask) for _, mask in steps]


def build_heldout_model(seed=0):
    """A config no fixture covers (GQA, 3 layers, pattern SSL) with every weight perturbed,
    so attention, MLPs, smear and backout all shape the output (init_weights alone zeroes
    the output projections, which would hide KV-cache mistakes)."""
    cfg = GPTConfig(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2,
                    n_embd=64, window_pattern="SSL")
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = GPT(cfg)
    m.to_empty(device=torch.device("cpu"))
    m.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(m.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
        m.smear_lambda.fill_(0.7)
    m.eval()
    return m

# -----------------------------------------------------------------------------
# Upstream's recorded generations (manifest items engine_greedy, engine_sampled)

def test_engine_greedy_matches_upstream(greedy_run, expected):
    columns, masks = greedy_run
    assert columns == expected["greedy"]["token_columns"]
    assert masks == expected["greedy"]["token_masks"]


def test_generate_batch_matches_upstream(model, tokenizer, expected):
    call = expected["generate_batch"]["call"]
    results, masks = Engine(model, tokenizer).generate_batch(expected["prompt"], **call)
    assert results == expected["generate_batch"]["results"]
    assert masks == expected["generate_batch"]["masks"]


def test_engine_sampled_matches_upstream(model, tokenizer, expected):
    call = expected["sampled"]["call"]
    steps = list(Engine(model, tokenizer).generate(expected["prompt"], **call))
    assert [list(col) for col, _ in steps] == expected["sampled"]["token_columns"]
    assert [list(mask) for _, mask in steps] == expected["sampled"]["token_masks"]


def test_engine_greedy_equals_naive_generate_on_fixture(model, greedy_run, expected):
    naive = list(model.generate(expected["prompt"], max_tokens=20, temperature=0.0))
    assert naive == expected["naive"]["tokens"]
    columns, _ = greedy_run
    for row in range(2):
        assert [col[row] for col in columns] == naive

# -----------------------------------------------------------------------------
# KV cache against the naive path on a held-out config

def test_engine_greedy_equals_naive_generate_heldout():
    model = build_heldout_model()
    tok = SimpleTokenizer(vocab_size=1000)  # special ids the 300-token model can never emit
    g = torch.Generator().manual_seed(123)
    # longer than the 128-token short window: sliding windows act in prefill and decode
    prompt = torch.randint(0, 280, (140,), generator=g).tolist()
    naive = list(model.generate(prompt, max_tokens=8, temperature=0.0))
    columns = [col for col, _ in Engine(model, tok).generate(prompt, num_samples=3, max_tokens=8, temperature=0.0)]
    assert len(columns) == 8
    for row in range(3):
        assert [col[row] for col in columns] == naive


def test_chunked_prefill_matches_full_forward():
    model = build_heldout_model(seed=5)
    with torch.no_grad():  # smear on (nanochat inits it at 0), so the first slot of every chunk must mix in the cached one
        model.smear_lambda.fill_(0.5)
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (1, 150), generator=g)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(batch_size=1, num_heads=cfg.n_kv_head, seq_len=160, head_dim=cfg.n_embd // cfg.n_head,
                        num_layers=cfg.n_layer, device="cpu", dtype=torch.float32)
        first = model(ids[:, :60], kv_cache=cache)
        assert cache.get_pos() == 60  # advanced once per forward, not once per layer
        assert cache.prev_embedding.shape == (1, 1, cfg.n_embd)
        second = model(ids[:, 60:], kv_cache=cache)
        assert cache.get_pos() == 150
        third = model(torch.tensor([[5]]), kv_cache=cache)
        assert cache.get_pos() == 151
        full_next = model(torch.cat([ids, torch.tensor([[5]])], dim=1))
    torch.testing.assert_close(first, full[:, :60], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, full[:, 60:], atol=1e-5, rtol=0)
    torch.testing.assert_close(third[:, -1], full_next[:, -1], atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# KVCache bookkeeping

def make_cache(batch_size=2, seq_len=16, num_heads=3, head_dim=4, num_layers=2):
    return KVCache(batch_size=batch_size, num_heads=num_heads, seq_len=seq_len, head_dim=head_dim,
                   num_layers=num_layers, device="cpu", dtype=torch.float32)


def test_kv_cache_layout_and_position():
    cache = make_cache()
    assert cache.k_cache.shape == cache.v_cache.shape == (2, 2, 16, 3, 4)  # (L, B, T, H, D)
    assert cache.cache_seqlens.dtype == torch.int32 and cache.cache_seqlens.shape == (2,)
    assert cache.get_pos() == 0 and cache.prev_embedding is None
    cache.advance(5)
    cache.advance(3)
    assert cache.get_pos() == 8
    assert cache.cache_seqlens.tolist() == [8, 8]
    cache.prev_embedding = torch.ones(2, 1, 6)
    cache.reset()
    assert cache.get_pos() == 0 and cache.prev_embedding is None


def test_kv_cache_layer_views_write_through():
    cache = make_cache()
    k, v = cache.get_layer_cache(1)
    assert k.shape == v.shape == (2, 16, 3, 4)
    k[:, 2] = 7.0
    v[0, 3, 1] = -1.0
    assert (cache.k_cache[1, :, 2] == 7.0).all() and (cache.k_cache[0] == 0).all()
    assert cache.v_cache[1, 0, 3, 1].eq(-1.0).all()


def test_kv_cache_prefill_broadcasts_prompt_to_rows():
    src = make_cache(batch_size=1, seq_len=6)
    src.k_cache.normal_()
    src.v_cache.normal_()
    src.advance(6)
    src.prev_embedding = torch.randn(1, 1, 8)
    dst = make_cache(batch_size=3, seq_len=10)
    dst.prefill(src)
    assert dst.get_pos() == 6 and dst.cache_seqlens.tolist() == [6, 6, 6]
    for row in range(3):
        assert torch.equal(dst.k_cache[:, row, :6], src.k_cache[:, 0])
        assert torch.equal(dst.v_cache[:, row, :6], src.v_cache[:, 0])
    assert (dst.k_cache[:, :, 6:] == 0).all()
    # smear state: one independent copy per row
    assert dst.prev_embedding.shape == (3, 1, 8)
    dst.prev_embedding[0].zero_()
    assert torch.equal(dst.prev_embedding[1], src.prev_embedding[0])


def test_kv_cache_prefill_refuses_bad_destinations():
    src = make_cache(batch_size=1, seq_len=8)
    src.advance(4)
    busy = make_cache(batch_size=2, seq_len=8)
    busy.advance(1)
    with pytest.raises(AssertionError, match="non-empty"):
        busy.prefill(src)
    with pytest.raises(AssertionError):
        make_cache(batch_size=2, seq_len=4).prefill(src)  # shorter than the source
    with pytest.raises(AssertionError):
        make_cache(batch_size=2, seq_len=8, num_heads=5).prefill(src)

# -----------------------------------------------------------------------------
# Sampling

def test_sample_next_token_modes():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    state = rng.get_state()
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]
    assert torch.equal(rng.get_state(), state), "greedy must not consume the generator"
    # top_k=1 leaves a single candidate whatever the draw
    assert sample_next_token(logits, rng, temperature=1.0, top_k=1).tolist() == [[1], [0]]
    # top_k=2: only the two best ids can ever appear
    picks = {t for _ in range(50) for t in sample_next_token(logits[:1], rng, 5.0, top_k=2)[:, 0].tolist()}
    assert picks <= {1, 3} and len(picks) == 2
    with pytest.raises(ValueError, match="non-negative"):
        sample_next_token(logits, rng, temperature=-0.5)

# -----------------------------------------------------------------------------
# Calculator tool

@pytest.mark.parametrize("expr, result", [
    ("12*3", 36),
    ("1,000 + 2", 1002),           # thousands separators are dropped
    ("(7 - 2) / 2", 2.5),
    ("'strawberry'.count('r')", 3),
    ('"banana".count("an")', 2),
    ("2**10", None),               # power is refused (9**9**9 would hang)
    ("1/0", None),                 # errors become None
    ("'abc'.upper()", None),       # only .count() is allowed
    ("__import__('os')", None),
    ("open('x').count('a')", None),
    ("[1, 2].count(1)", None),     # brackets are not in the allowed alphabet
])
def test_use_calculator(expr, result):
    assert use_calculator(expr) == result


def test_eval_with_timeout_stops_long_formulas_and_restores_handler():
    marker = lambda signum, frame: None
    previous = signal.signal(signal.SIGALRM, marker)
    try:
        t0 = time.time()
        # ~10^9 bytecode iterations (10^8 ran in 0.93 s on an idle CPU, beating the 1 s alarm)
        assert eval_with_timeout("{0 for a in 'x'*10**5 for b in 'x'*10**4}", max_time=1) is None
        assert time.time() - t0 < 4
        assert signal.getsignal(signal.SIGALRM) is marker
        assert signal.alarm(0) == 0, "no alarm may be left pending"
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_eval_with_timeout_works_off_the_main_thread():
    # e.g. a web server generating in a worker thread, where SIGALRM cannot be installed
    out = []
    worker = threading.Thread(target=lambda: out.append(eval_with_timeout("6*7")))
    worker.start()
    worker.join()
    assert out == [42]

# -----------------------------------------------------------------------------
# Tool-use state machine and row completion, with a scripted stand-in model

class SimpleTokenizer:
    """Just enough tokenizer for the engine: specials at the top of the vocab, bytes below."""
    NAMES = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, vocab_size):
        self.special = {name: vocab_size - len(self.NAMES) + i for i, name in enumerate(self.NAMES)}

    def encode_special(self, name):
        return self.special[name]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ScriptedModel:
    """
    Stands in for GPT. The prefill (batch 1) puts all mass on scripts[0][0]; decode step s
    puts row i's mass on scripts[i][s] (token 0 once a script runs out). Records the token
    columns the engine feeds back, so tests can check forced tokens reach the model.
    """

    def __init__(self, scripts, vocab_size, sequence_len=64):
        self.config = SimpleNamespace(n_kv_head=1, n_head=1, n_embd=4, n_layer=1, sequence_len=sequence_len)
        self.scripts = scripts
        self.vocab_size = vocab_size
        self.fed = []
        self.calls = 0

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        step = self.calls
        self.calls += 1
        if step > 0:
            self.fed.append(ids[:, 0].tolist())
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        for row in range(B):
            script = self.scripts[row if step > 0 else 0]
            if step < len(script):
                logits[row, -1, script[step]] = 10.0
        return logits


def test_calculator_results_are_forced_into_their_rows(tokenizer):
    sp = tokenizer.encode_special
    ps, pe, os_, oe = sp("<|python_start|>"), sp("<|python_end|>"), sp("<|output_start|>"), sp("<|output_end|>")
    ae, bos = sp("<|assistant_end|>"), tokenizer.get_bos_token_id()
    filler = tokenizer.encode(" the")[0]
    math_expr = tokenizer.encode("12*3")
    bad_expr = tokenizer.encode("2**100")
    count_expr = tokenizer.encode("'strawberry'.count('r')")
    forced_36 = [os_] + tokenizer.encode("36") + [oe]
    forced_3 = [os_] + tokenizer.encode("3") + [oe]
    scripts = [
        # the model's own choices during forced steps (filler) must be overridden
        [ps] + math_expr + [pe] + [filler] * len(forced_36) + [filler, ae],
        [ps] + bad_expr + [pe, filler, bos],
        [ps] + count_expr + [pe] + [filler] * len(forced_3) + [ae],
    ]
    model = ScriptedModel(scripts, vocab_size=tokenizer.get_vocab_size())
    steps = list(Engine(model, tokenizer).generate([bos, filler], num_samples=3, max_tokens=100, temperature=0.0))

    columns = [col for col, _ in steps]
    masks = [mask for _, mask in steps]
    want = [
        [ps] + math_expr + [pe] + forced_36 + [filler, ae],
        [ps] + bad_expr + [pe, filler, bos],
        [ps] + count_expr + [pe] + forced_3 + [ae],
    ]
    want_masks = [
        [1] * (len(math_expr) + 2) + [0] * len(forced_36) + [1, 1],
        [1] * (len(bad_expr) + 4),
        [1] * (len(count_expr) + 2) + [0] * len(forced_3) + [1],
    ]
    # generation runs until the last row finishes
    assert len(steps) == max(len(w) for w in want)
    for row in range(3):
        n = len(want[row])
        assert [col[row] for col in columns[:n]] == want[row]
        assert [m[row] for m in masks[:n]] == want_masks[row]
    # every yielded column except the last is fed back to the model, forced tokens included
    assert model.fed == columns[:-1]

    # generate_batch: prompt + row tokens without the terminal token; masks 0 on prompt and forced
    model = ScriptedModel(scripts, vocab_size=tokenizer.get_vocab_size())
    results, batch_masks = Engine(model, tokenizer).generate_batch([bos, filler], num_samples=3, max_tokens=100, temperature=0.0)
    for row in range(3):
        assert results[row] == [bos, filler] + want[row][:-1]
        assert batch_masks[row] == [0, 0] + want_masks[row][:-1]


def test_rows_complete_independently_on_assistant_end_and_bos():
    tok = SimpleTokenizer(vocab_size=300)
    ae, bos = tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()
    scripts = [
        [10, 11, ae],           # ends at step 3 on <|assistant_end|>
        [10, 12, 13, 14, bos],  # ends at step 5 on <|bos|>
    ]
    model = ScriptedModel(scripts, vocab_size=300)
    steps = list(Engine(model, tok).generate([1, 2, 3], num_samples=2, max_tokens=50, temperature=0.0))
    # the finished row keeps getting tokens (ignored by callers) until every row is done
    assert [col for col, _ in steps] == [[10, 10], [11, 12], [ae, 13], [0, 14], [0, bos]]

    results, masks = Engine(ScriptedModel(scripts, 300), tok).generate_batch([1, 2, 3], num_samples=2, max_tokens=50, temperature=0.0)
    assert results == [[1, 2, 3, 10, 11], [1, 2, 3, 10, 12, 13, 14]]
    assert masks == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]]

    # max_tokens cuts generation before either row finishes
    steps = list(Engine(ScriptedModel(scripts, 300), tok).generate([1, 2, 3], num_samples=2, max_tokens=2, temperature=0.0))
    assert [col for col, _ in steps] == [[10, 10], [11, 12]]


def test_row_state_starts_clean():
    state = RowState([1, 2])
    assert state.current_tokens == [1, 2] and not state.forced_tokens
    assert not state.in_python_block and state.python_expr_tokens == [] and not state.completed
    assert RowState().current_tokens == []


def test_generation_without_max_tokens_stops_when_context_is_full():
    tok = SimpleTokenizer(vocab_size=300)
    model = ScriptedModel([[]], vocab_size=300, sequence_len=16)  # never finishes on its own
    steps = list(Engine(model, tok).generate(list(range(1, 11)), num_samples=1, max_tokens=None, temperature=0.0))
    # 10 prompt tokens + 6 fed back fill the 16 slots; the 7th token is the last prediction
    assert len(steps) == 7
    assert model.calls == 1 + 6


def test_generate_rejects_bad_prompts():
    tok = SimpleTokenizer(vocab_size=300)
    engine = Engine(ScriptedModel([[5]], vocab_size=300), tok)
    for bad in ([], "hello", [1, 2.0], None):
        with pytest.raises(ValueError, match="list of int"):
            next(engine.generate(bad, max_tokens=3))

# -----------------------------------------------------------------------------
# scripts/infer_bench.py helpers on the fixture model

def test_infer_bench_helpers(model, tokenizer):
    from scripts.infer_bench import bench_generate, build_prompt, parse_batch_sizes, weight_bytes
    prompt = build_prompt(tokenizer, 33)
    assert len(prompt) == 33 and prompt[0] == tokenizer.get_bos_token_id()
    assert len(build_prompt(tokenizer, 3)) == 3
    result = bench_generate(Engine(model, tokenizer), prompt, batch_size=2, decode_tokens=4, temperature=0.0)
    assert result["ttft"] > 0 and result["peak_vram"] is None  # no CUDA here
    assert len(result["step_times"]) == 3  # the first token is TTFT, the rest are decode steps
    assert weight_bytes(model) == 4 * sum(p.numel() for p in model.parameters())  # fp32 on CPU
    assert parse_batch_sizes("1,4,16") == [1, 4, 16]
    with pytest.raises(ValueError, match="--batch-sizes"):
        parse_batch_sizes("1,x")
    with pytest.raises(ValueError, match="--batch-sizes"):
        parse_batch_sizes("0")


@pytest.mark.slow
def test_infer_bench_end_to_end_on_cpu(fixture_base_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.infer_bench", "-i", "base", "--prompt-tokens", "40",
         "--decode-tokens", "6", "--batch-sizes", "1,2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout.splitlines()[-1])
    assert payload["prompt_tokens"] == 40 and payload["decode_tokens"] == 6
    assert [row["batch_size"] for row in payload["sweep"]] == [1, 2]
    assert all(row["decode_steps"] == 5 for row in payload["sweep"])
    assert payload["peak_bandwidth_bytes_per_sec"] is None  # unknown peak on CPU -> null, not Infinity
