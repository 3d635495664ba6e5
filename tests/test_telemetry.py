"""megacontext/telemetry.py: JSONL records under the artifact root, torn tails dropped."""
import json

from megacontext.telemetry import Telemetry, read_jsonl


def test_records_round_trip_under_artifact_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path))
    monkeypatch.delenv("MEGACONTEXT_ENABLE_WANDB", raising=False)
    t = Telemetry("run1", config={"lr": 0.1})
    t.log({"loss": 1.5}, step=3)
    t.close()
    assert t.path == str(tmp_path / "run_logs" / "run1.jsonl")
    records = read_jsonl(t.path)
    assert [r.get("event") for r in records] == ["start", None, "end"]
    assert records[0]["config"] == {"lr": 0.1} and records[1]["loss"] == 1.5 and records[1]["step"] == 3


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n" + '{"b": 2')
    assert read_jsonl(path) == [{"a": 1}]


def test_disabled_logger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_ARTIFACT_ROOT", str(tmp_path))
    t = Telemetry("run2", enabled=False)
    t.log({"loss": 1.0})
    t.close()
    assert not (tmp_path / "run_logs").exists()
