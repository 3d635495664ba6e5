"""
megacontext/memory_chat.py: the MegaContext chat session over the fixture d2 model (a real
tokenizer with the chat tokens) and a mean-pool GistNet.

With a budget that holds the whole conversation and a frozen focus, a reply through memory is
exactly the plain ChatSession's reply; memory persists across sessions; typed special-token
literals stay text; /memory and /forget; ingest (skips what memory has); a memory dir from
another model, one another chat holds, a failed write and a SIGKILL mid-ingest.

python -m pytest tests/test_memory_chat.py -q
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nanochat import chat, hooks
from megacontext.memory_chat import MemoryChatVariant
from megacontext.tree import MegaContextTree

REPO = Path(__file__).resolve().parent.parent


def settings(**kw):
    base = dict(chat.DEFAULTS, source="base", model_tag="d2", device_type="cpu", temperature=0.0, top_k=0,
                max_tokens=8)
    return chat.validate_settings({**base, **kw})


def section(memory, **kw):
    return {"chat": True, "gistnet": "mean", "lensnet": None, "budget_tokens": 96, "refocus_every": 32,
            "memory": str(memory), "render": "chat", **kw}


@pytest.fixture
def engine(fixture_base_dir):
    return chat.load_engine(settings())


def session(engine, memory, s=None, **kw):
    variant = hooks.get_variant("megacontext", section(memory, **kw))
    assert isinstance(variant, MemoryChatVariant)
    return chat.build_session(engine, s or settings(), variant)


def reply(sess, text):
    sess.add_user_message(text)
    return "".join(sess.stream_reply())


def test_a_reply_through_memory_is_the_plain_sessions_reply_when_all_fits(engine, tmp_path):
    mem = session(engine, tmp_path / "mem")
    plain = chat.ChatSession.from_config(engine, settings())
    for text in ("Hello there", "And then?"):
        assert reply(mem, text) == reply(plain, text)
    assert mem.messages == plain.messages
    mem.close()
    # memory on disk holds exactly the rendered conversation (after the runtime's own BOS in slot 0)
    tree = MegaContextTree.open(tmp_path / "mem", readonly=True)
    stored = tree.tokens().tolist()
    tree.close()
    assert stored == plain.render_prompt()[1:-1]  # every turn closed as the format closes it


def test_memory_persists_and_the_next_chat_continues_the_conversation(engine, tmp_path):
    first = session(engine, tmp_path / "mem")
    reply(first, "My name is Ada.")
    held = first.history_tokens
    first.close()
    second = session(engine, tmp_path / "mem")
    assert second.history_tokens == held and second.messages == []
    plain = chat.ChatSession.from_config(engine, settings())
    plain.load_messages([{"role": "user", "content": "My name is Ada."}, first.messages[1]])
    assert reply(second, "What is my name?") == reply(plain, "What is my name?")
    second.close()


def test_typed_special_token_literals_stay_text_in_memory(engine, tmp_path):
    mem = session(engine, tmp_path / "mem")
    mem.add_user_message("<|bos|><|assistant_end|>")
    stored = mem.tree.tokens().tolist()
    tok = engine.tokenizer
    assert stored == [mem.user_start, *tok.encode("<|bos|><|assistant_end|>"), mem.user_end]
    assert tok.get_bos_token_id() not in stored
    mem.close()


def test_memory_and_forget_commands(engine, tmp_path):
    mem = session(engine, tmp_path / "mem")
    reply(mem, "Remember the number 7.")
    held = mem.history_tokens
    report = mem.command("/memory")
    assert f"{held:,} tokens held" in report and "working context:" in report and "frozen" in report
    assert mem.command("hello") is None  # a message, not a command
    assert "unknown command /nope" in mem.command("/nope")
    assert "type yes to confirm" in mem.command("/forget")
    assert mem.command("no") == "memory kept" and mem.history_tokens == held
    mem.command("/forget")
    assert mem.command("yes").startswith(f"memory cleared: {held:,} tokens removed")
    assert mem.history_tokens == 0 and not any("forgotten" in p.name for p in tmp_path.iterdir())
    assert reply(mem, "Hi") is not None and mem.history_tokens > 0  # memory works after forgetting
    mem.close()


def test_composition_covers_the_history_the_reply_read(engine, tmp_path):
    mem = session(engine, tmp_path / "mem", budget_tokens=64)
    for i in range(4):
        reply(mem, f"Turn number {i} says something about the weather and the sea.")
    comp = mem.composition()
    assert comp["budget_tokens"] == 64 and sum(r["covers"] for r in comp["runs"]) == comp["history_tokens"]
    assert {r["level"] for r in comp["runs"]} >= {0, 1}  # past the budget: old blocks are gists now
    assert all(a["level"] != b["level"] for a, b in zip(comp["runs"], comp["runs"][1:]))
    mem.close()


def test_ingest_adds_documents_once_with_a_progress_bar(engine, tmp_path, capsys):
    doc = tmp_path / "book.txt"
    doc.write_text("It was a bright cold day in April. " * 40)
    mem = session(engine, tmp_path / "mem", ingest=str(doc), render="text")
    n = len(engine.tokenizer.encode(doc.read_text()))
    assert mem.history_tokens == n  # the first document needs no BOS: the runtime's slot 0 is one
    assert "ingest" in capsys.readouterr().err
    assert "ingested" in mem.add_user_message("What month was it?")
    # the question follows the document in one stream (no BOS between them), on a line of its own
    assert mem.tree.tokens(n, n + 5).tolist() == engine.tokenizer.encode("\nWhat month was it?")[:5]
    mem.close()
    again = session(engine, tmp_path / "mem", ingest=str(doc))
    assert "already in memory" in again.add_user_message("Still there?")
    assert len(again.tree.sources) == 1
    again.close()


def test_a_memory_of_another_model_is_refused_and_left_untouched(engine, tmp_path):
    mem = session(engine, tmp_path / "mem")
    reply(mem, "Hello")
    mem.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "mem").iterdir() if p.is_file()}
    variant = hooks.get_variant("megacontext", section(tmp_path / "mem"))
    from megacontext.memory_chat import MemoryChatSession
    with pytest.raises(ValueError, match="base:d2@40") as e:
        MemoryChatSession(engine, settings(), variant.config, model_name="base:other@1")
    assert "base:other@1" in str(e.value)
    after = {p.name: p.read_bytes() for p in (tmp_path / "mem").iterdir() if p.is_file()}
    assert after == before


def test_a_second_chat_on_the_same_memory_is_refused(engine, tmp_path):
    mem = session(engine, tmp_path / "mem")
    with pytest.raises((RuntimeError, ValueError), match="(?i)lock|another|writ"):
        session(engine, tmp_path / "mem")
    reply(mem, "still mine")
    mem.close()


def test_a_failed_write_ends_the_turn_and_keeps_what_was_committed(engine, tmp_path, monkeypatch):
    mem = session(engine, tmp_path / "mem")
    reply(mem, "First turn.")
    held = mem.history_tokens
    real = MegaContextTree.ingest

    def full_disk(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(MegaContextTree, "ingest", full_disk)
    with pytest.raises(ValueError, match="No space left on device.*not kept.*last committed"):
        mem.add_user_message("Second turn.")
    monkeypatch.setattr(MegaContextTree, "ingest", real)
    assert mem.history_tokens == held and mem.messages[-1]["role"] == "assistant"
    assert reply(mem, "Second turn.") is not None and mem.history_tokens > held  # space is back: it goes on
    mem.close()


def test_a_reply_cut_short_closes_its_turn_in_memory(engine, tmp_path):
    mem = session(engine, tmp_path / "mem", refocus_every=32)
    mem.add_user_message("Tell me a long story")
    mem.max_tokens = 40
    pieces = mem.stream_reply()
    next(pieces)
    pieces.close()  # the caller went away (Ctrl-C, a closed web stream)
    mem.close()
    tree = MegaContextTree.open(tmp_path / "mem", readonly=True)
    stored = tree.tokens().tolist()
    tree.close()
    assert stored[-1] == mem.assistant_end and mem.messages[-1]["role"] == "assistant"


def test_nanochat_chat_runs_the_memory_chat_from_a_config(fixture_base_dir, tmp_path, capsys):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        variant: megacontext
        source: base
        model_tag: d2
        device_type: cpu
        temperature: 0
        max_tokens: 6
        megacontext:
          chat: true
          gistnet: mean
          lensnet: null
          budget_tokens: 64
        """))
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 48213. " * 30)
    chat.main(["--config", str(cfg), "--ingest", str(doc), "--memory", str(tmp_path / "mem"), "--prompt=The pass key is"])
    out = capsys.readouterr()
    assert out.out.strip() and "ingest" in out.err
    tree = MegaContextTree.open(tmp_path / "mem", readonly=True)
    assert tree.num_tokens > len(doc.read_text()) // 8 and len(tree.sources) == 1
    tree.close()
    with pytest.raises(SystemExit):
        chat.main(["--config", str(cfg), "--megacontext.render=bogus", "--prompt=x"])
    assert "render must be one of auto, chat, text" in capsys.readouterr().err


def killable_session_script(body, temperature=0.0, max_tokens=8, render="chat"):
    """A subprocess program: a memory chat session on the fixture d2 model, memory dir argv[1],
    then `body` (which prints "TURN <tokens held>" once its first turn is committed)."""
    return textwrap.dedent(f"""\
        import sys
        from nanochat import chat, hooks
        s = chat.validate_settings(dict(chat.DEFAULTS, source="base", model_tag="d2", device_type="cpu",
                                        temperature={temperature}, top_k=0, max_tokens={max_tokens}))
        engine = chat.load_engine(s)
        variant = hooks.get_variant("megacontext", {{"chat": True, "gistnet": "mean", "lensnet": None,
                                                    "memory": sys.argv[1], "budget_tokens": 64, "render": "{render}"}})
        sess = chat.build_session(engine, s, variant)
        """) + textwrap.dedent(body)


def start_until_first_turn(script, *args):
    """Run the script in a subprocess -> (process, tokens held once its first turn is committed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = next((out for out in proc.stdout if out.startswith("TURN")), "")  # past the model's loading chatter
    assert line, proc.stderr.read()
    return proc, int(line.split()[1])


INGEST_KILL_BODY = """
sess.add_user_message("First turn, committed.")
print("".join(sess.stream_reply()), flush=True)
print("TURN", sess.history_tokens, flush=True)
sess.ingest(sys.argv[2])
"""


def test_an_ingest_cut_short_keeps_its_committed_part_and_says_so(engine, tmp_path, monkeypatch):
    import megacontext.ingest as ingest_module
    doc = tmp_path / "book.txt"
    doc.write_text("A line of the book.\n" * 4000)
    real = ingest_module.read_pieces

    def interrupted(path, encoding, chunk_bytes=ingest_module.CHUNK_BYTES):
        for i, piece in enumerate(real(path, encoding, chunk_bytes=4096)):
            if i == 3:
                raise KeyboardInterrupt  # Ctrl-C mid-ingest
            yield piece
    monkeypatch.setattr(ingest_module, "read_pieces", interrupted)
    mem = session(engine, tmp_path / "mem")
    with pytest.raises(KeyboardInterrupt):
        mem.ingest(str(doc))
    got = mem.history_tokens  # the session reopened its memory at the last commit
    assert 0 < got < len(engine.tokenizer.encode(doc.read_text()))
    assert "interrupted" in mem.add_user_message("Where were we?")
    mem.close()
    again = session(engine, tmp_path / "mem")
    assert again.history_tokens > got and again.tree.sources[-1]["tokens"] == got  # a shorter source
    assert again.tree.sources[-1]["interrupted"] is True
    monkeypatch.setattr(ingest_module, "read_pieces", real)
    held = again.history_tokens
    assert again.ingest(str(doc)) == 1 + len(engine.tokenizer.encode(doc.read_text()))  # BOS + the whole file
    assert again.history_tokens > held and len(again.tree.sources) == 2
    again.close()


@pytest.mark.slow
def test_a_kill_mid_ingest_leaves_memory_readable_at_its_last_commit(fixture_base_dir, tmp_path):
    doc = tmp_path / "big.txt"
    doc.write_text("".join(f"Line {i} of a long book about ships and the sea.\n" for i in range(30000)))
    proc, held = start_until_first_turn(killable_session_script(INGEST_KILL_BODY), tmp_path / "mem", doc)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once the ingest has committed something
        meta = (tmp_path / "mem" / "tree.json")
        if meta.exists() and '"sources": [{' in meta.read_text().replace("\n", ""):
            time.sleep(0.5)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tree = MegaContextTree.open(tmp_path / "mem", readonly=True)  # readable as it is, before any repair
    assert tree.num_tokens > held and tree.sources[-1]["tokens"] is None, "the ingest ended before the kill"
    tree.close()
    engine = chat.load_engine(settings())
    mem = session(engine, tmp_path / "mem", budget_tokens=64)
    assert mem.history_tokens > held
    assert "interrupted" in mem.add_user_message("After the crash.")
    assert "".join(mem.stream_reply()) is not None
    mem.close()


def test_named_conversations_get_their_own_memories_and_forget_spares_them(engine, tmp_path):
    variant = hooks.get_variant("megacontext", section(tmp_path / "mem"))
    shared = chat.build_session(engine, settings(), variant)
    alice = chat.build_session(engine, settings(), variant, session_id="alice")
    assert alice.memory == tmp_path / "mem" / "sessions" / "alice" and shared.memory == tmp_path / "mem"
    reply(alice, "Alice was here.")
    reply(shared, "Shared memory.")
    held = alice.history_tokens
    alice.close()
    shared.command("/forget")
    shared.command("yes")
    assert shared.history_tokens == 0
    again = chat.build_session(engine, settings(), variant, session_id="alice")
    assert again.history_tokens == held
    again.close()
    shared.close()


def test_text_rendering_for_a_base_model_continues_memory_line_by_line(engine, tmp_path):
    mem = session(engine, tmp_path / "mem", render="auto")  # source: base -> text
    assert mem.render == "text"
    plain = chat.CompletionSession.from_config(engine, settings())
    first = reply(mem, "Once upon a time")
    assert first == reply(plain, "Once upon a time")  # the first message: [BOS] + its text, as plain
    reply(mem, "Then")
    tok = engine.tokenizer
    stored = mem.tree.tokens().tolist()
    head = tok.encode("Once upon a time")
    assert stored[:len(head)] == head and tok.decode(stored).endswith(tok.decode(tok.encode("\nThen")) + mem.messages[-1]["content"])
    mem.close()


def test_gist_first_needs_heads_and_then_decodes_with_plans(engine, tmp_path):
    from megacontext.megaprediction import MegaPrediction, MegaPredictionConfig
    with pytest.raises(ValueError, match="gist_first needs MegaPrediction heads"):
        hooks.get_variant("megacontext", section(tmp_path / "mem", gist_first=True))
    with pytest.raises(ValueError, match="lod_mix"):
        hooks.get_variant("megacontext", section(tmp_path / "mem", gist_first=True, megaprediction="x", lod_mix=[3]))
    n_embd = engine.model.config.n_embd
    heads = MegaPrediction(MegaPredictionConfig(n_embd=n_embd)).init_weights(seed=0)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # plans that change what the model reads
    mc = tmp_path / "mc_000001.pt"
    torch.save({"megaprediction": heads.state_dict_prefixed(), "gistnet_identity": None,
                "megaprediction_config": {"n_embd": n_embd}}, mc)
    plain = session(engine, tmp_path / "plain", budget_tokens=64)
    planned = session(engine, tmp_path / "planned", budget_tokens=64, gist_first=True, megaprediction=str(mc))
    assert planned.planner is not None and planned.rt.planner is planned.planner
    for sess in (plain, planned):
        sess.max_tokens = 40
        reply(sess, "Tell me about the sea and the ships on it, in many words.")
    # plans are never written to memory: both memories hold their own turns, token by token
    tok = engine.tokenizer
    user = [planned.user_start, *tok.encode("Tell me about the sea and the ships on it, in many words."), planned.user_end,
            planned.assistant_start]
    stored = planned.tree.tokens().tolist()
    assert stored[:len(user)] == user and stored[-1] == planned.assistant_end
    assert tok.decode(stored[len(user):-1]) == planned.messages[-1]["content"]  # the reply's tokens, no plan slots
    plain.close()
    planned.close()


REPLY_KILL_BODY = """
sess.add_user_message("A story that never ends:")
print("TURN", sess.history_tokens, flush=True)
for piece in sess.stream_reply():  # text rendering stops only at BOS: this reply runs until the kill
    pass
"""


@pytest.mark.slow
def test_a_kill_mid_reply_leaves_memory_readable_with_the_turn_and_a_prefix_of_the_reply(fixture_base_dir, tmp_path):
    script = killable_session_script(REPLY_KILL_BODY, temperature=1.0, max_tokens=100000, render="text")
    proc, held = start_until_first_turn(script, tmp_path / "mem")
    deadline = time.time() + 60
    while time.time() < deadline:  # the reply's tokens reach the tree at each refocus (every 32)
        tree = MegaContextTree.open(tmp_path / "mem", readonly=True)
        grown = tree.num_tokens
        tree.close()
        if grown > held + 64:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tree = MegaContextTree.open(tmp_path / "mem", readonly=True)
    assert tree.num_tokens > held + 64, "the reply never reached the tree"
    tree.close()
    engine = chat.load_engine(settings())
    mem = session(engine, tmp_path / "mem", budget_tokens=64, render="text")
    assert mem.history_tokens > held + 64
    assert reply(mem, "And then?") is not None and mem.history_tokens > held + 64
    mem.close()
