"""
The MegaContext chat (megacontext/memory_chat.py), measured: reply latency, decode tok/s and
RSS with a small and a huge memory side by side, and the time to resume a memory dir.

    python -m scripts.bench_memory_chat perf [--sizes 1000,1000000] [--rounds 2] [--replies 4] [--record]
    python -m scripts.bench_memory_chat quality [--cases 8] [--ratios 8,32] [--record]

Each run is a fresh process that opens a copy of the memory dir (the resume time: tree open +
the runtime's first refocus and prefill, model loading excluded), then answers --replies
messages of ~20 tokens with --max-tokens tokens each (greedy). Sizes alternate round by round,
so load on a shared machine hits both alike. The memories are built first from CPython's
stdlib sources through the session's own --ingest path.

Models. With the CPU preset's trained models in $NANOCHAT_BASE_DIR (longctx_cpu, its GistNet
and LensNet) it uses them; with --random (or when they are missing) it uses random weights of
the same shapes (testbed GPT d4 x 256, GistNet 1 layer, LensNet 2 x 64): cost does not depend
on the weights. The tokenizer is the preset's.

quality: the testbed's synthetic tasks (megacontext/synthetic.py: passkey, needle) delivered as
chat to the CPU preset's trained models, text rendering (the testbed is a base model): the history
with the fact (filler from held-out test documents) reaches memory either as an ingested document
(`--ingest`) or as user turns of ~96 tokens, each answered with a 4-token continuation (the fact in
the first turns at depths 0.1-0.5, so at 8 x W it is 4-7 windows back); then the question is the
last message. The same token stream memory holds then goes to three readers, greedy:
  memory    the MegaContext chat: W = 128 through GistNet + LensNet + allocator (its reply)
  recency   the model on the last W tokens only (the same window, no memory)
  full      the model on the whole stream, where it fits the model's sequence_len (else absent)
Accuracy = the continuation starts with the answer.

Targets (issue 11): reply latency and decode tok/s within 10% between 1k and 1M tokens in
memory, RSS flat in memory size, resume of a 1M-token memory dir under 2 s.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_common import add_record_flag, describe_machine, git_commit, load_average, machine_line, \
    record_section, rss_mib, run_cli, REPO_ROOT  # noqa: E402

QUESTION = "What did the text say about the first function it defined, and why?"


def stdlib_text(n_bytes):
    """CPython's stdlib sources, in sorted path order, until n_bytes of text."""
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= n_bytes:
            break
    return "".join(parts)[:n_bytes]


def build_models(work, random_weights):
    """(settings, section) for a session: the preset's trained models, or random ones saved in work."""
    import torch
    from nanochat.common import get_base_dir
    from megacontext.gistnet import GistNet, GistNetConfig
    from megacontext.lensnet import LensNet, LensNetConfig
    base = Path(get_base_dir())
    trained = all((base / "base_checkpoints" / t).is_dir() for t in ("longctx_cpu", "longctx_cpu_gistnet",
                                                                     "longctx_cpu_lensnet"))
    section = {"chat": True, "budget_tokens": 128, "refocus_every": 32, "allocator": {"tau_expand": 0.0},
               "render": "text", "run_name": "bench_memory_chat"}
    if trained and not random_weights:
        return "trained", dict(section, gistnet="longctx_cpu_gistnet", lensnet="longctx_cpu_lensnet")
    torch.manual_seed(0)
    gistnet = GistNet(GistNetConfig(n_embd=256, n_layer=1, n_head=4, head="attention"))
    gistnet.init_weights(seed=0)
    lensnet = LensNet(LensNetConfig(n_embd=256, d_model=64, n_layer=2, n_head=4), gistnet_identity=gistnet.identity())
    lensnet.init_weights(seed=0)
    torch.save({"gistnet": {"config": vars(gistnet.config), "state_dict": gistnet.state_dict()}}, work / "gistnet.pt")
    torch.save({"lensnet": {"config": vars(lensnet.config), "state_dict": lensnet.state_dict()},
                "gistnet_identity": gistnet.identity()}, work / "lensnet.pt")
    return "random", dict(section, gistnet=str(work / "gistnet.pt"), lensnet=str(work / "lensnet.pt"))


def load_engine(kind):
    """The testbed checkpoint, or a random GPT of its shape (configs/longctx_cpu.yaml)."""
    import torch
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    if kind == "trained":
        from nanochat.checkpoint_manager import load_model
        model, tokenizer, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag="longctx_cpu")
        return Engine(model, tokenizer), None
    from nanochat.gpt import GPT, GPTConfig
    tokenizer = get_tokenizer()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=1088, vocab_size=tokenizer.get_vocab_size(), n_layer=4, n_head=4,
                              n_kv_head=4, n_embd=256, window_pattern="L"))
    model.to_empty(device=torch.device("cpu"))
    model.init_weights()
    return Engine(model.eval(), tokenizer), "bench:random-d4"


def session(engine, section, memory, model_name):
    from nanochat import chat
    from megacontext.memory_chat import MemoryChatSession, MemoryChatVariant
    settings = chat.validate_settings(dict(chat.DEFAULTS, source="base", model_tag="longctx_cpu", device_type="cpu",
                                           temperature=0.0, top_k=0, max_tokens=32))
    config = MemoryChatVariant(dict(section, memory=str(memory))).config
    return MemoryChatSession(engine, settings, config, model_name=model_name)


def child(args):
    """One measured run: resume the memory, answer --replies messages; prints one JSON line."""
    section = json.loads(args.section)
    engine, model_name = load_engine(args.kind)
    t0 = time.perf_counter()
    sess = session(engine, section, args.memory, model_name)
    resume_s = time.perf_counter() - t0
    sess.max_tokens = args.max_tokens
    latencies, rates, tokens = [], [], 0
    for _ in range(args.replies):
        t0 = time.perf_counter()
        sess.add_user_message(QUESTION)
        t1 = time.perf_counter()
        n = len(engine.tokenizer.encode("".join(sess.stream_reply())))
        t2 = time.perf_counter()
        latencies.append(t2 - t0)
        rates.append(n / max(t2 - t1, 1e-9))
        tokens += n
    held = sess.history_tokens
    sess.close()
    print(json.dumps({"resume_s": resume_s, "latency_s": sorted(latencies)[len(latencies) // 2],
                      "decode_tok_s": sorted(rates)[len(rates) // 2], "rss_mib": rss_mib()[0], "held": held,
                      "reply_tokens": tokens}))


def perf(args):
    import torch
    from nanochat.common import get_base_dir
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_memory_chat_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        kind, section = build_models(work, args.random)
        engine, model_name = load_engine(kind)
        print(f"models: {kind} ({get_base_dir()}); memory sizes {sizes}; building memories from CPython's stdlib",
              flush=True)
        built = {}
        for n in sizes:
            if (work / f"memory_{n}" / "built.json").exists():  # --work kept it from an earlier run
                built[n] = tuple(json.loads((work / f"memory_{n}" / "built.json").read_text()))
                print(f"  memory of {built[n][0]:,} tokens (kept in {work})", flush=True)
                continue
            shutil.rmtree(work / f"memory_{n}", ignore_errors=True)
            text_path = work / f"text_{n}.txt"
            text = stdlib_text(n * 6)  # ~3-4 bytes per token on this tokenizer: then cut to n tokens
            ids = engine.tokenizer.encode(text)[:n]
            text_path.write_text(engine.tokenizer.decode(ids))
            t0 = time.perf_counter()
            sess = session(engine, dict(section, ingest=str(text_path)), work / f"memory_{n}", model_name)
            built[n] = (sess.history_tokens, time.perf_counter() - t0)
            sess.close()
            (work / f"memory_{n}" / "built.json").write_text(json.dumps(built[n]))
            print(f"  memory of {built[n][0]:,} tokens built in {built[n][1]:.1f} s "
                  f"({built[n][0] / built[n][1]:,.0f} tok/s ingest)", flush=True)
        results = {n: [] for n in sizes}
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        for r in range(args.rounds):
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                copy = work / f"run_{n}"
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(work / f"memory_{n}", copy)
                out = subprocess.run([sys.executable, "-m", "scripts.bench_memory_chat", "child", "--kind", kind,
                                      "--section", json.dumps(section), "--memory", str(copy),
                                      "--replies", str(args.replies), "--max-tokens", str(args.max_tokens)],
                                     env=env, capture_output=True, text=True, cwd=REPO_ROOT)
                if out.returncode != 0:
                    raise RuntimeError(f"the measured run failed: {out.stderr.strip().splitlines()[-1]}")
                results[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  round {r + 1}: {n:,} tokens: {results[n][-1]}", flush=True)
    finally:
        if args.work:  # keep the built memories for the next run, drop the copies
            for n in sizes:
                shutil.rmtree(work / f"run_{n}", ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    best = lambda n, key, f: f(x[key] for x in results[n])
    rows = []
    for n in sizes:
        rows.append((n, built[n][0], best(n, "resume_s", min), best(n, "latency_s", min),
                     best(n, "decode_tok_s", max), best(n, "rss_mib", max)))
    lines = ["| memory (tokens) | resume (s) | reply latency (s) | decode tok/s | RSS (MiB) |", "|---|---|---|---|---|"]
    for n, held, resume, latency, rate, rss in rows:
        lines.append(f"| {held:,} | {resume:.2f} | {latency:.2f} | {rate:,.1f} | {rss:,.0f} |")
    small, large = rows[0], rows[-1]
    verdict = (f"largest vs smallest: reply latency x{large[3] / small[3]:.3f}, decode tok/s x{large[4] / small[4]:.3f}, "
               f"RSS {large[5] - small[5]:+,.0f} MiB; resume of {large[1]:,} tokens {large[2]:.2f} s")
    print("\n".join(lines))
    print(verdict)
    if args.record:
        info = describe_machine(sys.executable)
        section_md = (f"## MegaContext chat: reply latency and resume vs memory size ({time.strftime('%Y-%m-%d')})\n\n"
                      f"`python -m scripts.bench_memory_chat perf --sizes {args.sizes} --rounds {args.rounds} "
                      f"--replies {args.replies}{' --random' if args.random else ''}` at commit "
                      f"{git_commit(REPO_ROOT)}, {machine_line(info)}, load average {load_average()}; models: {kind}; "
                      f"W = 128, K = 32, {args.max_tokens}-token greedy replies, best of {args.rounds} runs each, "
                      f"{torch.get_num_threads()} torch thread(s).\n\n"
                      + "\n".join(lines) + f"\n\n{verdict}.\n")
        record_section(section_md)


def greedy(engine, prompt, n):
    tokens = []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0, seed=0):
        tokens.append(column[0])
    return tokens


def deliver(sess, tokenizer, case, how, work, turn_tokens=96, turn_reply=4):
    """Put the case's history (without its BOS and question) into memory; returns the question text."""
    q = case.extra["question_start"]
    body = case.history[1:q].tolist()
    if how == "document":
        path = work / "history.txt"
        path.write_text(tokenizer.decode(body))
        sess.ingest(str(path))
    else:
        max_tokens = sess.max_tokens
        sess.max_tokens = turn_reply
        for a in range(0, len(body), turn_tokens):
            sess.add_user_message(tokenizer.decode(body[a:a + turn_tokens]))
            "".join(sess.stream_reply())
        sess.max_tokens = max_tokens
    return tokenizer.decode(case.history[q:].tolist())


def quality(args):
    import random
    import torch
    from nanochat.common import get_base_dir
    from megacontext.longdocs import load_corpus
    from megacontext.synthetic import make_case
    work = Path(tempfile.mkdtemp(prefix="bench_memory_chat_q_"))
    kind, section = build_models(work, False)
    if kind != "trained":
        raise FileNotFoundError(f"quality needs the CPU preset's trained models in {get_base_dir()} (longctx_cpu, "
                                f"longctx_cpu_gistnet, longctx_cpu_lensnet): run NANOCHAT_PRESET=cpu bash speedrun.sh")
    engine, model_name = load_engine(kind)
    tokenizer, W = engine.tokenizer, section["budget_tokens"]
    seq_len = engine.model.config.sequence_len
    corpus = load_corpus(tokenizer, "test")
    rng = random.Random(args.seed)
    ratios = [int(r) for r in args.ratios.split(",")]
    tally = {}  # (task, delivery, ratio) -> {method: [hits, n]}
    t0 = time.time()
    try:
        for ratio in ratios:
            for task in args.tasks.split(","):
                for how in ("document", "turns"):
                    cell = tally.setdefault((task, how, ratio), {m: [0, 0] for m in ("memory", "recency", "full")})
                    for i in range(args.cases):
                        case = make_case(task, rng, tokenizer, corpus, ratio * W, depth=0.1 + 0.4 * i / max(1, args.cases - 1))
                        answer = tokenizer.decode(case.answer.tolist())
                        mem_dir = work / f"mem_{ratio}_{task}_{how}_{i}"
                        sess = session(engine, section, mem_dir, model_name)
                        sess.max_tokens = case.answer_len + 2
                        question = deliver(sess, tokenizer, case, how, work)
                        sess.add_user_message(question)
                        stream = [tokenizer.get_bos_token_id()] + sess.tree.tokens().tolist()
                        replies = {"memory": "".join(sess.stream_reply())}
                        sess.close()
                        shutil.rmtree(mem_dir, ignore_errors=True)
                        n = case.answer_len + 2
                        with torch.no_grad():
                            replies["recency"] = tokenizer.decode(greedy(engine, stream[:1] + stream[-W:], n))
                            if len(stream) + n <= seq_len:
                                replies["full"] = tokenizer.decode(greedy(engine, stream, n))
                        for method, text in replies.items():
                            cell[method][0] += text.strip().startswith(answer)
                            cell[method][1] += 1
                    fmt = lambda m: f"{cell[m][0]}/{cell[m][1]}" if cell[m][1] else "-"
                    print(f"{task:8s} {how:8s} {ratio:3d}W: memory {fmt('memory')}, recency {fmt('recency')}, "
                          f"full {fmt('full')} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acc = lambda c, m: f"{c[m][0] / c[m][1]:.2f} ({c[m][0]}/{c[m][1]})" if c[m][1] else "— (does not fit)"
    lines = ["| task | delivered as | history | memory (MegaContext, W=128) | recency (last W only) | full context |",
             "|---|---|---|---|---|---|"]
    for (task, how, ratio), c in tally.items():
        lines.append(f"| {task} | {'ingested document' if how == 'document' else 'chat turns'} | {ratio}W = "
                     f"{ratio * W:,} tokens | {acc(c, 'memory')} | {acc(c, 'recency')} | {acc(c, 'full')} |")
    print("\n".join(lines))
    if args.record:
        info = describe_machine(sys.executable)
        record_section(f"## MegaContext chat: synthetic tasks delivered as chat ({time.strftime('%Y-%m-%d')})\n\n"
                       f"`python -m scripts.bench_memory_chat quality --cases {args.cases} --ratios {args.ratios} "
                       f"--tasks {args.tasks}` at commit {git_commit(REPO_ROOT)}, {machine_line(info)}; the CPU "
                       f"preset's testbed, GistNet and LensNet ({get_base_dir()}); greedy; facts at depths 0.1-0.5.\n\n"
                       + "\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_record_flag(sub.add_parser("perf", help="latency, decode tok/s, RSS and resume time vs memory size"))
    p.add_argument("--sizes", default="1000,1000000", help="memory sizes in tokens, comma-separated (default 1000,1000000)")
    p.add_argument("--rounds", type=int, default=2, help="measured runs per size, alternating (default 2)")
    p.add_argument("--replies", type=int, default=4, help="replies per run; the median is kept (default 4)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (default 32)")
    p.add_argument("--work", default=None, help="keep the built memories in this dir and reuse them on the next run "
                                                 "(default: a temp dir, removed)")
    p.add_argument("--random", action="store_true", help="random weights of the testbed's shapes even when "
                                                          "trained models exist")
    q = add_record_flag(sub.add_parser("quality", help="answer accuracy: memory vs recency vs full context"))
    q.add_argument("--cases", type=int, default=8, help="cases per task x delivery x ratio (default 8)")
    q.add_argument("--ratios", default="8,32", help="history lengths in windows W, comma-separated (default 8,32)")
    q.add_argument("--tasks", default="passkey,needle", help="synthetic tasks (default passkey,needle)")
    q.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("child", help=argparse.SUPPRESS)
    c.add_argument("--kind", required=True)
    c.add_argument("--section", required=True)
    c.add_argument("--memory", required=True)
    c.add_argument("--replies", type=int, default=4)
    c.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "perf" and (args.rounds < 1 or args.replies < 1):
        parser.error("--rounds and --replies must be at least 1")
    {"perf": perf, "quality": quality, "child": child}[args.command](args)


if __name__ == "__main__":
    run_cli(main)
