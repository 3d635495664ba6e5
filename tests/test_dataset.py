"""Specification of nanochat/dataset.py: listing shards, the train/val split, row-group
iteration, and the shard downloader (run against a local HTTP server, never the internet)."""
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
import requests

from nanochat import dataset

SHARDS = ["shard_00000.parquet", "shard_00001.parquet"]


def read_row_groups(path):
    pf = pq.ParquetFile(path)
    return [pf.read_row_group(i).column("text").to_pylist() for i in range(pf.num_row_groups)]

# -----------------------------------------------------------------------------
# Listing and reading


def test_list_parquet_files_follows_base_dir_set_after_import(fixture_base_dir):
    # the module was imported (at collection) before the fixture set NANOCHAT_BASE_DIR
    data_dir = fixture_base_dir / "base_data_climbmix"
    (data_dir / "shard_00002.parquet.tmp").write_bytes(b"half a download")
    (data_dir / "notes.txt").write_text("not a shard")
    assert dataset.list_parquet_files() == [str(data_dir / n) for n in SHARDS]


def test_list_parquet_files_explicit_dir_and_assigned_data_dir(fixture_base_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    for name in ["shard_00007.parquet", "shard_00003.parquet"]:
        (other / name).write_bytes(b"")
    expected = [str(other / "shard_00003.parquet"), str(other / "shard_00007.parquet")]
    assert dataset.list_parquet_files(data_dir=str(other)) == expected
    monkeypatch.setattr(dataset, "DATA_DIR", str(other))
    assert dataset.list_parquet_files() == expected


def test_legacy_fallback_and_warning(fixture_base_dir, capsys):
    (fixture_base_dir / "base_data_climbmix").rename(fixture_base_dir / "base_data")
    legacy = [str(fixture_base_dir / "base_data" / n) for n in SHARDS]
    assert dataset.list_parquet_files() == legacy
    assert capsys.readouterr().out == ""
    assert dataset.list_parquet_files(warn_on_legacy=True) == legacy
    out = capsys.readouterr().out
    assert "ClimbMix" in out and "python -m nanochat.dataset" in out


def test_missing_data_dir_is_a_clear_error(fixture_base_dir):
    missing = fixture_base_dir / "base_data_climbmix"
    for p in missing.iterdir():
        p.unlink()
    missing.rmdir()
    with pytest.raises(FileNotFoundError, match=r"No pretraining data directory.*python -m nanochat\.dataset -n 8"):
        dataset.list_parquet_files()
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat\.dataset -n 8"):
        next(dataset.parquets_iter_batched("train"))


def test_empty_data_dir_is_a_clear_error(fixture_base_dir):
    for p in (fixture_base_dir / "base_data_climbmix").iterdir():
        p.unlink()
    assert dataset.list_parquet_files() == []
    for split in ("train", "val"):
        with pytest.raises(FileNotFoundError, match=r"No pretraining shards.*python -m nanochat\.dataset -n 8"):
            next(dataset.parquets_iter_batched(split))


def test_single_shard_has_val_but_no_train(fixture_base_dir):
    (fixture_base_dir / "base_data_climbmix" / SHARDS[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"reserved for validation.*python -m nanochat\.dataset"):
        next(dataset.parquets_iter_batched("train"))
    assert len(list(dataset.parquets_iter_batched("val"))) == 3


def test_parquets_iter_batched_splits(fixture_base_dir):
    data_dir = fixture_base_dir / "base_data_climbmix"
    train_rgs = read_row_groups(data_dir / SHARDS[0])
    val_rgs = read_row_groups(data_dir / SHARDS[1])
    assert [len(rg) for rg in train_rgs] == [30, 30, 30, 30]
    assert [len(rg) for rg in val_rgs] == [20, 20, 20]
    assert list(dataset.parquets_iter_batched("train")) == train_rgs
    assert list(dataset.parquets_iter_batched("val")) == val_rgs
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        next(dataset.parquets_iter_batched("test"))


def test_parquets_iter_batched_start_step(fixture_base_dir):
    train_rgs = read_row_groups(fixture_base_dir / "base_data_climbmix" / SHARDS[0])
    # two DDP ranks: disjoint, and together they cover the split
    rank0 = list(dataset.parquets_iter_batched("train", start=0, step=2))
    rank1 = list(dataset.parquets_iter_batched("train", start=1, step=2))
    assert rank0 == [train_rgs[0], train_rgs[2]]
    assert rank1 == [train_rgs[1], train_rgs[3]]
    assert list(dataset.parquets_iter_batched("train", start=3, step=5)) == [train_rgs[3]]
    assert list(dataset.parquets_iter_batched("train", start=4)) == []

# -----------------------------------------------------------------------------
# Downloading, against a local HTTP server


class ShardServer:
    """Serves {filename: bytes} on 127.0.0.1. Per file one can queue failure modes
    ('500' or 'truncate') that are used up by the next requests, one per request."""

    def __init__(self, files):
        self.files = dict(files)
        self.failures = {}
        self.hits = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.hits[name] = server.hits.get(name, 0) + 1
                if name not in server.files:
                    self.send_error(404)
                    return
                mode = server.failures.get(name, [])
                mode = mode.pop(0) if mode else "ok"
                if mode == "500":
                    self.send_error(500)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # 'truncate' promises the whole file, sends half, and hangs up
                self.wfile.write(body if mode == "ok" else body[:len(body) // 2])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_server(upstream_fixtures, tmp_path, monkeypatch):
    files = {n: (upstream_fixtures / "base_data_climbmix" / n).read_bytes() for n in SHARDS}
    files["shard_00005.parquet"] = b"<html>rate limited</html>"
    server = ShardServer(files)
    data_dir = tmp_path / "downloads"
    monkeypatch.setattr(dataset, "BASE_URL", server.url)
    monkeypatch.setattr(dataset, "DATA_DIR", str(data_dir))
    monkeypatch.setattr(dataset, "DOWNLOAD_BACKOFF_S", 0)  # 0 ** attempt: retry at once
    yield server, data_dir
    server.close()


def test_download_single_file_success_and_skip(shard_server, capsys):
    server, data_dir = shard_server
    assert dataset.download_single_file(0) is True
    assert (data_dir / SHARDS[0]).read_bytes() == server.files[SHARDS[0]]
    assert sorted(os.listdir(data_dir)) == [SHARDS[0]]  # no temp files left behind
    assert "Successfully downloaded shard_00000.parquet" in capsys.readouterr().out
    # a shard that is already there is not fetched again
    assert dataset.download_single_file(0) is True
    assert server.hits[SHARDS[0]] == 1
    assert "already exists" in capsys.readouterr().out


def test_download_retries_after_failures(shard_server, capsys):
    server, data_dir = shard_server
    server.failures[SHARDS[1]] = ["500", "truncate"]
    assert dataset.download_single_file(1) is True
    assert server.hits[SHARDS[1]] == 3
    assert (data_dir / SHARDS[1]).read_bytes() == server.files[SHARDS[1]]
    assert sorted(os.listdir(data_dir)) == [SHARDS[1]]
    out = capsys.readouterr().out
    assert "Attempt 1/5 failed" in out and "Attempt 2/5 failed" in out


def test_failed_download_leaves_no_partial_shard(shard_server, monkeypatch):
    server, data_dir = shard_server
    monkeypatch.setattr(dataset, "DOWNLOAD_ATTEMPTS", 3)
    server.failures[SHARDS[0]] = ["truncate"] * 3
    assert dataset.download_single_file(0) is False
    assert server.hits[SHARDS[0]] == 3
    assert os.listdir(data_dir) == []
    # an error page served with status 200 is not a shard either
    assert dataset.download_single_file(5) is False
    assert os.listdir(data_dir) == []
    # a missing file (404) fails cleanly too
    assert dataset.download_single_file(9) is False
    assert os.listdir(data_dir) == []


def test_crash_mid_download_never_leaves_a_half_shard(shard_server, monkeypatch):
    server, data_dir = shard_server
    real_iter_content = requests.Response.iter_content

    def dies_halfway(self, chunk_size=1, decode_unicode=False):
        for chunk in real_iter_content(self, chunk_size, decode_unicode):
            yield chunk[:len(chunk) // 2]
            raise KeyboardInterrupt  # like a Ctrl-C (not caught, no clean-up runs)

    monkeypatch.setattr(requests.Response, "iter_content", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        dataset.download_single_file(0)
    leftovers = os.listdir(data_dir)
    # the bytes went to a temp file, which the dataset never lists
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert not (data_dir / SHARDS[0]).exists()
    assert dataset.list_parquet_files() == []
    # the next run downloads the shard properly
    monkeypatch.setattr(requests.Response, "iter_content", real_iter_content)
    assert dataset.download_single_file(0) is True
    assert (data_dir / SHARDS[0]).read_bytes() == server.files[SHARDS[0]]


def test_cli_downloads_train_shards_plus_val_shard(shard_server, monkeypatch, capsys):
    server, data_dir = shard_server
    monkeypatch.setattr(dataset, "MAX_SHARD", 1)  # so that the val shard is shard_00001
    assert dataset.main(["-n", "1", "-w", "2"]) == 0
    assert sorted(os.listdir(data_dir)) == SHARDS
    for name in SHARDS:
        assert (data_dir / name).read_bytes() == server.files[name]
    captured = capsys.readouterr()
    assert "Done! Downloaded: 2/2 shards" in captured.out
    assert "2/2" in captured.err  # the progress bar
    # the downloaded shards are immediately usable
    assert list(dataset.parquets_iter_batched("val")) == read_row_groups(data_dir / SHARDS[1])


def test_cli_reports_failures_and_rejects_bad_flags(shard_server, monkeypatch, capsys):
    server, data_dir = shard_server
    monkeypatch.setattr(dataset, "DOWNLOAD_ATTEMPTS", 1)
    monkeypatch.setattr(dataset, "MAX_SHARD", 9)  # val shard 9 is not on the server
    assert dataset.main(["-n", "1", "-w", "1"]) == 1
    assert "Done! Downloaded: 1/2 shards" in capsys.readouterr().out
    for bad in (["-n", "-2"], ["-w", "0"]):
        with pytest.raises(SystemExit) as exc:
            dataset.main(bad)
        assert exc.value.code == 2
    assert "--num-workers must be >= 1" in capsys.readouterr().err
