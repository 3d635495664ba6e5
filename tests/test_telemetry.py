"""megacontext/telemetry.py: the focus metrics on hand-made WCs, JSONL records under the
artifact root named <run>-<timestamp>.jsonl, torn tails dropped, the summary at close and
the warnings when a run leaves the seed's targets."""
import json
import math
import os
import re

import pytest

from megacontext.telemetry import (TargetWarning, Telemetry, budget_utilization, lod_histogram, read_jsonl,
                                   residency, swap_rate, target_warnings)
from megacontext.working_context import WorkingContext

B = 32


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path))
    monkeypatch.delenv("MEGACONTEXT_ENABLE_WANDB", raising=False)
    return tmp_path


def wc_of(entries, history_len, budget=None):
    return WorkingContext.from_entries(entries, history_len, budget)

# -----------------------------------------------------------------------------
# metric functions


def test_lod_histogram_and_budget_utilization_count_entries_and_costs():
    # 1024 + 3 blocks + 5 tokens: a LOD2 gist, a LOD1 gist, two LOD0 blocks, the partial block
    N = 1024 + 3 * B + 5
    wc = wc_of([(2, 0), (1, 32), (0, 33), (0, 34), (0, 35)], N, budget=100)
    assert lod_histogram(wc) == [3, 1, 1]
    assert wc.cost == 1 + 1 + 32 + 32 + 5
    assert budget_utilization(wc) == pytest.approx(71 / 100)
    assert budget_utilization(wc, budget=142) == pytest.approx(0.5)
    assert math.isnan(budget_utilization(wc_of([(0, 0)], 10)))  # no budget
    # plain entry tuples (level, index, start, end) work too
    assert lod_histogram([(1, 0, 0, 32), (0, 1, 32, 40)]) == [1, 1, 0]
    assert budget_utilization([(1, 0, 0, 32), (0, 1, 32, 40)], budget=18) == pytest.approx(0.5)


def test_swap_rate_is_actions_over_entries():
    assert swap_rate(3, 30) == pytest.approx(0.1)
    assert swap_rate(0, 7) == 0.0
    assert math.isnan(swap_rate(0, 0))
    with pytest.raises(ValueError, match="n_actions"):
        swap_rate(-1, 4)


def test_residency_is_the_share_of_previous_entries_still_present():
    N = 5 * B + 10  # blocks 0..4 whole, block 5 partial; blocks 4 and 5 are the LOD0 tail
    prev = wc_of([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N)
    same = wc_of([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N)
    assert residency(prev, same) == 1.0
    expanded = wc_of([(0, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N)  # gist 0 became block 0
    assert residency(prev, expanded) == pytest.approx(5 / 6)
    collapsed = wc_of([(1, 0), (1, 1), (1, 2), (1, 3), (0, 4), (0, 5)], N)  # blocks 2 and 3 gisted
    assert residency(prev, collapsed) == pytest.approx(4 / 6)
    # the partial last block growing by a few tokens is the same entry (same node)
    grown = wc_of([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N + 7)
    assert residency(prev, grown) == 1.0
    assert math.isnan(residency([], same))


def test_target_warnings_name_each_target_left():
    inside = {"delta_nll": 0.05, "swap_rate": 0.1, "residency": 0.95}
    assert target_warnings(inside) == []
    lines = target_warnings({"delta_nll": 0.2, "swap_rate": 0.3, "residency": 0.5})
    assert len(lines) == 3
    assert "ΔNLL@H 0.200" in lines[0] and "0.10" in lines[0]
    assert "swap rate 0.300" in lines[1] and "0.05-0.20" in lines[1]
    assert "residency 50.0%" in lines[2] and "90%" in lines[2]
    assert len(target_warnings({"swap_rate": 0.01})) == 1  # below the range warns too
    assert target_warnings({"delta_nll": None, "swap_rate": float("nan")}) == []  # missing: no claim

# -----------------------------------------------------------------------------
# the JSONL file


def test_records_round_trip_under_artifact_root(artifacts):
    t = Telemetry("run1", config={"lr": 0.1})
    t.log({"loss": 1.5}, step=3)
    t.close()
    assert os.path.dirname(t.path) == str(artifacts / "run_logs")
    assert re.fullmatch(r"run1-\d{8}-\d{6}\.jsonl", os.path.basename(t.path)), t.path
    records = read_jsonl(t.path)
    assert [r.get("event") for r in records] == ["start", None, "summary", "end"]
    assert records[0]["config"] == {"lr": 0.1} and records[1]["loss"] == 1.5 and records[1]["step"] == 3


def test_non_finite_values_are_written_as_null_so_the_file_stays_strict_json(artifacts):
    t = Telemetry("nan_run")
    t.log({"recovered": float("nan"), "ratio": float("inf"), "loss": 1.5}, step=0)
    t.close()
    line = open(t.path).read().splitlines()[1]
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {line}"))
    assert record["recovered"] is None and record["ratio"] is None and record["loss"] == 1.5


def test_two_runs_of_one_name_get_two_files(artifacts):
    a, b = Telemetry("same"), Telemetry("same")
    a.close()
    b.close()
    assert a.path != b.path and os.path.exists(a.path) and os.path.exists(b.path)


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"b": 2')
    assert read_jsonl(path) == [{"a": 1}]


def test_disabled_logger_writes_nothing_but_still_summarizes(artifacts):
    t = Telemetry("run2", enabled=False)
    t.log({"loss": 1.0})
    t.log_decode(10, 0.5)
    summary = t.close()
    assert not (artifacts / "run_logs").exists()
    assert summary["decoded_tokens"] == 10 and summary["decode_tok_per_s"] == pytest.approx(20.0)


def test_refocus_records_and_summary(artifacts):
    N = 5 * B + 10
    t = Telemetry("rt", config={"budget": 200})
    wc0 = wc_of([(1, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N, budget=200)
    wc1 = wc_of([(0, 0), (1, 1), (0, 2), (0, 3), (0, 4), (0, 5)], N, budget=200)  # one expand
    r0 = t.log_refocus(wc0, wc0, 0, 0.01, recomputed_slots=0, reusable_slots=107)
    r1 = t.log_refocus(wc0, wc1, 1, 0.03, recomputed_slots=138, reusable_slots=0)  # residency vs r0's result
    t.log_decode(64, 2.0)
    t.log_delta_nll(0.04)
    with pytest.warns(TargetWarning, match="residency"):
        summary = t.close()
    assert r0["residency"] is None and r1["residency"] == pytest.approx(5 / 6)
    assert r1["swap_rate"] == pytest.approx(1 / 6) and r1["lod_histogram"] == [5, 1, 0]
    assert r1["budget_utilization"] == pytest.approx(wc1.cost / 200)
    records = read_jsonl(t.path)
    assert [r["event"] for r in records] == ["start", "refocus", "refocus", "decode", "delta_nll", "summary", "end"]
    s = records[-2]
    assert s == {**summary, "event": "summary", "time": s["time"]}
    assert s["refocuses"] == 2 and s["actions"] == 1
    assert s["swap_rate"] == pytest.approx(1 / 12) and s["residency"] == pytest.approx(5 / 6)
    assert s["refocus_ms_mean"] == pytest.approx(20.0) and s["refocus_ms_max"] == pytest.approx(30.0)
    assert s["decode_tok_per_s"] == pytest.approx(32.0)
    assert s["refocus_share_of_decode"] == pytest.approx(0.04 / 2.0)
    assert s["recomputed_share"] == pytest.approx(138 / 245)
    assert s["lod_histogram"] == [5, 1, 0] and s["delta_nll"] == pytest.approx(0.04)
    # swap rate 0.083 is inside 0.05-0.20; residency 83 % < 90 %: warned and listed in the summary
    assert s["warnings"] == ["residency 83.3% is below the target 90%"]


def test_close_warns_when_targets_are_left(artifacts):
    t = Telemetry("bad", enabled=False)
    t.log_delta_nll(0.5)
    with pytest.warns(TargetWarning, match="ΔNLL@H 0.500"):
        t.close()


def test_fallbacks_are_recorded_and_summarized(artifacts):
    t = Telemetry("fb")
    t.log_fallback("no LensNet: recency-only working context")
    summary = t.close()
    assert summary["fallbacks"] == ["no LensNet: recency-only working context"]
    assert any(r.get("event") == "fallback" for r in read_jsonl(t.path))
