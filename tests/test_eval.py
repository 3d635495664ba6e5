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


def test_oracle_candidates_reach_into_a_lod2_span_in_one_round(setup):
    from megacontext.working_context import WorkingContext
    model, tok, g, _, _ = setup
    harness = mceval.Harness(model, tok, dict(SMALL, budget_tokens=128), g)
    wc = WorkingContext.from_entries([(2, 0), (1, 32), (0, 33), (0, 34)], 1100, 128)
    cands = harness._candidates(wc)
    deep = [c for c in cands if any(e.level == 0 and e.end <= 1024 for e in c.entries)]
    assert len(deep) == 32  # one per LOD1 child of the expanded LOD2 gist, each with that child at LOD0
    assert all(c.cost <= 128 for c in cands) and len(cands) == 2 + 32  # + the LOD2 and LOD1 expansions


def test_positions_by_source_lets_the_sources_take_turns():
    corpus = TokenCorpus(["code", "play1", "play2"], [np.ones(3000, dtype=np.int64), np.ones(20000, dtype=np.int64),
                                                     np.ones(20000, dtype=np.int64)], ["stdlib", "shakespeare", "shakespeare"])
    cfg = dict(SMALL, positions=40, stride=64)

    def per_source(by):
        chosen = mceval.natural_positions(corpus, dict(cfg, positions_by=by), random.Random(0))
        assert len(chosen) == 40 and len(set(chosen)) == 40 and chosen == sorted(chosen)
        return sum(d == 0 for d, _ in chosen), sum(d > 0 for d, _ in chosen)

    code, plays = per_source("length")
    assert code < 8 and plays > 32  # the code has ~7% of the candidates
    assert per_source("source") == (20, 20)


def test_the_natural_gap_is_split_by_source_and_matches_the_testbed_figure(report):
    gap = report["testbed_natural_gap"]
    assert gap["value"] == pytest.approx(report["testbed"]["nll_gap_natural"], abs=1e-5)  # float32 NLLs
    assert gap["n"] == 3 and set(gap["by_source"]) == {"x"}
    assert gap["by_source"]["x"]["value"] == pytest.approx(gap["value"], abs=1e-9)
    assert gap["ci95"][0] <= gap["value"] <= gap["ci95"][1]


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
    assert mceval.main(["--out", str(tmp_path), "--positions_by=plays"]) == 2
    assert "positions_by must be 'length' or 'source', got 'plays'" in capsys.readouterr().err
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


# -----------------------------------------------------------------------------
# MegaPrediction heads: the prediction-quality and gist-first sections


def mp_heads(seed=0):
    from megacontext.megaprediction import MegaPrediction, MegaPredictionConfig
    return MegaPrediction(MegaPredictionConfig(n_embd=64)).init_weights(seed=seed).eval()


def test_without_heads_there_is_no_megaprediction_or_gist_first_section(report):
    assert "megaprediction" not in report and "gist_first" not in report
    assert "MegaPrediction" not in mceval.report_markdown(report)


def test_with_heads_the_sections_report_heads_vs_baseline_and_gist_vs_token_first(setup, tmp_path):
    model, tok, g, _, token_bytes = setup
    rng = np.random.default_rng(5)
    corpus = TokenCorpus(["long", "mid"], [rng.integers(1, 480, size=n) for n in (3200, 1300)], ["x"] * 2)
    cfg = dict(SMALL, methods=["recency", "gist_uniform"], ratios=[2, 4], positions=12, gist_first=True, lod_mix=[1, 2],
               delta_positions=0)
    info = {"path": "mc_000001.pt", "gistnet_identity": g.identity(), "context_tokens": 224}
    r = mceval.evaluate(model, tok, cfg, g, token_bytes=token_bytes, progress=False, corpus=corpus,
                        heads=mp_heads(), heads_info=info)
    mp = r["megaprediction"]
    assert mp["context_tokens"] == 224 and mp["positions"] == r["natural_positions"] == 12
    for lv in ("lod1", "lod2"):  # the 3200-token document has block ends with 1024 tokens before and after
        assert mp[lv]["head"]["n"] >= 2
        for block in (mp[lv], mp[lv]["centered"]):
            for key in ("head", "copy_last", "gain"):
                assert block[key]["ci95"][0] <= block[key]["value"] <= block[key]["ci95"][1] and -1 <= block[key]["value"] <= 1
            assert block["gain"]["value"] == pytest.approx(block["head"]["value"] - block["copy_last"]["value"], abs=1e-6)
    assert mp["lod1"]["block_ends"] == 12 * 224 // 32 and 0 < mp["lod2"]["block_ends"] < mp["lod1"]["block_ends"]
    gf = r["gist_first"]
    assert gf["lod_mix"] == [1, 2] and gf["placement"] == ["LOD2", "LOD1"] and gf["plan_slots_in_budget"] is False
    assert set(gf["by_history"]) == {"128", "256"}
    harness = mceval.Harness(model, tok, cfg, g)
    for hist, e in gf["by_history"].items():
        # the token-first figure is gist_uniform's own NLL on the same positions (same WCs, same rows)
        n = int(hist)
        positions = mceval.natural_positions(corpus.longer_than(4 * 64 + 8), cfg, random.Random(cfg["seed"]))
        histories = [corpus.longer_than(4 * 64 + 8).arrays[d][t - n:t].astype(np.int64) for d, t in positions]
        horizons = [corpus.longer_than(4 * 64 + 8).arrays[d][t:t + 8].astype(np.int64) for d, t in positions]
        uniform = harness.run("gist_uniform", histories, horizons)
        assert e["token_first_nll"] == pytest.approx(float(np.mean([float(x.mean()) for x in uniform["nll"]])), abs=1e-12)
        assert e["difference"]["n"] == 12 and e["gist_first_nll"] != e["token_first_nll"]
        assert e["difference"]["value"] == pytest.approx(e["gist_first_nll"] - e["token_first_nll"], abs=1e-9)
        assert "plan_cosine_lod1" not in e, "an 8-token horizon has no whole block to compare a plan with"
    mceval.write_report(r, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "## MegaPrediction" in md and "## Gist-first decoding" in md and "LOD2 + LOD1" in md
    assert "MegaPrediction cosine LOD1" in mceval.headline(r)


def test_gist_first_without_plan_slots_is_the_token_first_nll_exactly(setup):
    import torch
    from megacontext.megaprediction import Planner
    model, tok, g, _, _ = setup
    harness = mceval.Harness(model, tok, dict(SMALL, budget_tokens=64), g)
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, 480, size=n) for n in (96, 200, 256)]
    horizons = [rng.integers(1, 480, size=40) for _ in histories]  # two blocks: the second plan reads the first
    wcs, stores, _ = harness.views("gist_uniform", histories)
    reference, _ = mceval.score_wcs(model, wcs, stores, horizons, 2, harness.bos)
    tf, gf, plans = mceval.score_gist_first(model, wcs, stores, horizons, None, 2, harness.bos)
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(reference, tf, gf)) and plans == [None] * 3
    planner = Planner(mp_heads(), [1])
    tf, gf, plans = mceval.score_gist_first(model, wcs, stores, horizons, planner, 2, harness.bos)
    assert all(np.array_equal(a, b) for a, b in zip(reference, tf)), "the first pass is the token-first row"
    assert all(len(x) == 40 for x in gf) and any(not np.array_equal(a, b) for a, b in zip(tf, gf))
    assert plans[0].shape == (2, 1, 64)
    # the row itself: strip the plan slots and the token-first row is back, slot for slot
    context = (torch.tensor([7, 8, 0]), torch.tensor([False, False, True]), torch.randn(3, 64))
    horizon = torch.tensor(rng.integers(1, 480, size=40))
    plain = mceval.gist_first_row(context, horizon)
    planned = mceval.gist_first_row(context, horizon, [torch.randn(2, 64), torch.randn(2, 64)])
    assert len(planned["idx"]) == len(plain["idx"]) + 4 == 3 + 39 + 4
    assert planned["gist_mask"][3:5].all() and planned["gist_mask"][5 + 32:5 + 34].all()
    keep = torch.ones(len(planned["idx"]), dtype=torch.bool)
    keep[[3, 4, 37, 38]] = False
    for key in ("idx", "gist_mask", "gist_vectors"):
        assert torch.equal(planned[key][keep], plain[key]), key
    assert plain["before"] == [2, 34] and planned["before"] == [2, 36]  # block 2's plans come after block 1's tokens
    # the same targets in the same order; a block's first token is predicted from its last plan slot
    assert torch.equal(planned["targets"][planned["targets"] >= 0], horizon)
    assert torch.equal(plain["targets"][plain["targets"] >= 0], horizon)
    assert plain["targets"][2] == horizon[0] and planned["targets"][4] == horizon[0]
    assert plain["targets"][34] == horizon[32] and planned["targets"][38] == horizon[32]
    moved = torch.zeros_like(keep)
    moved[[2, 4, 36, 38]] = True
    assert torch.equal(planned["targets"][keep & ~moved[:len(keep)]], plain["targets"][~torch.isin(
        torch.arange(len(plain["idx"])), torch.tensor([2, 34]))])


def test_megaprediction_settings_that_cannot_work_are_one_line(setup, tmp_path):
    model, tok, g, corpus, token_bytes = setup
    with pytest.raises(ValueError, match="gist_first needs MegaPrediction heads"):
        run(setup, dict(SMALL, gist_first=True))
    with pytest.raises(ValueError, match="gistnet is not"):
        mceval.evaluate(model, tok, dict(SMALL), None, token_bytes=token_bytes, progress=False, corpus=corpus,
                        heads=mp_heads())
    with pytest.raises(ValueError, match="trained on gists of gistnet-other"):
        mceval.evaluate(model, tok, dict(SMALL), g, token_bytes=token_bytes, progress=False, corpus=corpus,
                        heads=mp_heads(), heads_info={"gistnet_identity": "gistnet-other"})
    assert mceval.main(["--out", str(tmp_path), "--gist_first=true"]) == 2
    assert mceval.main(["--out", str(tmp_path), "--megaprediction=x", "--lod_mix=[3]"]) == 2


def test_centered_cosines_ignore_a_direction_every_gist_shares(setup):
    """A GistNet whose gists all carry one large shared vector makes the raw copy-last cosine ~1;
    the centered one is unchanged by it."""
    import torch
    model, tok, g, _, _ = setup

    class Shifted(torch.nn.Module):
        def __init__(self, inner, shift):
            super().__init__()
            self.inner, self.config, self.shift = inner, inner.config, shift

        def forward(self, x, level):
            return self.inner(x, level) + self.shift

    rng = np.random.default_rng(6)
    corpus = TokenCorpus(["d"], [rng.integers(1, 480, size=1400)], ["x"])
    positions = [(0, 512), (0, 768), (0, 1024)]
    plain = mceval.prediction_quality(model, g, mp_heads(), corpus, positions, 256, tok.get_bos_token_id())
    shifted = mceval.prediction_quality(model, Shifted(g, 30.0 * torch.ones(64)), mp_heads(), corpus, positions, 256,
                                        tok.get_bos_token_id())
    assert "lod2" not in plain, "no block end here has 1024 tokens after it"
    assert shifted["lod1"]["copy_last"]["value"] > 0.999 > plain["lod1"]["copy_last"]["value"]
    assert shifted["lod1"]["centered"]["copy_last"]["value"] == pytest.approx(plain["lod1"]["centered"]["copy_last"]["value"],
                                                                              abs=1e-4)
