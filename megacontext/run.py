"""
Stream a document through the MegaContext runtime: tree on disk, refocus every K tokens,
the nanochat GPT reading (and optionally continuing) it over the Working Context.

    python -m megacontext.run --config configs/runtime_cpu.yaml --input FILE [--key=value ...]

Every config key can be overridden on the command line (--key=value or --key value); --help
lists them with their defaults:

    source, model_tag, step     the base checkpoint (base_checkpoints/<model_tag>, last step by default)
    gistnet                     'mean' (mean-pool baseline), a JT1 run's model tag (its last
                                mc_XXXXXX.pt) or the path of one
    lensnet                     a JT2 run's model tag or mc file; null = frozen focus (the WC only
                                keeps its budget, oldest entries collapsing first)
    allocator                   megacontext.allocator.AllocatorConfig fields ({} = its defaults)
    budget_tokens, refocus_every  W and K
    refocus_rounds              LensNet + allocator rounds per refocus (runtime.Focus; default 1)
    memory                      the tree directory: created if missing, continued if it holds a
                                tree (from megacontext.ingest or an earlier run) of the same base
                                model and GistNet; default $NANOCHAT_BASE_DIR/megacontext/memory/<run_name>
    generate, temperature, top_k, seed   tokens to generate after the input, and how
    bos                         auto (a BOS before the input when the tree already holds a
                                document) | true | false
    run_name                    telemetry file: $MEGACONTEXT_ARTIFACT_ROOT/run_logs/<run_name>-<time>.jsonl

While it reads, one status line is rewritten in place (tokens held, WC entries by LOD and
its cost, swap rate, residency, tok/s); at the end it prints the stream's NLL as the model
predicted it through the WC, the generated text, the telemetry summary and the path of the
telemetry file. Bad input is one 'error:' line (exit 1; NANOCHAT_DEBUG=1 for the traceback):
a missing or empty input, an unknown config key (exit 2, before torch is imported), a missing
checkpoint, GistNet or LensNet, a tree made for another model or GistNet, or a tree another
process is writing. Ctrl-C or a kill leaves the tree consistent (every refocus commits).

This module is the command line only; the loop is megacontext/runtime.py.
"""

import os
import sys
import time

import yaml

DEFAULTS = {
    "source": "base",
    "model_tag": "longctx_cpu",
    "step": None,
    "checkpoint_dir": None,
    "model_name": None,
    "gistnet": "longctx_cpu_gistnet",
    "lensnet": None,
    "allocator": {},
    "budget_tokens": 128,
    "refocus_every": 32,
    "refocus_rounds": 1,
    "memory": None,
    "device_type": "",
    "generate": 0,
    "temperature": 0.0,
    "top_k": None,
    "seed": 42,
    "bos": "auto",
    "encoding": "utf-8",
    "run_name": "runtime",
}


def _coerce(key, value):
    """A command-line string as the type of the key's default (None defaults read as YAML)."""
    like = DEFAULTS[key]
    if key == "bos":  # auto | true | false, from YAML (a bool) or the command line (a string)
        return {"true": True, "false": False}.get(str(value).lower(), value) if not isinstance(value, bool) else value
    if isinstance(value, str) and not isinstance(like, str):
        value = yaml.safe_load(value)
    if isinstance(like, bool) or like is None or value is None:
        return value
    if isinstance(like, (int, float)) and not isinstance(value, bool):
        try:
            return type(like)(value)
        except (TypeError, ValueError):
            pass
    if not isinstance(value, type(like)):
        raise ValueError(f"config key '{key}' expects {type(like).__name__}, got {value!r}")
    return value


def parse_args(argv):
    """argv -> (config, input path). Exits 2 on an unknown key, before torch is imported."""
    from megacontext.flags import split_argv, read_config_file
    cfg = dict(DEFAULTS)
    try:
        overrides, named = split_argv(argv, __doc__, DEFAULTS, {"config": None, "input": None})
        if named["config"] is not None:
            overrides = {**read_config_file(named["config"], example="configs/runtime_cpu.yaml"), **overrides}
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    input_path = named["input"]
    for key, value in overrides.items():
        if key not in DEFAULTS:
            print(f"error: unknown config key '{key}'; known keys: {', '.join(DEFAULTS)}", file=sys.stderr)
            sys.exit(2)
        try:
            cfg[key] = _coerce(key, value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if cfg["bos"] not in ("auto", True, False):
        print(f"error: bos must be auto, true or false, got {cfg['bos']!r}", file=sys.stderr)
        sys.exit(2)
    if input_path is None:
        print("error: --input FILE is required (the text to stream through the runtime)", file=sys.stderr)
        sys.exit(2)
    return cfg, input_path


def status_line(rt, tokens_read, t0):
    """Tokens held, the last refocus's WC by LOD and its cost (+ tokens appended since), its swap
    rate and residency, and the tokens read per second so far."""
    wc, last = rt.wc, rt.last
    counts = [int((wc.levels == lv).sum()) for lv in range(3)]
    swap, resid = last.get("swap_rate"), last.get("residency")
    rate = tokens_read / max(time.time() - t0, 1e-9)
    return (f"{rt.history_len:,} tokens | WC {counts[0]}/{counts[1]}/{counts[2]} LOD0/1/2, cost {wc.cost}/"
            f"{rt.budget_tokens} (+{rt.history_len - wc.history_len} new) | swap rate "
            f"{'-' if swap is None else f'{swap:.3f}'} | residency {'-' if resid is None else f'{resid:.1%}'} | "
            f"{rate:,.0f} tok/s")


def resolve_gistnet(spec):
    """'mean', or a JT1 run's model tag / mc file -> the path megacontext.ingest.load_gister reads."""
    if spec == "mean":
        return "mean"
    from megacontext.eval import resolve_gistnet as resolve
    return resolve(spec)


def run(cfg, input_path):
    from megacontext.ingest import check_texts, read_pieces
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"input file {input_path} does not exist")
    check_texts([input_path], cfg["encoding"])  # not text, or empty: one line, before torch

    import numpy as np
    import torch
    from nanochat.common import autodetect_device_type, get_base_dir
    from megacontext.ingest import load_base_model, load_gister
    from megacontext.runtime import MegaContextRuntime, open_tree
    from megacontext.telemetry import Telemetry

    device = torch.device(cfg["device_type"] or autodetect_device_type())
    model, tokenizer, model_name = load_base_model(cfg, device)
    gistnet = load_gister(resolve_gistnet(cfg["gistnet"]), model.config.n_embd, device)
    lensnet = allocator = None
    if cfg["lensnet"]:
        from megacontext.allocator import AllocatorConfig, FocusAllocator
        from megacontext.lensnet import load_lensnet
        lensnet = load_lensnet(cfg["lensnet"], model.config.n_embd, device)  # a model tag or an mc file
        allocator = FocusAllocator(AllocatorConfig(**(cfg["allocator"] or {})))
    memory = cfg["memory"] or os.path.join(get_base_dir(), "megacontext", "memory", cfg["run_name"])
    tree = open_tree(memory, model, gistnet, model_name)
    telemetry = Telemetry(cfg["run_name"], config=dict(cfg, memory=str(memory), input=os.path.abspath(input_path)))
    try:
        rt = MegaContextRuntime(model, tokenizer, tree, budget_tokens=cfg["budget_tokens"],
                                refocus_every=cfg["refocus_every"], lensnet=lensnet, allocator=allocator,
                                telemetry=telemetry, refocus_rounds=cfg["refocus_rounds"])
        focus = "LensNet + allocator" if lensnet is not None else "frozen (no LensNet)"
        print(f"memory {memory}: {rt.history_len:,} tokens held; W = {rt.budget_tokens}, K = {rt.refocus_every}, "
              f"focus {focus}, GistNet {gistnet.identity()}")
        bos = tokenizer.get_bos_token_id()
        prepend = cfg["bos"] is True or (cfg["bos"] == "auto" and rt.history_len > 0)
        nll, read, t0, shown = 0.0, 0, time.time(), 0.0
        K = rt.refocus_every
        for text, _ in read_pieces(input_path, cfg["encoding"]):
            ids = np.asarray(([bos] if prepend else []) + tokenizer.encode(text), dtype=np.int64)
            prepend = False
            for a in range(0, len(ids), K):
                nll += rt.feed(ids[a:a + K], score=True)
                read += len(ids[a:a + K])
                if time.time() - shown > 0.2:
                    print("\r" + status_line(rt, read, t0), end="", flush=True)
                    shown = time.time()
        print("\r" + status_line(rt, read, t0), flush=True)
        print(f"read {read:,} tokens: NLL {nll / max(read, 1):.4f} nats/token through the working context")
        if cfg["generate"] > 0:
            out = list(rt.generate(cfg["generate"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                                   seed=cfg["seed"]))
            print(f"generated {len(out)} tokens: {tokenizer.decode(out)!r}")
        rt.close()
    finally:
        tree.close()
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = telemetry.close()
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    print(f"summary: {summary['refocuses']} refocuses, swap rate {fmt(summary['swap_rate'], '.3f')}, residency "
          f"{fmt(summary['residency'], '.1%')}, budget utilization {fmt(summary['budget_utilization'], '.1%')}, "
          f"refocus {fmt(summary['refocus_ms_mean'], '.2f')} ms, slots recomputed per refocus "
          f"{fmt(summary['recomputed_share'], '.1%')}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"telemetry: {telemetry.path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg, input_path = parse_args(argv)
    try:
        run(cfg, input_path)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        if os.environ.get("NANOCHAT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the tree keeps everything committed up to the last refocus", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
