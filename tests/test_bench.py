"""
Smoke tests of the benchmark scripts' logic: log parsing, summaries and ratios, report
formatting, the ours/upstream orchestration (against stand-in base_train scripts that print
canned log lines) and the decode measurement on a tiny model. No timing is asserted.
"""
import sys

import pytest
import torch

from cli_probe import exit_before_torch
import scripts.bench_common as bc
import scripts.bench_train as bt
import scripts.bench_decode as bd

# Two lines in the exact format both base_train implementations print, around other output
LOG = """\
Vocab size: 4,096
step 00000/00005 (0.00%) | loss: 8.318007 | lrm: 0.03 | dt: 233274.49ms | tok/sec: 8 | bf16_mfu: 0.00 | epoch: 1 pq: 1 rg: 6 | total time: 0.00m
step 00001/00005 (20.00%) | loss: 8.317660 | lrm: 0.05 | dt: 3171.33ms | tok/sec: 645 | bf16_mfu: 0.00 | epoch: 1 pq: 1 rg: 6 | total time: 0.00m
step 00002/00005 (40.00%) | loss: 8.317523 | lrm: 0.07 | dt: 1.50ms | tok/sec: 1,365,333 | bf16_mfu: 41.25 | epoch: 1 pq: 1 rg: 6 | total time: 0.00m
Step 00002 | Validation bpb: 3.1
step 00003/00005 (60.00%) | loss: 8.316806 | lrm: 0.10 | dt: 2.00ms | tok/sec: 1,024,000 | bf16_mfu: 30.94 | epoch: 1 pq: 1 rg: 6 | total time: 0.00m
step 00004/00005 (80.00%) | loss: 8.316096 | lrm: 0.12 | dt: 1.00ms | tok/sec: 2,048,000 | bf16_mfu: 61.88 | epoch: 1 pq: 1 rg: 7 | total time: 0.00m | eta: 0.1m
Peak memory usage: 0.00MiB
"""


def test_parse_step_lines_reads_every_field_and_ignores_other_lines():
    steps = bt.parse_step_lines(LOG)
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    assert all(s["total"] == 5 for s in steps)
    assert steps[0]["dt_ms"] == 233274.49
    assert steps[2]["tok_per_sec"] == 1365333  # thousands separators removed
    assert steps[4]["mfu"] == 61.88


def test_summarize_run_skips_warmup_and_keeps_compile_step_apart():
    s = bt.summarize_run(bt.parse_step_lines(LOG), skip=2)
    assert s["first_step_s"] == pytest.approx(233.27449)
    assert s["num_steps"] == 3
    assert s["median_tok_per_sec"] == 1365333
    assert s["median_dt_ms"] == 1.50
    assert s["median_mfu"] == 41.25


def test_summarize_run_errors_are_explicit():
    with pytest.raises(ValueError, match="no 'step"):
        bt.summarize_run([], skip=3)
    with pytest.raises(ValueError, match="warm-up"):
        bt.summarize_run(bt.parse_step_lines(LOG), skip=10)


def _run(tok_per_sec, mfu=0.0):
    return {"tok_per_sec": list(tok_per_sec), "median_tok_per_sec": sorted(tok_per_sec)[len(tok_per_sec) // 2],
            "median_mfu": mfu, "first_step_s": 1.0}


def test_compare_pooled_and_paired_ratios():
    ours = [_run([90, 100, 110]), _run([190, 200, 210])]
    upstream = [_run([95, 100, 105]), _run([100, 100, 100])]
    r = bt.compare(ours, upstream)
    # pooled medians: ours median(90,100,110,190,200,210)=150, upstream 100
    assert r["pooled_ratio"] == pytest.approx(1.5)
    assert r["paired_ratio"] == pytest.approx((1.0 + 2.0) / 2)
    assert r["passes"]
    assert not bt.compare([_run([94])], [_run([100])])["passes"]
    assert bt.compare([_run([95])], [_run([100])])["passes"]  # the bound itself passes


def test_format_table_plain_and_markdown():
    rows = [dict(side="ours", run=1, first_step_s=12.34, median_tok_per_sec=1234.0, median_dt_ms=5.5, median_mfu=0.0,
                 load="1.00 / 2.00", wall_s=30.0),
            dict(side="ours", run="all", first_step_s=None, median_tok_per_sec=1234.0, median_dt_ms=None, median_mfu=0.0,
                 load="", wall_s=None)]
    md = bt.format_table(rows, markdown=True).splitlines()
    assert len(md) == 4 and md[0].startswith("| side |") and set(md[1]) <= set("|-")
    assert "| ours | 1 | 12.3 | 1,234 | 5.5 | 0.00 | 1.00 / 2.00 | 30 |" == md[2]
    plain = bt.format_table(rows).splitlines()
    assert len(plain) == 4 and plain[2].split()[:4] == ["ours", "1", "12.3", "1,234"]


def test_cpu_model_and_flag_splitting():
    assert bc.cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n") == "Intel(R) Xeon(R) Processor"
    assert bc.cpu_model("processor : 0\n") == "unknown CPU"
    assert bt.split_train_flags(["--repeats", "2", "--", "--depth=12"]) == (["--repeats", "2"], ["--depth=12"])
    assert bt.split_train_flags(["--repeats", "2"]) == (["--repeats", "2"], [])
    cmd = bt.train_command("py", 8, ["--depth=12"], 30, "bench_ours")
    assert cmd[:4] == ["py", "-m", "torch.distributed.run", "--standalone"]
    assert "--num-iterations=30" in cmd and "--eval-every=-1" in cmd and cmd[-1] == "--model-tag=bench_ours"


def test_git_commit_only_for_a_checkout_root(tmp_path):
    import subprocess
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "f.txt").write_text("x")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert bc.git_commit(repo) == head
    (repo / "f.txt").write_text("y")
    assert bc.git_commit(repo) == head + "+dirty"
    assert bc.git_commit(repo / "sub") is None  # e.g. an upstream archive unpacked inside another repo
    assert bc.git_commit(tmp_path / "nowhere") is None


def test_append_section_creates_then_appends(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    bc.append_section(doc, "### A\n\nfirst\n")
    bc.append_section(doc, "### B\n\nsecond")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n### A\n\nfirst\n\n### B\n\nsecond\n")


def test_bad_upstream_dir_and_bad_step_counts(tmp_path):
    with pytest.raises(FileNotFoundError, match="git clone https://github.com/karpathy/nanochat"):
        bt.check_upstream_dir(tmp_path)
    with pytest.raises(ValueError, match="this repo itself"):
        bt.check_upstream_dir(bt.REPO_ROOT)
    with pytest.raises(ValueError, match="--steps 3"):
        bt.main(["--steps", "3", "--skip", "3"])

# -----------------------------------------------------------------------------
# Orchestration end to end, with stand-ins for the two base_train scripts

FAKE_BASE_TRAIN = '''
import os, sys
from pathlib import Path
# the benchmark must give both sides the same data dir, compile on, and run from the side's root
assert Path(os.environ["NANOCHAT_BASE_DIR"], "tokenizer").is_dir()
assert "NANOCHAT_COMPILE" not in os.environ
assert Path.cwd().resolve() == Path(__file__).resolve().parent.parent
n = int(next(a.split("=")[1] for a in sys.argv if a.startswith("--num-iterations=")))
for step in range(n):
    tps = 8 if step == 0 else TOK_PER_SEC
    print(f"step {step:05d}/{n:05d} (0.00%) | loss: 1.0 | lrm: 1.00 | dt: {2048000 / tps:.2f}ms | tok/sec: {tps:,} | bf16_mfu: 0.00 | epoch: 1 | total time: 0.00m")
'''


def _fake_checkout(root, tok_per_sec):
    (root / "scripts").mkdir(parents=True)
    (root / "nanochat").mkdir()
    (root / "nanochat" / "gpt.py").write_text("")
    (root / "scripts" / "base_train.py").write_text(FAKE_BASE_TRAIN.replace("TOK_PER_SEC", str(tok_per_sec)))
    return root


def test_interleaved_comparison_end_to_end(tmp_path, monkeypatch):
    ours = _fake_checkout(tmp_path / "ours", 1900)
    upstream = _fake_checkout(tmp_path / "upstream", 2000)
    base = tmp_path / "base"
    (base / "tokenizer").mkdir(parents=True)
    (base / "base_data_climbmix").mkdir()
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bt, "REPO_ROOT", ours)
    monkeypatch.setattr(bt, "DOCS_PATH", doc)
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")  # must be removed for the runs
    # skip the torch-importing probe of the machine (slow under load); its formatting is checked here
    machine = dict(cpu="Test CPU", cores=2, threads=2, torch="2.x", gpu=None, num_gpus=0)
    monkeypatch.setattr(bt, "describe_machine", lambda python: machine)
    result = bt.main(["--upstream-dir", str(upstream), "--steps", "5", "--repeats", "2",
                      "--python", sys.executable, "--base-dir", str(base), "--record"])
    assert result["pooled_ratio"] == pytest.approx(0.95) and result["paired_ratio"] == pytest.approx(0.95)
    assert result["passes"]
    text = doc.read_text()
    assert "### Training throughput" in text and "PASS" in text
    assert "- device: Test CPU, 2 cores (torch threads: 2), no GPU, torch 2.x" in text
    assert "python -m scripts.bench_train --upstream-dir" in text and "--depth=4" in text  # default CPU flags recorded
    rows = [line for line in text.splitlines() if line.startswith("| ours") or line.startswith("| upstream")]
    # interleaved, who goes first alternating: ours 1, upstream 1, upstream 2, ours 2, then the pooled rows
    assert [r.split("|")[1:3] for r in rows] == [[" ours ", " 1 "], [" upstream ", " 1 "], [" upstream ", " 2 "],
                                                [" ours ", " 2 "], [" ours ", " all "], [" upstream ", " all "]]
    assert not any((base / "tokenizer").iterdir())  # the user's base dir is only read

# -----------------------------------------------------------------------------
# bench_decode

def test_parse_int_list():
    assert bd.parse_int_list("1024,8192") == [1024, 8192]
    with pytest.raises(ValueError, match="comma-separated"):
        bd.parse_int_list("1k,8k")
    with pytest.raises(ValueError, match=">= 2"):
        bd.parse_int_list("1")


def test_latency_profile_flat_and_growing():
    flat = bd.latency_profile(0.0, [1.0 + 0.1 * i for i in range(9)])
    assert flat["ttft_s"] == 1.0
    assert flat["tok_per_sec"] == pytest.approx(10.0)
    assert flat["quarter_median_s"] == pytest.approx([0.1] * 4)
    assert flat["flatness"] == pytest.approx(1.0)
    times, t = [], 0.0
    for i in range(9):  # each gap 10 ms longer than the last
        t += 0.01 * i
        times.append(t)
    grow = bd.latency_profile(0.0, times)
    assert grow["flatness"] > 3
    few = bd.latency_profile(0.0, [0.5, 0.75])  # one gap fills every quarter
    assert few["quarter_median_s"] == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="at least 2"):
        bd.latency_profile(0.0, [1.0])


def test_combine_profiles_takes_medians_per_token_index():
    steady = [1.0 + 0.1 * i for i in range(9)]
    stalled = steady[:3] + [t + 5.0 for t in steady[3:]]  # one 5 s stall before token 3
    runs = [bd.latency_profile(0.0, steady), bd.latency_profile(0.0, stalled), bd.latency_profile(0.5, steady)]
    combined = bd.combine_profiles(runs)
    assert combined["repeats"] == 3
    assert combined["ttft_s"] == 1.0
    assert combined["latencies_s"] == pytest.approx([0.1] * 8)  # the stall is voted out
    assert combined["flatness"] == pytest.approx(1.0)
    assert combined["tok_per_sec"] == pytest.approx(10.0)


def test_cached_and_naive_decoding_agree_on_a_tiny_model():
    args = bd.build_parser().parse_args(["--depth=2", "--aspect-ratio=32", "--head-dim=32", "--vocab-size=64",
                                         "--contexts=8,24", "--cached-tokens=6", "--naive-tokens=3"])
    args.contexts = bd.parse_int_list(args.contexts)
    torch.manual_seed(0)
    model = bd.build_model(args, torch.device("cpu"))
    assert model.config.sequence_len == 24 + 6 and model.config.n_head == 2
    from nanochat.engine import Engine
    engine = Engine(model, bd.NoToolsTokenizer())
    prompt = list(range(1, 25))
    # the benchmark's two paths must be doing the same work: identical greedy continuations
    cached = [col[0] for col, _ in engine.generate(prompt, num_samples=1, max_tokens=6, temperature=0.0)]
    naive = list(model.generate(prompt, max_tokens=6, temperature=0.0))
    assert cached == naive
    profile = bd.measure(model, engine, prompt, "cached", 6)
    assert len(profile["latencies_s"]) == 5 and profile["ttft_s"] > 0
    rows = [dict(profile, context=24, mode="cached", tokens=6, speedup=3.0)]
    md = bd.format_rows(rows, markdown=True).splitlines()
    assert len(md) == 3 and md[2].startswith("| 24 | cached | 6 |") and md[2].endswith("| 3.0x |")


def test_decode_main_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    monkeypatch.setattr(bd, "DOCS_PATH", doc)
    monkeypatch.setattr(bd, "describe_machine", lambda python: dict(cpu="Test CPU", cores=2, threads=2, torch="2.x", gpu=None, num_gpus=0))
    rows = bd.main(["--depth=1", "--aspect-ratio=32", "--head-dim=32", "--vocab-size=64", "--contexts=8,16",
                    "--cached-tokens=4", "--naive-tokens=3", "--repeats=2", "--record"])
    assert [(r["context"], r["mode"], r["tokens"], r["repeats"]) for r in rows] == [
        (8, "cached", 4, 2), (8, "naive", 3, 2), (16, "cached", 4, 2), (16, "naive", 3, 2)]
    assert all(len(r["latencies_s"]) == r["tokens"] - 1 for r in rows)
    assert "speedup" in rows[0] and "speedup" not in rows[1]
    text = doc.read_text()
    assert "### Decode with and without the KV cache" in text and "median of 2 runs per row" in text
    assert sum(line.startswith("| 8 |") or line.startswith("| 16 |") for line in text.splitlines()) == 4


def test_decode_main_rejects_bad_flags():
    with pytest.raises(ValueError, match="at least 2"):
        bd.main(["--naive-tokens=1"])
    with pytest.raises(ValueError, match="comma-separated"):
        bd.main(["--contexts=big"])
    with pytest.raises(ValueError, match="--repeats"):
        bd.main(["--repeats=0"])

# -----------------------------------------------------------------------------
# The command lines a user types: one-line errors, flags before torch, no dirty tree

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_module(args, env=None, timeout=300):
    env = dict({k: v for k, v in os.environ.items() if k != "NANOCHAT_DEBUG"},
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_megacontext_missing_model_tag_is_one_line(tmp_path):
    r = _run_module(["scripts.bench_megacontext", "delta-nll", "--model-tag", "nope"],
                    env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "base_checkpoints/nope does not exist" in err[0], r.stderr


def test_bench_megacontext_missing_gistnet_names_the_command_that_makes_one(tmp_path):
    r = _run_module(["scripts.bench_megacontext", "ingest", "--model-tag", "cpu_tiny", "--gistnet", str(tmp_path / "mc.pt")])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "python -m nanochat.train --config configs/gistnet_cpu_tiny.yaml" in r.stderr


@pytest.mark.parametrize("module, argv", [
    ("scripts.bench_megacontext", ["delta-nll", "--model-tga", "x"]),
    ("scripts.bench_decode", ["--contxts=8"]),
    ("scripts.bench_train", ["--stesp", "3"]),
])
def test_bench_flag_typos_are_rejected_before_torch_is_imported(module, argv):
    out, err = exit_before_torch(module, argv)
    assert out == "exit 2 False", out + err
    assert "unrecognized arguments" in err or "required" in err


def test_bench_debug_env_shows_the_traceback(tmp_path):
    r = _run_module(["scripts.bench_decode", "--repeats=0"], env={"NANOCHAT_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "--repeats must be at least 1" in r.stderr


def _git_state():
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
    return status, (REPO / "docs" / "benchmarks.md").read_bytes()


def test_readme_benchmark_example_leaves_the_checkout_clean():
    """The README's printing example of bench_decode (shrunk by flags added after it: later flags
    win) runs, prints its table, and changes no tracked file; --record is what writes."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- benchmark examples -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its '<!-- benchmark examples -->' block"
    examples = [line.split("#")[0].split() for line in block.group(1).splitlines()
                if line.startswith("python -m scripts.bench_decode") and "--record" not in line]
    assert examples
    before = _git_state()
    tiny = ["--depth=1", "--aspect-ratio=32", "--head-dim=32", "--vocab-size=64", "--contexts=8",
            "--cached-tokens=3", "--naive-tokens=2", "--repeats=1"]
    r = _run_module(examples[0][2:] + tiny)
    assert r.returncode == 0, r.stderr
    assert "| context |" not in r.stdout and "cached" in r.stdout and "appended to" not in r.stdout
    assert _git_state() == before


def test_longrange_copyable_shares_tell_near_from_far_only_copies():
    import numpy as np
    import scripts.bench_longrange as bl
    # a document of fresh tokens except: the judged span at 100..103 copies 10..13 (far only, once the
    # near window is 16 long) and 104..107 copies 90..93 (inside the near window)
    doc = np.arange(1000, 1120, dtype=np.int64)
    doc[100:104] = doc[10:14]
    doc[104:108] = doc[90:94]
    judged = bl.token_classes([doc], vocab=2000, budget=16, history=96, n=2, horizon=8, deepest=100, stride=1000)
    counts = bl.copyable_shares(judged, ["code"])
    tot, near, far = counts["code"]
    assert tot == 8
    # with a 2-token context, the first two tokens of each copied run have no matching context yet
    assert far == pytest.approx(2 / 8) and near == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="does not fit an int64"):
        bl.packed_grams(doc, 5, 2 ** 16)


def test_longrange_model_gaps_are_recency_minus_full_nll_after_bos_and_the_context():
    import types
    import numpy as np
    import torch.nn.functional as F
    import scripts.bench_longrange as bl
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L"))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    tokenizer = types.SimpleNamespace(get_bos_token_id=lambda: 0)
    doc = np.arange(200) % 47 + 1
    judged = [(0, 100, ["far"] * 5), (0, 150, ["none"] * 4 + ["near"])]  # classes as token_classes gives them

    def nll(t, context):  # the horizon's loss after BOS + the last `context` tokens, by hand
        row = torch.tensor(np.concatenate([[0], doc[t - context:t + 5]]))[None]
        with torch.no_grad():
            return F.cross_entropy(model(row[:, :-1])[0].float(), row[0, 1:], reduction="none")[-5:].numpy()

    gaps = bl.model_gaps(model, tokenizer, [doc], ["code"], judged, budget=8, history=40, batch_rows=1)
    far, none = nll(100, 8) - nll(100, 40), nll(150, 8) - nll(150, 40)
    assert gaps["code"]["far"] == (5, pytest.approx(float(far.mean()), abs=1e-4))
    assert gaps["code"]["none"] == (4, pytest.approx(float(none[:4].mean()), abs=1e-4))
    assert gaps["code"]["near"] == (1, pytest.approx(float(none[4]), abs=1e-4))
