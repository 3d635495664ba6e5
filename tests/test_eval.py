"""
The long-context harness (megacontext/eval.py) on a tiny random model: every report key of
DESIGN.md section 6, plots that open, full == recency when the history fits in W, an oracle
never worse than the WC it starts from, --tasks round trips, determinism, clear errors.
"""
import json
import random

import numpy as np
import pytest
import torch

from cli_probe import exit_before_torch
from megacontext import eval as mceval
from megacontext.gistnet import GistNet, GistNetConfig
from megacontext.longdocs import TokenCorpus
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

SMALL = dict(mceval.DEFAULTS, budget_tokens=64, horizon=8, ratios=[1, 2, 4, 8], positions=3, stride=64,
             depths=[0.2, 0.8], passkey_cases=1, task_ratio=4, task_cases=1, testbed_ratio=4,
             oracle_positions=2, oracle_cases=1, oracle_tasks=1, oracle_rounds=2,
             delta_context=64, delta_horizon=8, delta_positions=3, batch_rows=8, device_type="cpu")


@pytest.fixture(scope="module")
def setup(upstream_fixtures):
    tok = RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=288, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=64, window_pattern="L"))
    model.init_weights()
    with torch.no_grad():  # nanochat zero-inits the output projections; give every weight some signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    gistnet = GistNet(GistNetConfig(n_embd=64, n_layer=1, n_head=2)).init_weights(seed=0)
    with torch.no_grad():  # move it off the mean pool so gist_uniform and meanpool differ
        for p in gistnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gistnet.eval()
    rng = np.random.default_rng(0)
    corpus = TokenCorpus([f"d{i}" for i in range(3)] + ["tiny"],
                         [rng.integers(1, 480, size=n) for n in (1400, 1200, 900, 40)], ["x"] * 4)
    token_bytes = torch.ones(tok.get_vocab_size(), dtype=torch.int32)
    return model, tok, gistnet, corpus, token_bytes


def run(setup, cfg=SMALL, gistnet=True, task_files=(), lensnet=None):
    model, tok, g, corpus, token_bytes = setup
    return mceval.evaluate(model, tok, dict(cfg), g if gistnet else None, task_files, token_bytes=token_bytes,
                           progress=False, corpus=corpus, lensnet=lensnet)


@pytest.fixture(scope="module")
def report(setup):
    return run(setup)


def strip_timing(report):
    return {k: v for k, v in report.items() if k not in ("tokens_per_s", "timings_s")}


def test_report_has_every_key_of_the_schema(report, tmp_path):
    for key in ("config", "commit", "device", "budget_tokens", "methods", "bpb", "gap_closed", "delta_nll",
                "passkey", "needle_recall", "tasks", "testbed", "tokens_per_s"):
        assert key in report, key
    assert report["methods"] == ["full", "recency", "meanpool", "gist_uniform", "oracle"]
    assert "megacontext" not in report["methods"] and "megacontext" not in report["bpb"]
    assert set(report["bpb"]) == set(report["methods"])
    assert set(report["bpb"]["recency"]) == {"64", "128", "256", "512"}
    for lod in ("lod1", "lod2", "drop"):
        block = report["delta_nll"][lod]
        assert block["n"] == 3 and block["ci95"][0] <= block["value"] <= block["ci95"][1]
    assert {"recovered_lod1", "recovered_lod2"} <= set(report["delta_nll"])
    assert set(report["passkey"]["recency"]) == {"1", "2", "4", "8"} and set(report["passkey"]["recency"]["1"]) == {"0.2", "0.8"}
    assert set(report["tasks"]) == {"passkey", "needle", "repeat", "assoc", "vartrack"}
    assert set(report["tasks"]["assoc"]["recency"]) == {"accuracy", "answer_nll", "n"}
    assert set(report["testbed"]) == {"nll_gap_synthetic", "nll_gap_natural", "passkey_full"}
    same = report["oracle_subset"]["bpb_gist_uniform_same_positions"]  # the oracle ran on 2 of 3 positions
    assert all(report["bpb"]["oracle"][h] <= v + 1e-9 for h, v in same.items())
    assert report["documents"]["skipped"]["tiny"] == 40  # shorter than 8W + H: skipped and counted
    paths = mceval.write_report(report, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text())["budget_tokens"] == 64
    assert "| method |" in (tmp_path / "report.md").read_text()
    import matplotlib.image
    pngs = [p for p in paths if p.endswith(".png")]
    assert {"bpb_vs_history.png", "passkey_oracle.png", "delta_nll.png"} <= {p.split("/")[-1] for p in pngs}
    for p in pngs:
        assert matplotlib.image.imread(p).ndim == 3


def test_full_equals_recency_when_the_history_fits_in_the_budget(report):
    assert report["bpb"]["full"]["64"] == report["bpb"]["recency"]["64"]
    assert report["passkey"]["full"]["1"] == report["passkey"]["recency"]["1"]
    assert report["bpb"]["full"]["128"] != report["bpb"]["recency"]["128"]
    assert "512" not in report["bpb"]["full"]  # never beyond the model's sequence_len (288)


def test_oracle_is_never_worse_than_the_wc_it_starts_from(setup):
    model, tok, g, corpus, _ = setup
    harness = mceval.Harness(model, tok, dict(SMALL, budget_tokens=128), g)  # room to trade a LOD0 block
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, 480, size=n) for n in (128, 256, 256)]
    horizons = [rng.integers(1, 480, size=8) for _ in histories]
    uniform = harness.run("gist_uniform", histories, horizons)
    oracle = harness.run("oracle", histories, horizons)
    for i in range(len(histories)):
        assert oracle["nll"][i].mean() <= uniform["nll"][i].mean() + 1e-6
        assert oracle["wcs"][i].cost <= 128
    assert any(o != u for o, u in zip(oracle["wcs"], uniform["wcs"])), "the oracle never moved"


def test_same_seed_same_report(setup, report):
    again = run(setup)
    assert json.dumps(strip_timing(again), sort_keys=True) == json.dumps(strip_timing(report), sort_keys=True)


def test_without_a_gistnet_gist_methods_are_absent(setup):
    r = run(setup, gistnet=False)
    assert r["methods"] == ["full", "recency", "meanpool"]
    assert set(r["absent_methods"]) == {"gist_uniform", "oracle", "megacontext"} and "gist_uniform" not in r["bpb"]
    assert r["delta_nll"]["gister"] == "meanpool"


def test_tasks_file_round_trip(setup, tmp_path):
    path = tmp_path / "my_tests.jsonl"
    lines = [{"context": "The code word is plum. " + "filler text " * 30, "question": " The code word is",
              "answer": " plum", "id": "a", "depth": 0.0},
             {"context": "short", "question": " Q?", "answer": " yes"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = dict(SMALL, ratios=[4])
    r = run(setup, cfg, task_files=[str(path)])
    assert set(r["tasks"]["my_tests"]) == set(r["methods"])
    assert r["tasks"]["my_tests"]["recency"]["n"] == 2
    assert 0.0 <= r["tasks"]["my_tests"]["full"]["accuracy"] <= 1.0


@pytest.mark.parametrize("line, message", [
    ("{not json", "my.jsonl:2: not valid JSON"),
    ('{"context": "a", "answer": "b"}', "my.jsonl:2: missing or non-text field(s) question"),
    ('[1, 2]', "my.jsonl:2: expected a JSON object"),
])
def test_malformed_tasks_line_names_file_and_line(setup, tmp_path, line, message):
    path = tmp_path / "my.jsonl"
    path.write_text('{"context": "a", "question": "b", "answer": "c"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mceval.read_task_file(str(path), setup[1])


def test_budget_that_does_not_fit_names_the_keys(setup):
    with pytest.raises(ValueError, match="budget_tokens \\+ horizon"):
        run(setup, dict(SMALL, budget_tokens=288))
    with pytest.raises(ValueError, match="delta_context \\+ delta_horizon"):
        run(setup, dict(SMALL, delta_context=320))
    with pytest.raises(ValueError, match="multiple of 32"):
        run(setup, dict(SMALL, budget_tokens=80))


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert mceval.main(["--out", str(tmp_path), "--budget_tokenz=3"]) == 2
    assert "unknown eval config key 'budget_tokenz'" in capsys.readouterr().err
    assert mceval.main(["--budget_tokens=128"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert mceval.main(["--out", str(tmp_path), "--positions=abc"]) == 2
    assert "config key 'positions' expects int, got 'abc'" in capsys.readouterr().err
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert mceval.main(["--out", str(tmp_path / "o"), "--model_tag=nope"]) == 1
    err = capsys.readouterr().err
    assert "python -m nanochat.train --config configs/longctx_cpu.yaml" in err and "Traceback" not in err


def test_a_flag_typo_is_rejected_before_torch_is_imported():
    out, err = exit_before_torch("megacontext.eval", ["--out", "/tmp/unused", "--budget_tokenz=3"])
    assert out == "exit 2 False", out + err


class ZeroScorer:
    """A focus that never asks for anything: the allocator then only keeps the budget."""
    gistnet_identity = None

    def score_wc(self, wc, *args, **kwargs):
        return np.zeros(len(wc), dtype=np.float32)


def test_megacontext_with_a_silent_scorer_is_gist_uniform(setup):
    # streaming in with no refocus actions must land on the recency layout gist_uniform reads
    # (extend collapses oldest-first, which is what WorkingContext.recency builds)
    cfg = dict(SMALL, methods=["gist_uniform", "megacontext"], refocus_every=32)
    r = run(setup, cfg, lensnet=ZeroScorer())
    assert r["methods"] == ["gist_uniform", "megacontext"] and "megacontext" not in r["absent_methods"]
    assert r["bpb"]["megacontext"] == r["bpb"]["gist_uniform"]
    assert r["needle_recall"]["megacontext"] == r["needle_recall"]["gist_uniform"]
    assert r["swap_rate"]["megacontext"] == 0.0
    assert r["focus"]["refocuses"] > 0 and r["focus"]["invalid_scores"] == 0


def test_megacontext_with_a_lensnet_reports_focus_figures(setup, tmp_path):
    from megacontext.lensnet import LensNet, LensNetConfig
    model, tok, g, corpus, token_bytes = setup
    lensnet = LensNet(LensNetConfig(n_embd=64, d_model=32, n_layer=1, n_head=2)).init_weights(seed=0)
    with torch.no_grad():  # the head starts at zero (no opinion); give it large random scores so the allocator acts
        lensnet.head.weight.normal_(0.0, 5.0)
    cfg = dict(SMALL, methods=["recency", "gist_uniform", "megacontext"], allocator={"tau_expand": 0.0})
    r = run(setup, cfg, lensnet=lensnet.eval())
    assert set(r["bpb"]["megacontext"]) == set(r["bpb"]["recency"])
    for key in ("swap_rate", "residency", "budget_utilization"):
        assert 0.0 <= r[key]["megacontext"] <= 1.0, key
    assert r["swap_rate"]["megacontext"] > 0, "the allocator never acted on large scores"
    comp = r["lod_composition"]["megacontext"]["512"]
    assert sum(comp.values()) <= 64 + 1e-9  # mean WC cost within W
    paths = mceval.write_report(r, str(tmp_path))
    assert "lod_composition_megacontext.png" in {p.split("/")[-1] for p in paths}
    assert "## Focus" in (tmp_path / "report.md").read_text()
    again = run(setup, cfg, lensnet=lensnet)
    assert json.dumps(strip_timing(again), sort_keys=True) == json.dumps(strip_timing(r), sort_keys=True)
