"""nanochat/hooks.py: variant lookup, run-config parsing, and the rebase surface in nanochat/."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import hooks

REPO = Path(__file__).resolve().parent.parent


class CountingVariant:
    name = "counting"

    def __init__(self, config):
        self.config = config
        self.scale = torch.nn.Parameter(torch.ones(3))

    def build(self, model, config, resuming=False):
        return [dict(kind="adamw", params=[self.scale], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)]

    def state_dict(self):
        return {"scale": self.scale.detach().clone()}

    def load_state_dict(self, sd):
        self.scale.data.copy_(sd["scale"])


def test_vanilla_is_default_and_has_no_hooks():
    v = hooks.get_variant()
    assert v.name == "vanilla"
    for member in ("build", "train_loader", "loss", "on_step", "finish", "state_dict", "load_state_dict",
                   "chat_session", "max_nonfinite_steps"):
        assert not hasattr(v, member)
    assert hooks.variant_param_groups(v, model=None, config={}) == []
    assert hooks.save_variant_state(v, "/nonexistent", 1) is None


def test_registered_and_dotted_path_variants(tmp_path):
    hooks.register_variant("counting", CountingVariant)
    v = hooks.get_variant("counting", {"a": 1})
    assert isinstance(v, CountingVariant) and v.config == {"a": 1}
    v2 = hooks.get_variant("test_hooks:CountingVariant", {})
    assert type(v2).__name__ == "CountingVariant"


def test_unknown_variant_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown variant 'nope'.*known variants: .*vanilla"):
        hooks.get_variant("nope")
    with pytest.raises(ValueError, match="cannot load Missing from json"):
        hooks.get_variant("json:Missing")


def test_variant_groups_join_optimizer_with_initial_lr_and_state_round_trips(tmp_path):
    v = CountingVariant({})
    base = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([dict(params=[base], lr=0.01, initial_lr=0.01)])
    hooks.add_param_groups(opt, hooks.variant_param_groups(v, None, {}))
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["initial_lr"] == 0.1
    v.scale.data.fill_(3.0)
    path = hooks.save_variant_state(v, str(tmp_path), 12)
    assert Path(path).name == "mc_000012.pt" and not list(tmp_path.glob("*.tmp"))
    v2 = CountingVariant({})
    assert hooks.load_variant_state(v2, str(tmp_path), 12, "cpu")
    assert torch.equal(v2.scale, v.scale)
    with pytest.raises(FileNotFoundError, match="mc_000013.pt"):
        hooks.load_variant_state(v2, str(tmp_path), 13, "cpu")


DEFAULTS = {"depth": 20, "target_flops": -1.0, "fp8": False, "run": "dummy", "model_tag": None}


def test_run_config_merges_yaml_then_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("variant: counting\ndepth: 4\ntarget_flops: 1e18\ncounting:\n  budget: 512\n")
    overrides = hooks.parse_overrides(["--depth=6", "--fp8", "--counting.budget", "256", "--model-tag=x"])
    settings, name, vcfg = hooks.load_run_config(str(cfg), overrides, DEFAULTS)
    assert settings == {"depth": 6, "target_flops": 1e18, "fp8": True, "run": "dummy", "model_tag": "x"}
    assert name == "counting" and vcfg == {"budget": 256}


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("depht: 4\n", [], "unknown config key 'depht'"),
    ("", ["--depht=4"], "unknown config key 'depht' \\(from the command line\\)"),
    ("", ["--depth=four"], "config key 'depth' expects int, got 'four'"),
    ("megacontext:\n  x: 1\n", [], "config section 'megacontext' belongs to variant"),
    ("depth: [4\n", [], "not valid YAML"),
    ("", ["--megacontext.x=1"], "is for variant 'megacontext'"),
])
def test_run_config_bad_input(tmp_path, yaml_text, overrides, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        hooks.load_run_config(str(cfg), hooks.parse_overrides(overrides), DEFAULTS)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        hooks.load_run_config("nope.yaml", {}, DEFAULTS)


def test_train_cli_reports_bad_config_in_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("depht: 4\n")
    r = subprocess.run([sys.executable, "-m", "nanochat.train", "--config", str(cfg)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]  # exactly one line
    assert "unknown config key 'depht'" in r.stderr and "Traceback" not in r.stderr


def test_hook_surface_is_marked_and_nanochat_never_names_megacontext():
    """Every nanochat/ line that exists for extensions is marked '# hook:'; none imports megacontext."""
    marked, leaks = [], []
    for path in sorted((REPO / "nanochat").glob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{i}: {line.strip()}"
            if "# hook:" in line:
                marked.append(where)
            elif re.search(r"megacontext", line, flags=re.I) and path.name != "hooks.py":
                leaks.append(where)
            if re.match(r"\s*(import|from)\s+megacontext", line):
                leaks.append(where)
    print("\nhook surface (%d lines):\n  %s" % (len(marked), "\n  ".join(marked)))
    assert not leaks, f"nanochat/ names megacontext outside hook lines: {leaks}"
    assert 0 < len(marked) <= 36, f"hook surface should stay small, has {len(marked)} lines"


def test_frozen_params_leave_the_optimizer_and_nothing_changes_when_none_are():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([dict(params=[a, b], lr=0.1), dict(params=[c], lr=0.2)])
    groups_before = list(opt.param_groups)
    hooks.drop_frozen_params(opt)
    assert opt.param_groups == groups_before and opt.param_groups[0]["params"] == [a, b]
    b.requires_grad_(False)
    c.requires_grad_(False)
    hooks.drop_frozen_params(opt)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [a]


def test_variant_metrics_end_the_step_line_and_join_the_trainers_wandb_log():
    metrics = {"phase": "delta_nll", "loss_ranking": 0.123456, "n_wcs": 4, "ok": True}
    assert hooks.variant_metrics_line(metrics) == " | phase: delta_nll | loss_ranking: 0.1235 | n_wcs: 4 | ok: True"
    assert hooks.variant_wandb_metrics(metrics) == {"variant/loss_ranking": 0.123456, "variant/n_wcs": 4}
    assert hooks.variant_metrics_line({}) == "" and hooks.variant_wandb_metrics(None) == {}


def _adamw(*groups):
    from nanochat.optim import MuonAdamW
    return MuonAdamW([dict(kind="adamw", params=list(g), lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
                      for g in groups])


def test_a_group_without_grads_sits_the_step_out_and_keeps_its_place():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = _adamw([a], [b])
    a.grad = torch.ones(3)  # b's module was frozen this step: no grad
    loss = hooks.before_optimizer_step(hooks.get_variant(), opt, torch.tensor(1.0), 0, "/nonexistent")
    assert float(loss) == 1.0 and len(opt.param_groups) == 1
    opt.step()
    hooks.after_optimizer_step(opt)
    assert [g["params"] for g in opt.param_groups] == [[a], [b]]  # the saved order
    assert not torch.equal(a.detach(), torch.ones(3)) and torch.equal(b.detach(), torch.ones(2))
    assert a.grad is None and b not in opt.state
    b.grad = torch.ones(2)  # a later phase trains it: no crash, it steps
    a.grad = torch.ones(3)
    hooks.before_optimizer_step(hooks.get_variant(), opt, torch.tensor(1.0), 1, "/nonexistent")
    opt.step()
    hooks.after_optimizer_step(opt)
    assert not torch.equal(b.detach(), torch.ones(2))


def test_nonfinite_guard_skips_the_step_then_stops_naming_the_last_checkpoint(tmp_path):
    class Guarded:
        name = "guarded"
        max_nonfinite_steps = 2
    v = Guarded()
    a = torch.nn.Parameter(torch.ones(3))
    opt = _adamw([a])
    a.grad = torch.ones(3)
    assert float(hooks.before_optimizer_step(v, opt, torch.tensor(2.5), 0, str(tmp_path))) == 2.5
    opt.step()
    hooks.after_optimizer_step(opt)
    good = a.detach().clone()
    state = {k: t.clone() if torch.is_tensor(t) else t for k, t in opt.state[a].items()}
    a.grad = torch.tensor([1.0, float("nan"), 1.0])  # NaN in a grad, finite loss
    logged = hooks.before_optimizer_step(v, opt, torch.tensor(3.0), 1, str(tmp_path))
    opt.step()
    hooks.after_optimizer_step(opt)
    assert float(logged) == 2.5 and v.nonfinite_skipped == 1  # the last finite loss is what gets logged
    assert torch.equal(a.detach(), good) and all(torch.equal(opt.state[a][k], t) if torch.is_tensor(t) else opt.state[a][k] == t
                                                   for k, t in state.items())
    a.grad = torch.ones(3)  # a good step resets the run of bad ones
    hooks.before_optimizer_step(v, opt, torch.tensor(2.0), 2, str(tmp_path))
    assert v.nonfinite_in_row == 0
    hooks.after_optimizer_step(opt)
    for step in (3, 4):
        a.grad = torch.ones(3)
        try:
            hooks.before_optimizer_step(v, opt, torch.tensor(float("inf")), step, str(tmp_path))
        except RuntimeError as e:
            assert step == 4 and "step 4" in str(e) and "2 steps in a row" in str(e)
            assert "no checkpoint was saved yet" in str(e)
        else:
            assert step == 3
        hooks.after_optimizer_step(opt)
    assert v.nonfinite_skipped == 3


def test_nonfinite_guard_under_fp16s_grad_scaler_leaves_overflow_to_the_scaler(tmp_path):
    # the trainer's fp16 sequence: scale(loss).backward(), the guard, unscale_, step, update
    class Guarded:
        name = "guarded"
        max_nonfinite_steps = 2
    v = Guarded()
    a = torch.nn.Parameter(torch.ones(3))
    opt = _adamw([a])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def step(loss_value, grad, n):
        scaler.scale(torch.zeros(()))  # as scale(loss) does: the scaler's state for this iteration
        a.grad = torch.as_tensor(grad, dtype=torch.float32) * scaler.get_scale()  # what backward() leaves
        logged = hooks.before_optimizer_step(v, opt, torch.tensor(loss_value), n, str(tmp_path), scaler)
        scaler.unscale_(opt)
        scaler.step(opt)  # raises "No inf checks were recorded" if the guard had dropped every grad
        scaler.update()
        hooks.after_optimizer_step(opt)
        return float(logged)

    assert step(2.0, [1.0, 1.0, 1.0], 0) == 2.0
    moved = a.detach().clone()
    assert not torch.equal(moved, torch.ones(3))
    scale = scaler.get_scale()
    # an overflowing grad with a finite loss: the scaler skips it and lowers its scale; the guard counts nothing
    assert step(2.0, [1.0, float("inf"), 1.0], 1) == 2.0
    assert torch.equal(a.detach(), moved) and scaler.get_scale() < scale
    assert getattr(v, "nonfinite_skipped", 0) == 0
    # a NaN loss: counted, the last finite loss logged, and the scaler skips the step (no weight moves)
    assert step(float("nan"), [1.0, 1.0, 1.0], 2) == 2.0
    assert torch.equal(a.detach(), moved) and v.nonfinite_skipped == 1
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        step(float("inf"), [1.0, 1.0, 1.0], 3)


def test_vanilla_has_no_guard_and_counts_upstreams_tokens():
    a = torch.nn.Parameter(torch.ones(3))
    opt = _adamw([a])
    a.grad = torch.ones(3)
    assert torch.isnan(hooks.before_optimizer_step(hooks.get_variant(), opt, torch.tensor(float("nan")), 0, "/x"))
    assert hooks.trained_tokens({}, 4096, 8) == 4096
    assert hooks.trained_tokens({"tokens": 300, "phase": "joint"}, 4096, 8) == 2400


def test_the_variants_loader_replaces_the_training_stream_only():
    class Fed:
        name = "fed"

        def train_loader(self, tokenizer, B, T, device, resume_state_dict):
            return iter([("mine", B, T)])
    trainer_train, trainer_val = iter(["upstream"]), (lambda: iter(["val"]))
    train, build_val = hooks.data_loaders(None, trainer_train, trainer_val, None, 2, 8, "cpu", None, variant=Fed())
    assert next(train) == ("mine", 2, 8) and next(build_val()) == "val"
    train, _ = hooks.data_loaders(None, trainer_train, trainer_val, None, 2, 8, "cpu", None, variant=hooks.get_variant())
    assert next(train) == "upstream"


def test_null_on_the_command_line_switches_a_string_setting_off(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("variant: counting\ncounting:\n  lensnet: some_tag\n")
    hooks.register_variant("counting", CountingVariant)
    _, _, vcfg = hooks.load_run_config(str(cfg), hooks.parse_overrides(["--counting.lensnet=null"]), DEFAULTS)
    assert vcfg["lensnet"] is None
    _, _, vcfg = hooks.load_run_config(str(cfg), hooks.parse_overrides(["--counting.lensnet=other"]), DEFAULTS)
    assert vcfg["lensnet"] == "other"
