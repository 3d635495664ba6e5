"""
Compare our nanochat/ with a checkout of any upstream nanochat commit, item by item.

    python -m scripts.upstream_check --upstream /path/to/nanochat [--out DIR] [--items a,b] [--eager]

It builds one small, deterministic workspace (a tokenizer trained on text that ships with
CPython, two parquet shards, a tiny model config), then runs the same recorder twice in fresh
Python processes: once with the upstream checkout first on sys.path, once with ours. Each
item calls only the public API both packages share (the calls upstream's own scripts make)
and records tensors and values; the two recordings are compared key by key. Output:

    ITEM: same
    ITEM: differs: <first differing tensor, value, flag or key>
    ITEM: cannot compare: <why, in one line>       (e.g. upstream needs a package missing here)
    upstream-only: <file or flag>                  (one line each; we have no counterpart)
    upstream_check: K/N same, M upstream-only

and exits 0 only when every item is the same and nothing is upstream-only.
--out DIR keeps both recordings (DIR/upstream/ITEM.pkl, DIR/ours/ITEM.pkl), the workspace and
the recorders' logs, for a look at what changed. --eager runs both sides without
torch.compile (TORCHDYNAMO_DISABLE=1): the optimizer kernels then skip a CPU compile of tens
of seconds, and compiled vs eager differ far below the tolerances.

Owns: the items, their recipes and tolerances, and the comparison. Must never write into
either checkout, and never download anything.
"""
import argparse
import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

OUR_ROOT = Path(__file__).resolve().parent.parent

# The conformance items, in the order they are reported.
ITEMS = ["tokenizer", "model_init", "model_forward", "optimizer_step", "dataloader", "engine",
         "checkpoint_files", "base_train_flags"]
# Max |a - b| tolerated per item for float tensors; everything else is compared exactly.
# The float tolerances are the conformance tests' (fp32 on CPU; see tests/test_gpt.py, test_optim.py).
ATOL = {"model_forward": 1e-4, "optimizer_step": 2e-5, "engine": 1e-4, "checkpoint_files": 2e-5}
# The tiny model every item builds (vocab_size comes from the workspace tokenizer).
MODEL_CONFIG = dict(sequence_len=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
TOKENIZER_VOCAB = 320
# What an upstream checkout must hold for any item to run.
CHECKOUT_MARKERS = ("nanochat/gpt.py", "nanochat/tokenizer.py", "scripts/base_train.py")
# Items that read nothing but source files: no workspace, no torch.
STATIC_ITEMS = ("base_train_flags",)
# Where upstream-only files are looked for.
TRACKED_DIRS = ("nanochat", "scripts", "tasks", "runs")


class CheckError(Exception):
    """A problem with the input: reported as one line."""

# -----------------------------------------------------------------------------
# The workspace both sides read: corpus, tokenizer, parquet shards


def corpus_docs(max_chars=120_000):
    """Documents from the pydoc topics that ship with CPython: deterministic and offline."""
    from pydoc_data.topics import topics
    docs, total = [], 0
    for key in sorted(topics):
        doc = topics[key].strip()
        if not doc:
            continue
        doc = doc[:3000]
        docs.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return docs


def build_workspace(workspace):
    """Tokenizer (trained with our package, saved as upstream's tok_train saves it) and two
    parquet shards (the last one is the val split). Both sides get their own copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import contextlib, io
    from nanochat.tokenizer import RustBPETokenizer
    docs = corpus_docs()
    tok_dir = workspace / "tokenizer"
    tok = RustBPETokenizer.train_from_iterator(iter(docs), TOKENIZER_VOCAB)
    with contextlib.redirect_stdout(io.StringIO()):
        tok.save(str(tok_dir))
    data_dir = workspace / "base_data_climbmix"
    data_dir.mkdir(parents=True)
    half = len(docs) * 3 // 4
    for i, shard in enumerate([docs[:half], docs[half:]]):
        pq.write_table(pa.table({"text": shard}), str(data_dir / f"shard_{i:05d}.parquet"), row_group_size=8)
    (workspace / "corpus.json").write_text(json.dumps(docs))
    # token ids the model items read, so they need neither side's tokenizer module
    T = MODEL_CONFIG["sequence_len"]
    inputs = {"vocab_size": tok.get_vocab_size(),
              "row0": tok.encode(docs[0], prepend=tok.get_bos_token_id())[:T + 1],
              # longer than the short window (half the context): windowed attention runs in prefill and decode
              "prompt": tok.encode(docs[2], prepend=tok.get_bos_token_id())[:40]}
    (workspace / "inputs.json").write_text(json.dumps(inputs))

# -----------------------------------------------------------------------------
# The recorder: runs inside a fresh process with one package root first on sys.path


def _tensor_dict(prefix, state):
    return {f"{prefix}{k}": v.detach().clone() for k, v in state.items() if hasattr(v, "detach")}


def _workspace_inputs(workspace):
    return json.loads((workspace / "inputs.json").read_text())


def _build_model(workspace, seed=1234, perturb=False):
    """Upstream's build: meta device -> to_empty -> init_weights. perturb adds seeded noise to
    every parameter (keyed by its name) so zero-initialised projections and the tiny lm_head
    init do not hide differences in forward, decoding or the optimizer."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=_workspace_inputs(workspace)["vocab_size"], **MODEL_CONFIG))
    model.to_empty(device=torch.device("cpu"))
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)
    return model


def _synthetic_grads(model, step, seed=31, scale=0.01):
    import torch
    for name, p in sorted(model.named_parameters()):
        g = torch.Generator().manual_seed(seed + 1000 * step + zlib.crc32(name.encode()) % 100000)
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float32) * scale).to(p.dtype)


def _inputs(workspace):
    """(B=2, T) ids: row 0 = BOS + corpus text, row 1 = random ids; targets shifted, a few ignored."""
    import torch
    inputs = _workspace_inputs(workspace)
    row0 = inputs["row0"]
    g = torch.Generator().manual_seed(5)
    row1 = torch.randint(0, inputs["vocab_size"], (len(row0),), generator=g).tolist()
    rows = torch.tensor([row0, row1], dtype=torch.long)
    idx, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    targets[1, :5] = -1  # ignored positions
    return idx, targets


CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3? Use the tool."},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute it. "},
        {"type": "python", "text": "2 + 3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "The answer is 5."},
    ]},
    {"role": "user", "content": "Thanks! And <|bos|> means what?"},
    {"role": "assistant", "content": "It starts a document."},
]}


def record_tokenizer(workspace):
    from nanochat.tokenizer import RustBPETokenizer, get_tokenizer, SPECIAL_TOKENS
    docs = json.loads((workspace / "corpus.json").read_text())
    trained = RustBPETokenizer.train_from_iterator(iter(docs), TOKENIZER_VOCAB)
    out = {"trained/vocab_size": trained.get_vocab_size(),
           "trained/token_bytes": [trained.decode_single_token_bytes(i).hex() for i in range(trained.get_vocab_size())],
           "SPECIAL_TOKENS": list(SPECIAL_TOKENS)}
    tok = get_tokenizer()
    texts = ["hello world", docs[1][:400], "  spaces\tand\nnewlines 12345 ", "not special: <|bos|><|user_start|>"]
    bos = tok.get_bos_token_id()
    out.update({
        "special_tokens": sorted(tok.get_special_tokens()),
        "special_ids": [tok.encode_special(s) for s in SPECIAL_TOKENS],
        "bos": bos,
        "encode": [tok.encode(t) for t in texts],
        "encode_batch": tok.encode(texts, prepend="<|user_start|>", append="<|user_end|>"),
        "encode_prepend_append": tok.encode(texts[0], prepend=bos, append="<|assistant_end|>"),
        "call": tok(texts[0]),
        "decode": tok.decode(tok.encode(texts[1])),
        "id_to_token": [tok.id_to_token(i) for i in (0, 100, 260)],
    })
    ids, mask = tok.render_conversation(CONVERSATION)
    out["render_conversation"] = [ids, mask]
    out["render_conversation_max_tokens"] = list(tok.render_conversation(CONVERSATION, max_tokens=30))
    out["render_for_completion"] = tok.render_for_completion(CONVERSATION)
    return out


def record_model_init(workspace):
    model = _build_model(workspace, seed=1234)
    out = _tensor_dict("state/", model.state_dict())
    out["dtypes"] = {k: str(v.dtype) for k, v in model.state_dict().items()}
    out["window_sizes"] = [list(w) if isinstance(w, tuple) else w for w in model.window_sizes]
    out["num_scaling_params"] = model.num_scaling_params()
    out["estimate_flops"] = model.estimate_flops()
    # newer accounting methods: an older upstream commit may lack some, which is then what differs
    for name, call_args in (("num_matmul_params", ()), ("estimate_decode_flops", (48,)), ("estimate_prefill_flops", (40,)),
                            ("kv_bytes_per_token", ()), ("kv_read_bytes", (48,))):
        method = getattr(model, name, None)
        out[f"api/{name}"] = method(*call_args) if callable(method) else "<no such method>"
    return out


def record_model_forward(workspace):
    import torch
    model = _build_model(workspace, perturb=True)
    model.eval()
    idx, targets = _inputs(workspace)
    with torch.no_grad():
        return {
            "logits": model(idx),
            "logits_short": model(idx[:, :20]),
            "loss_mean": model(idx, targets),
            "loss_none": model(idx, targets, loss_reduction="none"),
            "loss_sum": model(idx, targets, loss_reduction="sum"),
        }


def _optimizer_groups(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for i, group in enumerate(opt.param_groups):
        for key in sorted(group):
            value = group[key]
            out[f"group{i}/{key}"] = [names[id(p)] for p in value] if key == "params" else (list(value) if isinstance(value, tuple) else value)
    return out


def record_optimizer_step(workspace):
    model = _build_model(workspace, perturb=True)
    opt = model.setup_optimizer()
    out = _optimizer_groups(model, opt)
    for step in (0, 1):
        _synthetic_grads(model, step)
        opt.step()
        model.zero_grad(set_to_none=True)
        out.update({f"step{step + 1}/{n}": p.detach().clone() for n, p in model.named_parameters()})
    return out


def record_dataloader(workspace):
    from nanochat.tokenizer import get_tokenizer
    from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit, tokenizing_distributed_data_loader_bos_bestfit
    tok = get_tokenizer()
    kw = dict(tokenizer_batch_size=8, buffer_size=16, device="cpu")
    out, states = {}, []
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tok, 2, 32, "train", **kw)
    for i in range(4):
        x, y, state = next(loader)
        out[f"train{i}/inputs"], out[f"train{i}/targets"], out[f"train{i}/state"] = x, y, dict(state)
        states.append(dict(state))
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(tok, 2, 32, "train", resume_state_dict=states[1], **kw)
    for i in range(2):
        x, y, state = next(loader)
        out[f"resume{i}/inputs"], out[f"resume{i}/targets"], out[f"resume{i}/state"] = x, y, dict(state)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tok, 2, 32, "val", **kw)
    for i in range(2):
        x, y = next(loader)
        out[f"val{i}/inputs"], out[f"val{i}/targets"] = x, y
    return out


def record_engine(workspace):
    from nanochat.tokenizer import get_tokenizer
    from nanochat.engine import Engine
    tok = get_tokenizer()
    model = _build_model(workspace, perturb=True)
    model.eval()
    prompt = _workspace_inputs(workspace)["prompt"]
    engine = Engine(model, tok)
    out = {"greedy": [[list(col), list(masks)] for col, masks in engine.generate(prompt, num_samples=2, max_tokens=12, temperature=0.0)]}
    out["generate_batch"] = list(engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0))
    out["sampled"] = [[list(col), list(masks)] for col, masks in engine.generate(prompt, num_samples=3, max_tokens=10, temperature=0.8, top_k=20, seed=7)]
    out["naive"] = [int(t) for t in model.generate(prompt, max_tokens=12, temperature=0.0)]
    return out


def record_checkpoint_files(workspace):
    import torch
    from dataclasses import asdict
    from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, build_model
    model = _build_model(workspace, perturb=True)
    opt = model.setup_optimizer()
    _synthetic_grads(model, 0)
    opt.step()
    ckpt_dir = workspace / "base_checkpoints" / "d2"
    meta = {"step": 5, "model_config": asdict(model.config), "user_config": {"depth": 2}}
    save_checkpoint(str(ckpt_dir), 5, model.state_dict(), opt.state_dict(), meta, rank=0)
    # our manifest_XXXXXX.json is the checkpoint's commit marker (written last, see checkpoint_manager):
    # an addition beside upstream's files, not a difference in them
    out = {"files": sorted(p.name for p in ckpt_dir.iterdir() if not p.name.startswith("manifest_"))}
    out["meta"] = json.loads((ckpt_dir / "meta_000005.json").read_text())
    out.update(_tensor_dict("model_file/", torch.load(ckpt_dir / "model_000005.pt", map_location="cpu")))
    optim = torch.load(ckpt_dir / "optim_000005_rank0.pt", map_location="cpu")
    out["optim_file/param_groups"] = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
    for pid, st in sorted(optim["state"].items()):
        out.update(_tensor_dict(f"optim_file/state/{pid}/", st))
    model_data, optim_data, meta_data = load_checkpoint(str(ckpt_dir), 5, torch.device("cpu"), load_optimizer=True, rank=0)
    out["load_checkpoint/keys"] = sorted(model_data)
    out["load_checkpoint/meta"] = meta_data
    loaded, _, _ = build_model(str(ckpt_dir), 5, torch.device("cpu"), "eval")
    idx, _ = _inputs(workspace)
    with torch.no_grad():
        out["build_model/logits"] = loaded(idx)
    return out


def record_base_train_flags(workspace, root):
    """base_train's flags in their order, each with dest, default, action, type and choices,
    read statically (upstream's script trains at import, and may import packages missing here)."""
    specs = script_flag_specs(root / "scripts" / "base_train.py", root)
    out = {f"flag {flag}": spec for flag, spec in specs.items()}
    out["flag order"] = list(specs)
    return out


RECORDERS = {name: globals()[f"record_{name}"] for name in ITEMS}


def _one_line_error(exc):
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] != "nanochat":
        return f"needs package '{exc.name}', which is not installed here (pip install {exc.name.split('.')[0]})"
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}"


def run_recorder(root, workspace, out_dir, items):
    """Inside the child process: record each item into out_dir/ITEM.pkl (or ITEM.error)."""
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    if any(item not in STATIC_ITEMS for item in items):
        import torch
        torch.set_num_threads(2)
    import nanochat
    where = Path(nanochat.__file__ or next(iter(nanochat.__path__))).resolve()
    if root not in where.parents:
        raise SystemExit(f"nanochat resolved to {where}, not inside {root}")
    for item in items:
        try:
            kwargs = {"root": root} if item == "base_train_flags" else {}
            record = RECORDERS[item](workspace, **kwargs)
            with open(out_dir / f"{item}.pkl", "wb") as f:
                pickle.dump(record, f)  # tensors pickle through torch; flags-only records need no torch
        except BaseException as exc:  # noqa: BLE001 - one failing item must not stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            if os.environ.get("NANOCHAT_DEBUG") == "1":
                import traceback
                traceback.print_exc()
            (out_dir / f"{item}.error").write_text(_one_line_error(exc) + "\n")

# -----------------------------------------------------------------------------
# Comparison


def _is_tensor(value):
    torch = sys.modules.get("torch")  # unpickling a tensor imports torch; nothing else needs it
    return torch is not None and isinstance(value, torch.Tensor)


def _describe(value):
    if _is_tensor(value):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first_difference(a, b, atol, path=""):
    """None if upstream's value a and our value b agree, else a short description."""
    if _is_tensor(a) or _is_tensor(b):
        import torch
        if not (_is_tensor(a) and _is_tensor(b)):
            return f"{path}: upstream {_describe(a)}, ours {_describe(b)}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: upstream {_describe(a)}, ours {_describe(b)}"
        if a.is_floating_point():
            diff = (a.float() - b.float()).abs()
            worst = diff.max().item() if diff.numel() else 0.0
            if not worst <= atol:  # also catches NaN
                at = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), a.shape)) if a.dim() else ()
                return f"{path}: max |diff| {worst:.3g} at {at} (tolerance {atol:g})"
            return None
        if not torch.equal(a, b):
            at = tuple(int(i) for i in (a != b).nonzero()[0])
            return f"{path}: first differs at {at}: upstream {a[at].item()}, ours {b[at].item()}"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if key not in b:
                return f"{path}{'/' if path else ''}{key}: upstream has it, ours does not"
            d = first_difference(a[key], b[key], atol, f"{path}{'/' if path else ''}{key}")
            if d:
                return d
        for key in b:
            if key not in a:
                return f"{path}{'/' if path else ''}{key}: ours has it, upstream does not"
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, atol, f"{path}[{i}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}: upstream has {len(a)} entries, ours {len(b)}"
        return None
    if isinstance(a, float) and isinstance(b, float):
        if a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b)):
            return None
    elif a == b and type(a) is type(b):
        return None
    return f"{path}: upstream {_describe(a)}, ours {_describe(b)}"


def compare_item(item, up_dir, our_dir):
    """(same?, line) for one item."""
    for side, d in (("upstream", up_dir), ("ours", our_dir)):
        err = d / f"{item}.error"
        if err.exists():
            return False, f"{item}: cannot compare: {side}: {err.read_text().strip()}"
        if not (d / f"{item}.pkl").exists():
            return False, f"{item}: cannot compare: {side}: the recorder process died before this item (see {d / 'log.txt'})"
    with open(up_dir / f"{item}.pkl", "rb") as f:
        a = pickle.load(f)  # our own recorder wrote it, just now
    with open(our_dir / f"{item}.pkl", "rb") as f:
        b = pickle.load(f)
    atol = ATOL.get(item, 0.0)
    diffs = [d for d in (first_difference({k: a[k]}, {k: b[k]}, atol) if k in b else f"{k}: upstream has it, ours does not"
                         for k in a) if d]
    diffs += [f"{k}: ours has it, upstream does not" for k in b if k not in a]
    if not diffs:
        return True, f"{item}: same"
    more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
    return False, f"{item}: differs: {diffs[0]}{more}"

# -----------------------------------------------------------------------------
# Upstream-only files and flags (static: nothing is run)


def _literal(node):
    """The value of a default= expression made of literals and arithmetic (80*524288, -1.0, None)."""
    code = compile(ast.Expression(node), "<flag default>", "eval")
    if any(isinstance(n, (ast.Call, ast.Attribute, ast.Subscript, ast.Lambda)) for n in ast.walk(node)):
        return f"<expr {ast.unparse(node)}>"
    try:
        return eval(code, {"__builtins__": {}}, {})
    except Exception:  # a name we cannot resolve statically: compare the source text instead
        return f"<expr {ast.unparse(node)}>"


def script_flag_specs(script, root):
    """{longest option string: spec} for every add_argument call in a script, plus those of a
    build_parser() it imports from the same package root (ours keeps base_train's parser in
    nanochat/train.py). The spec is what argparse would make of the call: dest, default,
    action, type name, choices."""
    if not script.exists():
        return {}
    tree = ast.parse(script.read_text(), filename=str(script))
    sources = [tree]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "build_parser" for a in node.names):
            module = root / (node.module.replace(".", "/") + ".py")
            if module.exists():
                sources.append(ast.parse(module.read_text(), filename=str(module)))
    specs = {}
    for src in sources:
        calls = [n for n in ast.walk(src) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "add_argument"]
        for call in sorted(calls, key=lambda n: (n.lineno, n.col_offset)):
            options = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")]
            if not options:
                continue
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            action = _literal(kw["action"]) if "action" in kw else "store"
            flag = max(options, key=len)
            dest = _literal(kw["dest"]) if "dest" in kw else flag.lstrip("-").replace("-", "_")
            default = _literal(kw["default"]) if "default" in kw else (False if action == "store_true" else None)
            type_name = ast.unparse(kw["type"]) if "type" in kw else None
            choices = _literal(kw["choices"]) if "choices" in kw else None
            specs.setdefault(flag, {"dest": dest, "default": default, "action": action, "type": type_name,
                                    "choices": list(choices) if isinstance(choices, (list, tuple)) else choices})
    return specs


def script_flags(script, root):
    return list(script_flag_specs(script, root))


def upstream_only(upstream, ours):
    lines = []
    for top in TRACKED_DIRS:
        if not (upstream / top).is_dir():
            continue
        for path in sorted((upstream / top).rglob("*")):
            rel = path.relative_to(upstream)
            if path.is_file() and "__pycache__" not in rel.parts and not (ours / rel).exists():
                lines.append(f"upstream-only: {rel}")
    for script in sorted((upstream / "scripts").glob("*.py")):
        ours_script = ours / "scripts" / script.name
        if not ours_script.exists():
            continue  # already listed as a file
        have = set(script_flags(ours_script, ours))
        for flag in script_flags(script, upstream):
            if flag not in have:
                lines.append(f"upstream-only: scripts/{script.name} {flag}")
    return lines

# -----------------------------------------------------------------------------
# Driver


def upstream_commit(upstream):
    try:
        res = subprocess.run(["git", "-C", str(upstream), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 else "unknown (not a git checkout)"


def check_checkout(upstream):
    if not upstream.is_dir():
        raise CheckError(f"--upstream {upstream} is not a directory; pass a checkout of karpathy/nanochat")
    missing = [m for m in CHECKOUT_MARKERS if not (upstream / m).is_file()]
    if missing:
        raise CheckError(f"--upstream {upstream} is not an upstream nanochat checkout (no {', '.join(missing)}); "
                         f"pass the directory that holds nanochat/ and scripts/ (git clone https://github.com/karpathy/nanochat)")


def record_side(root, workspace, out_dir, items, eager):
    """Run the recorder for one package root in a fresh process, on its own copy of the workspace."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ws = out_dir / "workspace"
    shutil.copytree(workspace, ws)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_DTYPE")}
    # no __pycache__ written into either checkout
    env.update(NANOCHAT_BASE_DIR=str(ws), CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0", WANDB_MODE="disabled",
               PYTHONDONTWRITEBYTECODE="1")
    if eager:
        env["TORCHDYNAMO_DISABLE"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--record", str(root), "--workspace", str(ws),
           "--record-out", str(out_dir), "--items", ",".join(items)]
    # cwd: the workspace, so neither checkout is importable by accident through the working directory
    with open(out_dir / "log.txt", "w") as log:
        res = subprocess.run(cmd, cwd=ws, env=env, stdout=log, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = (out_dir / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
        for item in items:
            if not (out_dir / f"{item}.pkl").exists() and not (out_dir / f"{item}.error").exists():
                (out_dir / f"{item}.error").write_text(f"recorder exited {res.returncode}: {tail[0][:300]}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare our nanochat with an upstream checkout, item by item")
    parser.add_argument("--upstream", type=str, help="checkout of karpathy/nanochat at the commit to compare with")
    parser.add_argument("--out", type=str, default=None, help="keep recordings, workspace and logs here (default: a temp dir, removed)")
    parser.add_argument("--items", type=str, default=",".join(ITEMS), help=f"comma-separated subset of: {','.join(ITEMS)}")
    parser.add_argument("--eager", action="store_true", help="run both sides without torch.compile (faster on CPU)")
    parser.add_argument("--ours", type=str, default=str(OUR_ROOT), help=argparse.SUPPRESS)  # tests point this at a copy
    # the child-process side (internal)
    parser.add_argument("--record", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record-out", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    items = [s.strip() for s in args.items.split(",") if s.strip()]
    unknown = [s for s in items if s not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)}")
    if args.record:
        run_recorder(args.record, Path(args.workspace), Path(args.record_out), items)
        return 0
    if not args.upstream:
        parser.error("--upstream DIR is required (a checkout of karpathy/nanochat)")

    upstream, ours = Path(args.upstream).resolve(), Path(args.ours).resolve()
    check_checkout(upstream)
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="upstream_check_"))
    if args.out and out.exists() and any(out.iterdir()):
        raise CheckError(f"--out {out} is not empty; pass a new or empty directory")
    try:
        print(f"upstream: {upstream} at {upstream_commit(upstream)}")
        print(f"ours:     {ours}")
        workspace = out / "workspace"
        workspace.mkdir(parents=True)
        if any(item not in STATIC_ITEMS for item in items):
            build_workspace(workspace)
        record_side(upstream, workspace, out / "upstream", items, args.eager)
        record_side(ours, workspace, out / "ours", items, args.eager)
        n_same = 0
        for item in items:
            same, line = compare_item(item, out / "upstream", out / "ours")
            n_same += same
            print(line)
        extra = upstream_only(upstream, ours)
        for line in extra:
            print(line)
        print(f"upstream_check: {n_same}/{len(items)} same, {len(extra)} upstream-only")
        return 0 if n_same == len(items) and not extra else 1
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as e:
        if os.environ.get("NANOCHAT_DEBUG") == "1":
            raise
        print(f"upstream_check: {e}", file=sys.stderr)
        sys.exit(2)
