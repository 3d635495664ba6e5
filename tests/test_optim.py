"""
MuonAdamW (nanochat/optim.py) as a specification.

- setup_optimizer()'s param groups equal upstream's recorded ones;
- two steps from the fixture checkpoint with the manifest's seeded synthetic grads
  reproduce upstream's parameters and update statistics;
- state_dict() -> torch.save/torch.load -> load_state_dict() resumes exactly;
- two gloo processes (reduce-scatter / all-gather sharding) give the single-process
  result;
- malformed groups and missing grads fail with a clear message.

The fused kernels are torch.compile'd. On CPU the first compile of each shape takes
tens of seconds (inductor caches on disk afterwards), so the expensive fixture run is
done once per module and reused, and the multi-process test runs the kernels eagerly
by default (a compiled variant is marked slow).
"""

import io
import json
import os
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from nanochat.optim import MuonAdamW

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_manifest(fixtures):
    return json.loads((fixtures / "manifest.json").read_text())


def set_recipe_grads(named_params, step, seed, scale):
    """The manifest's optimizer.grad_recipe: one seeded Gaussian per (step, name)."""
    for name, p in sorted(named_params.items()):
        gen = torch.Generator().manual_seed(seed + 1000 * step + zlib.crc32(name.encode()) % 100000)
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale).to(p.dtype)


def build_from_recorded_groups(state_dict, recorded_groups):
    """Parameters from a checkpoint, grouped exactly as upstream's setup_optimizer did."""
    params = {name: torch.nn.Parameter(t.clone()) for name, t in state_dict.items()}
    groups = []
    for rec in recorded_groups:
        group = {k: v for k, v in rec.items() if k not in ("params", "initial_lr")}
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        group["params"] = [params[name] for name in rec["params"]]
        groups.append(group)
    opt = MuonAdamW(groups)
    for group, rec in zip(opt.param_groups, recorded_groups):
        group["initial_lr"] = rec["initial_lr"]
    return params, opt


def snapshot(params):
    return {name: p.detach().clone() for name, p in params.items()}


@pytest.fixture(scope="module")
def recipe_run(upstream_fixtures):
    """Upstream's optimizer_step item, run once: checkpoint weights, two recipe steps."""
    torch.set_num_threads(2)
    manifest = load_manifest(upstream_fixtures)
    cfg = manifest["optimizer"]
    assert cfg["schedule"] is None, "this test implements the schedule-free recipe only"
    ckpt = torch.load(upstream_fixtures / manifest["checkpoint"]["dir"] / manifest["checkpoint"]["files"][0])
    expected = torch.load(upstream_fixtures / "expected" / "optimizer.pt")
    params, opt = build_from_recorded_groups(ckpt, expected["groups"])
    run = dict(manifest=manifest, ckpt=ckpt, expected=expected, grads=[], after=[])
    for step in (0, 1):
        set_recipe_grads(params, step, cfg["grad_seed"], cfg["grad_scale"])
        run["grads"].append({name: p.grad.clone() for name, p in params.items()})
        if step == 1:
            # what a checkpoint written between the two steps would hold
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            run["saved_state"] = buf.getvalue()
        opt.step()
        for p in params.values():
            p.grad = None
        run["after"].append(snapshot(params))
    return run

# -----------------------------------------------------------------------------
# fixtures recorded from upstream


def test_param_groups_match_upstream(upstream_fixtures):
    from nanochat.gpt import GPT, GPTConfig
    manifest = load_manifest(upstream_fixtures)
    expected = json.loads((upstream_fixtures / "expected" / "optimizer_groups.json").read_text())
    with torch.device("meta"):
        model = GPT(GPTConfig(**manifest["model_config"]))
    model.to_empty(device=torch.device("cpu"))
    model.init_weights()
    opt = model.setup_optimizer(**manifest["optimizer"]["setup_optimizer_kwargs"])
    assert isinstance(opt, MuonAdamW)
    name_of = {id(p): name for name, p in model.named_parameters()}
    rtol = manifest["tolerances"]["values"]["float_rtol"]

    assert len(opt.param_groups) == len(expected)
    for i, (got, exp) in enumerate(zip(opt.param_groups, expected)):
        assert [name_of[id(p)] for p in got["params"]] == exp["params"], f"group {i}"
        assert set(got) - {"params"} == set(exp) - {"params"}, f"group {i} keys"
        for key, want in exp.items():
            if key == "params":
                continue
            have = got[key]
            if isinstance(want, float):
                assert have == pytest.approx(want, rel=rtol), f"group {i} {key}"
            elif isinstance(want, list):
                assert list(have) == pytest.approx(want, rel=rtol), f"group {i} {key}"
            else:
                assert have == want and type(have) is type(want), f"group {i} {key}"


def test_grad_recipe_matches_upstream(recipe_run):
    # self-check of our reading of the recipe, so a mismatch below is the optimizer's
    for step, grads in enumerate(recipe_run["grads"]):
        for name, want in recipe_run["expected"]["grad_stats"][step].items():
            g = grads[name].double()
            have = [g.sum().item(), g.abs().sum().item(), g.square().sum().item()]
            assert have == pytest.approx(want, rel=1e-6, abs=1e-9), f"step {step} {name}"


def test_two_steps_match_upstream(recipe_run):
    tol = recipe_run["manifest"]["tolerances"]["values"]
    expected = recipe_run["expected"]["params"]
    assert set(expected) == set(recipe_run["ckpt"])
    for step in (1, 2):
        after = recipe_run["after"][step - 1]
        for name, exp in expected.items():
            p = after[name]
            torch.testing.assert_close(p.flatten()[exp["idx"]], exp[f"step{step}"],
                                       atol=tol["optimizer_atol"], rtol=0, msg=f"{name} after step {step}")
            # update statistics are of the total change since the checkpoint
            delta = (p - recipe_run["ckpt"][name]).double()
            want_sum, want_abs, want_sq = exp[f"delta_stats_step{step}"]
            rtol = tol["optimizer_stats_rtol"]
            assert delta.abs().sum().item() == pytest.approx(want_abs, rel=rtol), f"{name} step {step} |delta|"
            assert delta.square().sum().item() == pytest.approx(want_sq, rel=rtol), f"{name} step {step} delta^2"
            assert delta.sum().item() == pytest.approx(want_sum, abs=rtol * want_abs), f"{name} step {step} sum"

# -----------------------------------------------------------------------------
# resume


def test_state_dict_round_trip_resumes_exactly(recipe_run):
    # a fresh optimizer on the weights after step 1, with the state saved after step 1,
    # must take exactly the step the uninterrupted optimizer took
    params, opt = build_from_recorded_groups(recipe_run["after"][0], recipe_run["expected"]["groups"])
    for group in opt.param_groups:
        group["lr"] = 123.0  # load_state_dict must restore the saved hyperparameters
    saved = torch.load(io.BytesIO(recipe_run["saved_state"]))  # weights_only, as checkpoint_manager loads it
    opt.load_state_dict(saved)
    for group, rec in zip(opt.param_groups, recipe_run["expected"]["groups"]):
        assert group["lr"] == rec["lr"] and group["kind"] == rec["kind"] and group["initial_lr"] == rec["initial_lr"]

    # the saved state is the real thing: AdamW moments per param, Muon buffers per group
    for group in opt.param_groups:
        state = opt.state[group["params"][0]]
        if group["kind"] == "adamw":
            assert state["step"] == 1 and state["exp_avg"].abs().sum() > 0
        else:
            k = len(group["params"])
            rows, cols = group["params"][0].shape
            assert state["momentum_buffer"].shape == (k, rows, cols)
            assert state["second_momentum_buffer"].shape == ((k, rows, 1) if rows >= cols else (k, 1, cols))

    for name, p in params.items():
        p.grad = recipe_run["grads"][1][name].clone()
    opt.step()
    for name, p in params.items():
        assert torch.equal(p.detach(), recipe_run["after"][1][name]), name

# -----------------------------------------------------------------------------
# distributed (gloo, 2 CPU processes)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_two_gloo_ranks_match_single_process(tmp_path, mode):
    # Two worker processes started directly with the env:// variables torchrun would
    # set (skipping torchrun's agent saves one more torch import); gloo on 127.0.0.1.
    world_size = 2
    base_env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                    WORLD_SIZE=str(world_size), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                    PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO_ROOT / "tests" / "_dist_optim_worker.py"), str(tmp_path)]
    if mode == "eager":
        cmd.append("eager")
    procs = [subprocess.Popen(cmd, env=dict(base_env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180 if mode == "eager" else 900)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for r, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"

    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for r, out in enumerate(outs):
        assert out["rank"] == r and out["world_size"] == world_size
        for name, ref in out["reference"].items():
            torch.testing.assert_close(out["result"][name], ref, atol=1e-6, rtol=1e-5, msg=f"rank {r} {name}")
        # every rank ends with the full, identical weights (the all-gather worked)
        for name in out["result"]:
            assert torch.equal(out["result"][name], outs[0]["result"][name]), f"rank {r} {name} differs from rank 0"

    # ZeRO-2 sharding: each rank keeps state only for what it updates.
    # Worker groups: 0 = gains (6,) small -> replicated; 1 = embed (64, 32) -> 32 rows each;
    # 2 = three (16, 32) matrices -> chunks of 2; 3 = one (32, 16) matrix -> chunk of 1.
    for out in outs:
        st = out["state"]["state"]
        assert st[0]["exp_avg"].shape == (6,)
        assert st[1]["exp_avg"].shape == (32, 32) and st[1]["step"] == 2
        assert st[2]["momentum_buffer"].shape == (2, 16, 32)
        assert st[2]["second_momentum_buffer"].shape == (2, 1, 32)
        assert st[5]["momentum_buffer"].shape == (1, 32, 16)
        assert st[5]["second_momentum_buffer"].shape == (1, 32, 1)
    # rank 1 owns only padding in the last Muon group: its buffers never moved
    assert outs[0]["state"]["state"][5]["momentum_buffer"].abs().sum() > 0
    assert outs[1]["state"]["state"][5]["momentum_buffer"].abs().sum() == 0

# -----------------------------------------------------------------------------
# bad input


def test_bad_groups_are_rejected_with_clear_messages():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    muon = dict(lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    with pytest.raises(ValueError, match="kind='sgd'"):
        MuonAdamW([dict(kind="sgd", params=[w], lr=0.1)])
    with pytest.raises(ValueError, match=r"missing \['eps'\]"):
        MuonAdamW([dict(kind="adamw", params=[w], lr=0.1, betas=(0.8, 0.95), weight_decay=0.0)])
    with pytest.raises(ValueError, match="single shape"):
        MuonAdamW([dict(kind="muon", params=[w, torch.nn.Parameter(torch.zeros(4, 8))], **muon)])
    with pytest.raises(ValueError, match="2D matrices"):
        MuonAdamW([dict(kind="muon", params=[torch.nn.Parameter(torch.zeros(4))], **muon)])


def test_step_without_grad_names_the_problem():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = MuonAdamW([dict(kind="adamw", params=[a, b], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    a.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="has no .grad"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(3))  # nothing was half-applied
