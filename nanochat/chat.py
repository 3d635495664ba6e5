"""
The chat runtime: talk to a trained checkpoint in a terminal, or get one reply for a script.

    python -m nanochat.chat --config configs/chat_cpu.yaml                   # interactive
    python -m nanochat.chat --config configs/chat_cpu.yaml --prompt="Hello"  # one reply, then exit
    python -m nanochat.chat --source=base --model_tag=d2 --max_tokens=32     # no YAML needed

Settings come from DEFAULTS below, then the YAML file, then `--key=value` on the command
line. A config may also pick a variant (`variant: NAME` plus a section of its own, see
nanochat/hooks.py); when that variant has a `chat_session(engine, config)` member, its
session replaces the plain ChatSession (the one line tagged as a hook). scripts/chat_cli.py
(upstream's flags) and scripts/chat_web.py (the web server) are built on this module.

Base models. A base (pre-trained only) model never learned the chat tokens, so with
source: base this command continues the text you type instead (CompletionSession: no chat
rendering, each message a text of its own) and says so once on stderr. scripts/chat_cli.py
keeps upstream's behaviour and renders every source as a chat.

Where the model is: $NANOCHAT_BASE_DIR when set, else the config's base_dir, else
~/.cache/nanochat (configs/chat_cpu.yaml names the CPU preset's ~/.cache/nanochat-cpu).

In the terminal a reply streams out token by token; 'clear' starts a new conversation and
'quit' or 'exit' (or Ctrl-D) leaves; Ctrl-C during a reply cuts it short. In one-shot mode
(--prompt) stdout carries the reply alone so a script can capture it; loading messages go
to stderr.

What the model sees. A conversation is rendered the way tokenizer.render_conversation does
it: <|bos|>, then turns of <|user_start|> text <|user_end|> and <|assistant_start|> text
<|assistant_end|>, and a reply is sampled after one more <|assistant_start|> (as in
render_for_completion). Replies generated here keep their exact token ids, calculator tool
tokens included, rather than being re-encoded from their text. Typed text is always
ordinary text: a user who types "<|bos|>" gets those characters, never the control token.

Conversations longer than the model's context (sequence_len), the policy:
  1. A reply may use at most max_tokens tokens and never more than half the context
     (sequence_len // 2), so the conversation always keeps the other half.
  2. Before each reply, while prompt + reply budget > sequence_len, the oldest exchange
     (a user message and the reply to it) is dropped, whole. The newest user message is
     never dropped or cut.
  3. A newest user message that cannot fit even alone is refused (ValueError saying how
     long it may be), and the conversation is left as it was.
  4. The first time turns are dropped in a conversation, add_user_message returns a
     one-line notice for the user; it can come again only after reset ('clear').
Upstream's chat_cli has no such rule: its prompt grows past the context the model was
trained on.
"""

import os
import sys
from contextlib import nullcontext, redirect_stdout

from nanochat import hooks

# Every key a chat config may set; the types here are what command-line overrides are read as.
DEFAULTS = {
    "source": "sft",       # checkpoint family: base | sft | rl
    "model_tag": None,     # e.g. d20; None = the largest model of that family
    "step": None,          # None = the last saved step
    "prompt": "",          # non-empty = one-shot mode: answer this and exit
    "temperature": 0.6,    # 0 = greedy
    "top_k": 50,           # 0 = no top-k filtering
    "max_tokens": 256,     # longest reply, in tokens (see the context policy above)
    "seed": 42,            # sampling seed for every reply, as upstream's chat_cli does
    "device_type": "",     # cuda | cpu | mps; empty = autodetect
    "base_dir": None,      # artifacts dir to use when NANOCHAT_BASE_DIR is not set (~ allowed)
}
SOURCES = ("base", "sft", "rl")
DEVICE_TYPES = ("", "cuda", "cpu", "mps")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_settings(settings):
    """Check a merged settings dict; returns a cleaned copy or raises a one-line ValueError."""
    s = dict(settings)
    if s["source"] not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {s['source']!r}")
    if s["model_tag"] is not None:
        s["model_tag"] = str(s["model_tag"])  # YAML reads `model_tag: 12` as a number
    if s["step"] is not None and not (_is_int(s["step"]) and s["step"] >= 0):
        raise ValueError(f"step must be a non-negative integer (or left out for the last step), got {s['step']!r}")
    if isinstance(s["temperature"], bool) or not isinstance(s["temperature"], (int, float)) or s["temperature"] < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {s['temperature']!r}")
    s["temperature"] = float(s["temperature"])
    if not (_is_int(s["top_k"]) and s["top_k"] >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = no filtering), got {s['top_k']!r}")
    if not (_is_int(s["max_tokens"]) and s["max_tokens"] >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {s['max_tokens']!r}")
    if not _is_int(s["seed"]):
        raise ValueError(f"seed must be an integer, got {s['seed']!r}")
    if s["device_type"] not in DEVICE_TYPES:
        raise ValueError(f"device_type must be cuda, cpu or mps (or empty to autodetect), got {s['device_type']!r}")
    if s["base_dir"] is not None and not (isinstance(s["base_dir"], str) and s["base_dir"].strip()):
        raise ValueError(f"base_dir must be a directory path (or left out for $NANOCHAT_BASE_DIR), got {s['base_dir']!r}")
    s["prompt"] = "" if s["prompt"] is None else str(s["prompt"])
    return s

# -----------------------------------------------------------------------------
# The session: one conversation with one engine


class ChatSession:
    """
    One conversation with one model, under the context policy of the module docstring.

    The protocol the front-ends use (a variant's chat_session must provide the same):
      reset()                  start a new conversation
      add_user_message(text)   -> a one-line notice or None; ValueError if it can never fit
      stream_reply()           -> iterator of text pieces; the reply joins the conversation
      load_messages(messages)  replace the conversation (a server gets the history each request)
      messages                 the conversation the model currently sees, [{"role", "content"}]
    """

    def __init__(self, engine, max_tokens=256, temperature=0.6, top_k=50, seed=42):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.sequence_len = engine.model.config.sequence_len
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        special = self.tokenizer.encode_special
        self.bos = self.tokenizer.get_bos_token_id()
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.reset()

    @classmethod
    def from_config(cls, engine, config, session_id=None):
        """session_id names a conversation for front-ends that keep several (chat_web); a plain
        session holds its conversation in memory, so it needs no name."""
        return cls(engine, max_tokens=config["max_tokens"], temperature=config["temperature"],
                   top_k=config["top_k"], seed=config["seed"])

    def reset(self):
        self.turns = []          # (role, text, ids): ids are the turn's tokens with its delimiters
        self.dropped_turns = 0   # how many turns the context policy has dropped so far
        self._told_about_drops = False

    @property
    def messages(self):
        return [{"role": role, "content": text} for role, text, _ in self.turns]

    @property
    def reply_budget(self):
        """Most tokens one reply may take: max_tokens, capped at half the context (policy rule 1)."""
        return max(1, min(self.max_tokens, self.sequence_len // 2))

    def render_prompt(self):
        """Token ids the model reads before replying: the conversation plus <|assistant_start|>."""
        ids = [self.bos]
        for _, _, turn_ids in self.turns:
            ids.extend(turn_ids)
        ids.append(self.assistant_start)
        return ids

    def _user_turn(self, text):
        return ("user", text, [self.user_start, *self.tokenizer.encode(text), self.user_end])

    def _assistant_turn(self, text, reply_ids=None):
        if reply_ids is None:
            reply_ids = self.tokenizer.encode(text)
        return ("assistant", text, [self.assistant_start, *reply_ids, self.assistant_end])

    def load_messages(self, messages):
        """Replace the conversation with `messages` (user, assistant, user, ...), as they are:
        the context policy applies when the next user message is added."""
        self.reset()
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"message {i} is from {message['role']!r} but should be from {expected!r}: "
                                 f"a conversation alternates user, assistant, user, ...")
            make_turn = self._user_turn if expected == "user" else self._assistant_turn
            self.turns.append(make_turn(message["content"]))

    def add_user_message(self, text):
        """Add the user's next message and fit the conversation to the context (policy rules 2-4)."""
        if not isinstance(text, str):
            raise ValueError(f"a user message must be a string, got {type(text).__name__}")
        if self.turns and self.turns[-1][0] == "user":
            raise ValueError("the previous user message has no reply yet; call stream_reply() first")
        turn = self._user_turn(text)
        budget = self.reply_budget
        # alone it needs <|bos|> + its turn + <|assistant_start|> + room for the reply
        if 1 + len(turn[2]) + 1 + budget > self.sequence_len:
            most = self.sequence_len - budget - 4
            raise ValueError(f"message too long for the model's context: {len(turn[2]) - 2} tokens, but at most "
                             f"{max(most, 0)} fit ({self.sequence_len}-token context, {budget} kept for the reply); "
                             f"shorten it")
        self.turns.append(turn)
        return self._fit_context(budget)

    def _fit_context(self, budget):
        prompt_len = 2 + sum(len(ids) for _, _, ids in self.turns)
        dropped = 0
        # the newest user message fits alone (checked by the caller), so this stops before it
        while prompt_len + budget > self.sequence_len and len(self.turns) > 1:
            prompt_len -= len(self.turns.pop(0)[2])
            dropped += 1
            if self.turns[0][0] == "assistant":  # its reply goes with it: exchanges are dropped whole
                prompt_len -= len(self.turns.pop(0)[2])
                dropped += 1
        self.dropped_turns += dropped
        if dropped and not self._told_about_drops:
            self._told_about_drops = True
            return (f"(the conversation no longer fits the model's {self.sequence_len}-token context: "
                    f"the oldest turns are dropped from now on)")
        return None

    no_message = "there is no user message to reply to; call add_user_message() first"

    def stop_tokens(self):
        """Tokens that end a reply (not part of it)."""
        return (self.assistant_end, self.bos)

    def stream_reply(self):
        """Sample the assistant's reply, yielding text as it is decoded. The reply (its exact
        tokens) joins the conversation, even when the caller stops early."""
        if not self.turns or self.turns[-1][0] != "user":
            raise ValueError(self.no_message)
        prompt = self.render_prompt()
        stop = self.stop_tokens()
        budget = min(self.reply_budget, self.sequence_len - len(prompt))
        reply_ids = []
        shown = ""  # text already yielded
        steps = self.engine.generate(prompt, num_samples=1, max_tokens=budget,
                                     temperature=self.temperature, top_k=self.top_k, seed=self.seed)
        try:
            for token_column, _ in steps:
                token = token_column[0]
                if token in stop:
                    break
                reply_ids.append(token)
                text = self.tokenizer.decode(reply_ids)
                # a character spread over several tokens decodes to U+FFFD until its last byte
                # arrives; hold it back rather than show a broken character
                if not text.endswith("\ufffd") and len(text) > len(shown):
                    piece, shown = text[len(shown):], text
                    yield piece
            text = self.tokenizer.decode(reply_ids)
            if text != shown:  # the reply ended inside a character: show what there is
                piece, shown = text[len(shown):], text
                yield piece
        finally:
            steps.close()
            self.turns.append(self._assistant_turn(self.tokenizer.decode(reply_ids), reply_ids))


class CompletionSession(ChatSession):
    """
    Text continuation for a base (pre-trained only) model, with ChatSession's protocol.

    A base model never saw chat tokens, so wrapping a message in them makes it answer
    noise; here each message is plain text, <|bos|> + its tokens, and the reply is what the
    model writes next, ending at max_tokens or at <|bos|> (where a new document would
    start). Every message is a text of its own: nothing carries over from the last one.
    A text too long to leave room for the reply is refused, like an over-long chat message.
    Settings, the reply budget and the sampling loop are ChatSession's; what differs is the
    prompt, the turn record and the stop token.
    """
    user_label, reply_label = "Text", "Continuation"
    notice = ("note: this is a base (pre-trained only) model, so it continues your text instead of "
              "chatting; use the SFT model (source: sft) to chat")

    no_message = "there is no text to continue; call add_user_message() first"

    def reset(self):
        self.turns = []  # (role, text): the one text and, once sampled, its continuation
        self.dropped_turns = 0

    @property
    def messages(self):
        return [{"role": role, "content": text} for role, text in self.turns]

    def render_prompt(self):
        return [self.bos, *self.tokenizer.encode(self.turns[0][1])] if self.turns else [self.bos]

    def load_messages(self, messages):
        """Only the newest user message matters: it is the text to continue."""
        self.reset()
        users = [m for m in messages if m["role"] == "user"]
        if users:
            self.turns.append(("user", users[-1]["content"]))

    def add_user_message(self, text):
        if not isinstance(text, str):
            raise ValueError(f"a text to continue must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text)
        budget = self.reply_budget
        if 1 + len(ids) + budget > self.sequence_len:
            raise ValueError(f"text too long for the model's context: {len(ids)} tokens, but at most "
                             f"{max(self.sequence_len - budget - 1, 0)} fit ({self.sequence_len}-token context, "
                             f"{budget} kept for the continuation); shorten it")
        self.turns = [("user", text)]
        return None

    def stop_tokens(self):
        return (self.bos,)  # a new document would start: the continuation ends

    def _assistant_turn(self, text, reply_ids=None):
        return ("assistant", text)


def build_session(engine, config, variant=None, continue_base=False, session_id=None):
    """The session for this run: the variant's own when it has one, else a plain ChatSession
    (or, with continue_base and a base model, a CompletionSession). session_id names the
    conversation (scripts/chat_web keeps one session per id; a variant may keep its state by it)."""
    make_session = getattr(variant, "chat_session", None)  # hook: a variant may run the chat its own way
    if make_session is None:
        plain = continue_base and config["source"] == "base"
        make_session = (CompletionSession if plain else ChatSession).from_config
    return make_session(engine, config, session_id=session_id)

# -----------------------------------------------------------------------------
# Front-ends: loading, the REPL, one-shot mode


def load_engine(settings):
    """Load the checkpoint the settings name onto the chosen device; returns an Engine."""
    if settings.get("base_dir") and not os.environ.get("NANOCHAT_BASE_DIR"):
        # a config may say where its model lives (configs/chat_cpu.yaml: the CPU preset's dir);
        # the environment variable, when set, still wins, as it does in speedrun.sh
        os.environ["NANOCHAT_BASE_DIR"] = os.path.expanduser(settings["base_dir"])
    # the model stack (and torch) loads only here, after the flags were read: a typo fails at once
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    device_type = settings["device_type"] or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_model(settings["source"], device, phase="eval",
                                     model_tag=settings["model_tag"], step=settings["step"])
    return Engine(model, tokenizer)


def run_repl(session, read_line=input, out=None):
    """Interactive chat until 'quit'/'exit' or end of input."""
    out = out or sys.stdout
    say = lambda *a, **k: print(*a, **k, file=out, flush=True)
    user_label = getattr(session, "user_label", "User")
    reply_label = getattr(session, "reply_label", "Assistant")
    say("\nNanoChat Interactive Mode")
    say("-" * 50)
    say("Type 'quit' or 'exit' to end the conversation")
    say("Type 'clear' to start a new conversation")
    say("-" * 50)
    while True:
        try:
            user_input = read_line(f"\n{user_label}: ").strip()
        except (EOFError, KeyboardInterrupt):
            say("\nGoodbye!")
            return
        command = user_input.lower()
        if command in ("quit", "exit"):
            say("Goodbye!")
            return
        if command == "clear":
            session.reset()
            say("Conversation cleared.")
            continue
        if not user_input:
            continue
        answer = getattr(session, "command", lambda text: None)(user_input)  # hook: a variant's session answers its own commands (/memory, /forget)
        if answer is not None:  # hook: it was one of them
            say(answer)
            continue
        try:
            notice = session.add_user_message(user_input)
        except ValueError as e:
            say(f"error: {e}")
            continue
        if notice:
            say(notice)
        say(f"\n{reply_label}: ", end="")
        try:
            for piece in session.stream_reply():
                say(piece, end="")
        except KeyboardInterrupt:
            say(" [interrupted]", end="")
        say()


def run_prompt(session, prompt, out=None):
    """One-shot mode: stream the reply to `prompt`, then a newline."""
    out = out or sys.stdout
    session.add_user_message(prompt)  # a single message never drops turns, so no notice
    for piece in session.stream_reply():
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def run_chat(settings, variant=None, continue_base=False):
    """Validate settings, load the model, build the session, then chat (REPL or one-shot).
    continue_base: a base model continues the text instead (python -m nanochat.chat does
    this; scripts/chat_cli keeps upstream's chat rendering for every source)."""
    settings = validate_settings(settings)
    one_shot = bool(settings["prompt"])
    # in one-shot mode stdout is the reply alone; loading chatter goes to stderr
    with redirect_stdout(sys.stderr) if one_shot else nullcontext():
        engine = load_engine(settings)
        session = build_session(engine, settings, variant, continue_base)
    if getattr(session, "notice", None):
        print(session.notice, file=sys.stderr, flush=True)  # said once, before anything else
    try:
        if one_shot:
            run_prompt(session, settings["prompt"])
        else:
            run_repl(session)
    finally:
        getattr(session, "close", lambda: None)()  # hook: a variant's session flushes what it keeps (its memory)
    return session


def run_cli(settings, variant=None, continue_base=False):
    """run_chat with bad input (missing checkpoint, bad setting, ...) reported as one line."""
    try:
        return run_chat(settings, variant, continue_base)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    """python -m nanochat.chat [--config FILE.yaml] [--key=value ...]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("Keys and defaults: " + ", ".join(f"{k}={v!r}" for k, v in DEFAULTS.items()))
        return None
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                print("error: --config needs a path to a YAML file (see configs/chat_cpu.yaml)", file=sys.stderr)
                sys.exit(2)
            config_path = argv[i + 1]
            del argv[i:i + 2]
            break
        if arg.startswith("--config="):
            config_path = argv.pop(i).split("=", 1)[1]
            break
    try:
        settings, variant_name, variant_config = hooks.load_run_config(config_path, hooks.parse_overrides(argv), DEFAULTS,
                                                                       variant_flags=True)  # hook: --flags chat does not know go to the variant's section
        settings = validate_settings(settings)
        variant = hooks.get_variant(variant_name, variant_config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return run_cli(settings, variant, continue_base=True)


if __name__ == "__main__":
    main()
