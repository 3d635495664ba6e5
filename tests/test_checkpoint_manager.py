"""
Specification of nanochat/checkpoint_manager.py.

The reference is the checkpoint that upstream's own save_checkpoint wrote into the shared
fixtures (base_checkpoints/d2, step 40): loading it must give tensors bit-identical to the
file, and the guessing loaders must find it. Beyond upstream, saves are crash-safe (a
failed write never leaves a model_*.pt behind) and every kind of bad input fails with a
one-line error that names the path and the fix.
"""
import json
import os
import re

import pytest
import torch

import nanochat.checkpoint_manager as cm
from nanochat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint,
                                         load_model, load_model_from_dir, load_optimizer_state, save_checkpoint)

CPU = torch.device("cpu")
STEP = 40


@pytest.fixture
def ckpt_dir(fixture_base_dir):
    return fixture_base_dir / "base_checkpoints" / "d2"


@pytest.fixture
def file_state(ckpt_dir):
    """The fixture's model state_dict exactly as torch.load reads it."""
    return torch.load(ckpt_dir / f"model_{STEP:06d}.pt", map_location="cpu")


@pytest.fixture
def file_meta(ckpt_dir):
    return json.loads((ckpt_dir / f"meta_{STEP:06d}.json").read_text())


def assert_same_tensors(actual, expected):
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message

# -----------------------------------------------------------------------------
# The upstream-written checkpoint


def test_load_checkpoint_reads_the_upstream_files_exactly(ckpt_dir, file_state, file_meta):
    model_data, optimizer_data, meta = load_checkpoint(str(ckpt_dir), STEP, CPU, load_optimizer=False)
    assert optimizer_data is None
    assert_same_tensors(model_data, file_state)
    assert meta == file_meta


def test_find_last_step_and_largest_model(fixture_base_dir, ckpt_dir):
    assert find_last_step(str(ckpt_dir)) == STEP
    assert find_largest_model(str(fixture_base_dir / "base_checkpoints")) == "d2"


def test_find_last_step_takes_the_highest_step_and_ignores_other_files(tmp_path):
    for name in ["model_000005.pt", "model_000120.pt", "model_000020.pt", "meta_000999.json",
                 "optim_000500_rank0.pt", ".model_000777.pt.123.abcd.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert find_last_step(str(tmp_path)) == 120


def test_find_largest_model_prefers_deepest_d_tag_then_newest(tmp_path):
    for tag in ["d2", "d10", "d4", "custom"]:
        (tmp_path / tag).mkdir()
    (tmp_path / "d99.txt").write_text("a file, not a model dir")
    assert find_largest_model(str(tmp_path)) == "d10"

    other = tmp_path / "other"
    other.mkdir()
    for i, tag in enumerate(["alpha", "beta", "gamma"]):
        (other / tag).mkdir()
        os.utime(other / tag, (1_000_000 + i * 10, 1_000_000 + [5, 30, 10][i]))
    assert find_largest_model(str(other)) == "beta"  # most recently modified


@pytest.mark.parametrize("phase", ["eval", "train"])
def test_build_model_loads_the_exact_weights(ckpt_dir, file_state, file_meta, phase):
    model, tokenizer, meta = build_model(str(ckpt_dir), STEP, CPU, phase)
    assert model.training == (phase == "train")
    assert_same_tensors(model.state_dict(), file_state)
    assert meta == file_meta
    assert tokenizer.get_vocab_size() == file_meta["model_config"]["vocab_size"]
    assert model.config.n_layer == 2 and model.config.window_pattern == "SL"
    # the rotary buffers (not in the state_dict) were computed, so the model runs
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.get_bos_token_id(), 5, 6, 7]]))
    assert logits.shape == (1, 4, 500) and torch.isfinite(logits).all()


def test_load_model_guesses_tag_and_step(file_state, file_meta):
    model, tokenizer, meta = load_model("base", CPU, phase="train")
    assert model.training
    assert meta["step"] == STEP and meta == file_meta
    assert_same_tensors(model.state_dict(), file_state)


def test_load_model_from_dir_with_explicit_tag_and_step(fixture_base_dir, file_state):
    model, _, meta = load_model_from_dir(str(fixture_base_dir / "base_checkpoints"), CPU, "eval",
                                         model_tag="d2", step=STEP)
    assert not model.training and meta["step"] == STEP
    assert_same_tensors(model.state_dict(), file_state)


def test_load_model_picks_the_newest_step(fixture_base_dir, ckpt_dir, file_state, file_meta):
    # a later step of the same model, with visibly different weights
    later = {k: v.clone() for k, v in file_state.items()}
    later["lm_head.weight"].mul_(2.0)
    save_checkpoint(str(ckpt_dir), 55, later, None, dict(file_meta, step=55))
    model, _, meta = load_model("base", CPU, phase="eval")
    assert meta["step"] == 55
    assert torch.equal(model.state_dict()["lm_head.weight"], later["lm_head.weight"])

# -----------------------------------------------------------------------------
# Saving


def test_save_load_round_trip_with_optimizer(tmp_path, file_state, file_meta):
    # a real optimizer state: AdamW after one step over a copy of the fixture weights
    params = [torch.nn.Parameter(v.clone()) for v in file_state.values() if v.dtype.is_floating_point]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p) * 0.01
    opt.step()
    optimizer_data = opt.state_dict()
    meta = dict(file_meta, step=7, note=["nested", {"ok": 1.5}])

    out = tmp_path / "ckpt"
    save_checkpoint(str(out), 7, file_state, optimizer_data, meta, rank=0)
    assert sorted(os.listdir(out)) == ["manifest_000007.json", "meta_000007.json", "model_000007.pt",
                                       "optim_000007_rank0.pt"]
    assert json.loads((out / "meta_000007.json").read_text(encoding="utf-8")) == meta

    model_data, opt_loaded, meta_loaded = load_checkpoint(str(out), 7, CPU, load_optimizer=True, rank=0)
    assert_same_tensors(model_data, file_state)
    assert meta_loaded == meta
    assert opt_loaded["param_groups"] == optimizer_data["param_groups"]
    for idx, state in optimizer_data["state"].items():
        for key, value in state.items():
            assert torch.equal(opt_loaded["state"][idx][key], value), (idx, key)
    # and the optimizer state loads back into a fresh optimizer
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    opt2.load_state_dict(opt_loaded)


def test_saved_checkpoint_builds_the_same_model(tmp_path, file_state, file_meta):
    save_checkpoint(str(tmp_path), 3, file_state, None, file_meta)
    assert not (tmp_path / "optim_000003_rank0.pt").exists()
    model, _, _ = build_model(str(tmp_path), 3, CPU, "eval")
    assert_same_tensors(model.state_dict(), file_state)


def test_non_zero_rank_writes_only_its_optimizer_shard(tmp_path):
    save_checkpoint(str(tmp_path), 12, {"w": torch.ones(2)}, {"state": {}, "x": torch.arange(3)}, {"step": 12}, rank=3)
    # its shard, and the pending marker: only rank 0 commits the step
    assert sorted(os.listdir(tmp_path)) == ["manifest_000012.json", "optim_000012_rank3.pt"]
    assert json.loads((tmp_path / "manifest_000012.json").read_text())["committed"] is False
    loaded = torch.load(tmp_path / "optim_000012_rank3.pt")
    assert torch.equal(loaded["x"], torch.arange(3))


def test_files_keep_normal_permissions(tmp_path):
    save_checkpoint(str(tmp_path), 1, {"w": torch.ones(2)}, {"s": torch.ones(1)}, {"step": 1})
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == (0o666 & ~umask), name


def _crashing_save(after_bytes):
    """A torch.save stand-in that writes part of the payload and then dies, like a full disk."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:after_bytes])
        raise OSError("simulated crash: No space left on device")
    return save


@pytest.mark.parametrize("which", ["model", "optimizer"])
def test_crash_mid_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch, file_state, file_meta, which):
    tmp_path = tmp_path / "ckpt"
    save_checkpoint(str(tmp_path), 10, file_state, {"m": torch.zeros(4)}, dict(file_meta, step=10))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    calls = {"n": 0}
    crashing = _crashing_save(after_bytes=1000)
    real_save = torch.save

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        # the optimizer shard is the first torch.save of a rank-0 save, the model (written last) the second
        if (which == "optimizer") == (calls["n"] == 1):
            return crashing(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(str(tmp_path), 20, file_state, {"m": torch.ones(4)}, dict(file_meta, step=20))
    monkeypatch.setattr(torch, "save", real_save)

    names = os.listdir(tmp_path)
    assert not any(name.endswith(".tmp") for name in names), names  # no temp litter
    assert "model_000020.pt" not in names
    # step 20 never committed: readers skip it and say so
    assert find_last_step(str(tmp_path)) == 10
    with pytest.raises(FileNotFoundError, match="step 20 .* never committed.*last committed step is 10"):
        load_checkpoint(str(tmp_path), 20, CPU, load_optimizer=True)
    # earlier checkpoint untouched and loadable
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    model_data, _, meta = load_checkpoint(str(tmp_path), 10, CPU)
    assert_same_tensors(model_data, file_state)
    assert meta["step"] == 10


def test_crash_while_overwriting_a_step_keeps_the_old_file(tmp_path, monkeypatch, file_state, file_meta):
    tmp_path = tmp_path / "ckpt"
    save_checkpoint(str(tmp_path), 10, file_state, None, file_meta)
    original = (tmp_path / "model_000010.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _crashing_save(after_bytes=50))
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path), 10, {"other": torch.zeros(3)}, None, file_meta)
    assert (tmp_path / "model_000010.pt").read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["manifest_000010.json", "meta_000010.json", "model_000010.pt"]
    # the rewrite had begun (the meta file was replaced), so step 10 is no longer a whole step
    with pytest.raises(FileNotFoundError, match="No committed checkpoint.*interrupted"):
        find_last_step(str(tmp_path))


def test_unserializable_meta_writes_nothing(tmp_path, file_state):
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path / "c"), 1, file_state, None, {"bad": object()})
    assert os.listdir(tmp_path / "c") == []

# -----------------------------------------------------------------------------
# Old-checkpoint shims


def test_old_checkpoint_without_new_keys_and_compiled_prefix(tmp_path, file_state, file_meta):
    # an old run: no window_pattern in the config, no resid/x0 lambdas, compiled-module key
    # prefixes and bf16 tensors (as a GPU run would save them)
    old_state = {f"_orig_mod.{k}": v.to(torch.bfloat16) for k, v in file_state.items()
                 if k not in ("resid_lambdas", "x0_lambdas")}
    old_meta = json.loads(json.dumps(file_meta))
    del old_meta["model_config"]["window_pattern"]
    save_checkpoint(str(tmp_path), 5, old_state, None, old_meta)

    model, _, meta = build_model(str(tmp_path), 5, CPU, "eval")
    assert meta["model_config"]["window_pattern"] == "L"
    assert all(w == (160, 0) for w in model.window_sizes)
    sd = model.state_dict()
    assert torch.equal(sd["resid_lambdas"], torch.ones(2))
    assert torch.equal(sd["x0_lambdas"], torch.zeros(2))
    # bf16 was converted to fp32 for CPU, values otherwise untouched
    w = sd["transformer.wte.weight"]
    assert w.dtype == torch.float32
    assert torch.equal(w, file_state["transformer.wte.weight"].to(torch.bfloat16).float())

# -----------------------------------------------------------------------------
# Bad input: one-line errors naming the path and the fix


def test_missing_checkpoint_dir(tmp_path):
    missing = tmp_path / "nope" / "d12"
    for call in (lambda: find_last_step(str(missing)),
                 lambda: find_largest_model(str(missing)),
                 lambda: load_checkpoint(str(missing), 1, CPU)):
        with pytest.raises(FileNotFoundError) as ei:
            call()
        msg = one_line(ei)
        assert str(missing) in msg and "does not exist" in msg and "base_train" in msg


def test_load_model_with_empty_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as ei:
        load_model("base", CPU, phase="eval")
    assert str(tmp_path / "base_checkpoints") in one_line(ei)
    with pytest.raises(FileNotFoundError):
        load_optimizer_state("sft", CPU, rank=0)


def test_no_checkpoints_in_dir(tmp_path):
    (tmp_path / "d4").mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        find_last_step(str(tmp_path / "d4"))
    assert "No checkpoints found" in one_line(ei) and str(tmp_path / "d4") in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as ei:
        find_largest_model(str(empty))
    assert "No checkpoints found" in one_line(ei) and str(empty) in str(ei.value)


def test_missing_step_lists_available_steps(ckpt_dir):
    with pytest.raises(FileNotFoundError) as ei:
        load_checkpoint(str(ckpt_dir), 41, CPU)
    msg = one_line(ei)
    assert "step 41" in msg and "model_000041.pt" in msg and "available steps: 40" in msg
    with pytest.raises(FileNotFoundError):
        load_model("base", CPU, phase="eval", step=41)


def test_corrupt_model_file(ckpt_dir):
    path = ckpt_dir / f"model_{STEP:06d}.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated file, as a crash without atomic writes would leave
    with pytest.raises(RuntimeError) as ei:
        build_model(str(ckpt_dir), STEP, CPU, "eval")
    msg = one_line(ei)
    assert str(path) in msg and "corrupt" in msg and "earlier step" in msg


def test_corrupt_meta_file(ckpt_dir):
    path = ckpt_dir / f"meta_{STEP:06d}.json"
    path.write_text('{"step": 40, "model_config": {')
    with pytest.raises(ValueError) as ei:
        load_checkpoint(str(ckpt_dir), STEP, CPU)
    msg = one_line(ei)
    assert str(path) in msg and "not valid JSON" in msg


def test_missing_meta_file(ckpt_dir):
    (ckpt_dir / f"meta_{STEP:06d}.json").unlink()
    with pytest.raises(FileNotFoundError) as ei:
        load_checkpoint(str(ckpt_dir), STEP, CPU)
    assert f"meta_{STEP:06d}.json" in one_line(ei)


def test_missing_optimizer_shard(ckpt_dir):
    with pytest.raises(FileNotFoundError) as ei:
        load_checkpoint(str(ckpt_dir), STEP, CPU, load_optimizer=True, rank=1)
    assert str(ckpt_dir / f"optim_{STEP:06d}_rank1.pt") in one_line(ei)
    # load_optimizer_state treats a missing shard as "no state" (SFT then starts fresh)
    assert load_optimizer_state("base", CPU, rank=0) is None


def test_load_optimizer_state_reads_the_shard(ckpt_dir):
    save_checkpoint(str(ckpt_dir), STEP, torch.load(ckpt_dir / f"model_{STEP:06d}.pt"),
                    {"state": {0: {"step": torch.tensor(3.0)}}}, json.loads((ckpt_dir / f"meta_{STEP:06d}.json").read_text()))
    data = load_optimizer_state("base", CPU, rank=0)
    assert torch.equal(data["state"][0]["step"], torch.tensor(3.0))
    assert load_optimizer_state("base", CPU, rank=0, model_tag="d2", step=STEP) is not None


@pytest.mark.parametrize("field,value,key,ckpt_shape,model_shape", [
    ("n_embd", 256, "transformer.wte.weight", (512, 128), (512, 256)),
    ("n_layer", 4, "resid_lambdas", (2,), (4,)),
])
def test_shape_mismatch_names_key_shapes_and_depth(ckpt_dir, field, value, key, ckpt_shape, model_shape):
    meta_path = ckpt_dir / f"meta_{STEP:06d}.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"][field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError) as ei:
        build_model(str(ckpt_dir), STEP, CPU, "eval")
    msg = one_line(ei)
    assert key in msg and str(ckpt_shape) in msg and str(model_shape) in msg
    assert "looks like a d2, n_embd=128 model" in msg and "--model-tag" in msg and "--depth" in msg


def test_missing_key_in_state_dict(tmp_path, file_state, file_meta):
    partial = {k: v for k, v in file_state.items() if k != "lm_head.weight"}
    save_checkpoint(str(tmp_path), 1, partial, None, file_meta)
    with pytest.raises(RuntimeError) as ei:
        build_model(str(tmp_path), 1, CPU, "eval")
    msg = one_line(ei)
    assert "missing 1 key(s), first lm_head.weight" in msg


def test_tokenizer_vocab_mismatch(ckpt_dir):
    meta_path = ckpt_dir / f"meta_{STEP:06d}.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["vocab_size"] = 510  # pads to the same 512 rows, so only the tokenizer check can catch it
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as ei:
        build_model(str(ckpt_dir), STEP, CPU, "eval")
    assert re.search(r"tokenizer vocab size 500 does not match model config vocab size 510", one_line(ei))


def test_bad_phase_and_source(ckpt_dir):
    with pytest.raises(ValueError, match="phase must be 'train' or 'eval'"):
        build_model(str(ckpt_dir), STEP, CPU, "inference")
    with pytest.raises(ValueError, match="unknown checkpoint source 'mid'; use one of base, sft, rl"):
        load_model("mid", CPU, phase="eval")


def test_source_directories(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert cm._checkpoints_dir_for("base") == str(tmp_path / "base_checkpoints")
    assert cm._checkpoints_dir_for("sft") == str(tmp_path / "chatsft_checkpoints")
    assert cm._checkpoints_dir_for("rl") == str(tmp_path / "chatrl_checkpoints")

# -----------------------------------------------------------------------------
# Whole-step commits, checksums, the NaN guard (ours; upstream has none of these)


def _save_full_step(directory, step, file_state, file_meta, scale=1.0):
    """A step with everything train.py saves: model, meta, optimizer shard and an extra (loader) file."""
    model = {k: v * scale if v.is_floating_point() else v for k, v in file_state.items()}
    save_checkpoint(str(directory), step, model, {"state": {0: {"m": torch.full((4,), scale)}}},
                    dict(file_meta, step=step), rank=0,
                    extra_files={f"loader_{step:06d}_rank0.pt": {"tokens": torch.arange(5) + step}})
    return model


def test_manifest_records_every_file_and_upstreams_readers_still_work(tmp_path, file_state, file_meta):
    tmp_path = tmp_path / "ckpt"
    _save_full_step(tmp_path, 8, file_state, file_meta)
    manifest = json.loads((tmp_path / "manifest_000008.json").read_text())
    assert manifest["committed"] is True and manifest["step"] == 8 and manifest["world_size"] == 1
    names = {"model_000008.pt", "meta_000008.json", "optim_000008_rank0.pt", "loader_000008_rank0.pt"}
    assert set(manifest["files"]) == names
    import hashlib
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # upstream's load_checkpoint is torch.load + json.load on the same names: the files are plain
    assert_same_tensors(torch.load(tmp_path / "model_000008.pt"), file_state)
    assert json.loads((tmp_path / "meta_000008.json").read_text())["step"] == 8
    loader = cm.load_checkpoint_file(str(tmp_path), 8, "loader_000008_rank0.pt", CPU)
    assert torch.equal(loader["tokens"], torch.arange(5) + 8)


def test_a_save_killed_between_any_two_writes_leaves_the_last_committed_step(tmp_path, monkeypatch, file_state,
                                                                           file_meta, caplog):
    tmp_path = tmp_path / "ckpt"
    _save_full_step(tmp_path, 10, file_state, file_meta)
    committed_10 = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    order = []
    monkeypatch.setattr(cm, "_before_write", order.append)
    _save_full_step(tmp_path / "probe", 20, file_state, file_meta)
    assert order[-2:] == ["model_000020.pt", "manifest_000020.json"]  # model, then the commit, last
    assert len(order) == 5

    class Killed(BaseException):
        pass

    for k in range(len(order)):
        def die_at_kth(name, seen=[]):
            seen.append(name)
            if len(seen) == k + 1:
                raise Killed(name)
        monkeypatch.setattr(cm, "_before_write", die_at_kth)
        with pytest.raises(Killed):
            _save_full_step(tmp_path, 20, file_state, file_meta, scale=2.0)
        monkeypatch.setattr(cm, "_before_write", None)
        caplog.clear()
        with caplog.at_level("INFO", logger="nanochat.checkpoint_manager"):
            assert find_last_step(str(tmp_path)) == 10, order[k]
        assert "Skipping step 20" in caplog.text and "did not finish" in caplog.text
        with pytest.raises(FileNotFoundError, match="step 20 .*never committed.*last committed step is 10"):
            load_checkpoint(str(tmp_path), 20, CPU, load_optimizer=True)
        for name, data in committed_10.items():
            assert (tmp_path / name).read_bytes() == data, (order[k], name)
        model_data, opt, meta = load_checkpoint(str(tmp_path), 10, CPU, load_optimizer=True)
        assert meta["step"] == 10 and torch.equal(opt["state"][0]["m"], torch.ones(4))
    # and a save that runs to the end commits step 20
    _save_full_step(tmp_path, 20, file_state, file_meta, scale=2.0)
    assert find_last_step(str(tmp_path)) == 20
    assert torch.equal(load_checkpoint(str(tmp_path), 20, CPU, load_optimizer=True)[1]["state"][0]["m"],
                       torch.full((4,), 2.0))


KILL_MID_WRITE = r"""
import os, signal, sys, torch
import nanochat.checkpoint_manager as cm
real_write = cm._HashingWriter.write
def write(self, data):
    if self.nbytes > 4096:  # part of the model file is on disk under its temp name
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(self, data)
cm._HashingWriter.write = write
def before(name):
    if not name.startswith("model_"):
        cm._HashingWriter.write = real_write
    else:
        cm._HashingWriter.write = write
cm._before_write = before
cm.save_checkpoint(sys.argv[1], 20, {"w": torch.randn(100000)}, {"m": torch.ones(3)}, {"step": 20})
"""


def test_sigkill_mid_write_then_next_save_removes_the_temp_file(tmp_path, file_state, file_meta):
    tmp_path = tmp_path / "ckpt"
    import subprocess, sys
    save_checkpoint(str(tmp_path), 10, {"w": torch.zeros(3)}, None, {"step": 10})
    r = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(tmp_path)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert r.returncode == -9, r.stderr[-2000:]
    stale = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_000020.pt."), os.listdir(tmp_path)
    assert find_last_step(str(tmp_path)) == 10
    # a temp file newer than this process may be another rank's save in progress: it stays
    fresh = tmp_path / ".optim_000030_rank1.pt.999.abcd.tmp"
    fresh.write_bytes(b"in progress")
    os.utime(tmp_path / stale[0], (cm._PROCESS_START - 60, cm._PROCESS_START - 60))
    os.utime(fresh, (cm._PROCESS_START + 1, cm._PROCESS_START + 1))
    save_checkpoint(str(tmp_path), 30, {"w": torch.ones(3)}, None, {"step": 30})
    assert not (tmp_path / stale[0]).exists() and fresh.exists()
    assert find_last_step(str(tmp_path)) == 30


def _flip_bytes(path, count=64):
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model_000008.pt", "optim_000008_rank0.pt", "meta_000008.json",
                                  "loader_000008_rank0.pt"])
def test_flipped_bytes_are_refused_naming_the_file(tmp_path, file_state, file_meta, name):
    tmp_path = tmp_path / "ckpt"
    _save_full_step(tmp_path, 8, file_state, file_meta)
    _flip_bytes(tmp_path / name, count=min(64, (tmp_path / name).stat().st_size // 4))
    with pytest.raises(RuntimeError) as ei:
        if name.startswith("loader_"):
            cm.load_checkpoint_file(str(tmp_path), 8, name, CPU)
        else:
            load_checkpoint(str(tmp_path), 8, CPU, load_optimizer=True)
    message = one_line(ei)
    assert name in message and "checksum" in message and "earlier step" in message


def test_truncated_file_is_refused_by_size(tmp_path, file_state, file_meta):
    tmp_path = tmp_path / "ckpt"
    _save_full_step(tmp_path, 8, file_state, file_meta)
    path = tmp_path / "loader_000008_rank0.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="loader_000008_rank0.pt has 100 bytes but step 8 was committed with"):
        cm.load_checkpoint_file(str(tmp_path), 8, "loader_000008_rank0.pt", CPU, what="loader snapshot")


@pytest.mark.parametrize("where", ["model", "optimizer", "extra"])
def test_nan_or_inf_aborts_the_save_and_writes_nothing(tmp_path, file_state, file_meta, where):
    tmp_path = tmp_path / "ckpt"
    model, optim, extra = dict(file_state), {"state": {0: {"exp_avg": torch.zeros(3)}}}, {"x.pt": {"v": torch.ones(2)}}
    if where == "model":
        bad = model["transformer.wte.weight"].clone()
        bad[3, 1] = float("nan")
        model["transformer.wte.weight"] = bad
    elif where == "optimizer":
        optim["state"][0]["exp_avg"] = torch.tensor([0.0, float("inf"), 1.0])
    else:
        extra["x.pt"]["v"] = torch.tensor([float("-inf")])
    with pytest.raises(ValueError) as ei:
        save_checkpoint(str(tmp_path), 5, model, optim, dict(file_meta, step=5), extra_files=extra)
    message = one_line(ei)
    assert "NaN or inf" in message and "refusing to save step 5" in message
    assert {"model": "transformer.wte.weight", "optimizer": "state.0.exp_avg", "extra": "v"}[where] in message
    assert os.listdir(tmp_path) == []
