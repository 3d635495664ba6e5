"""
The nanochat tokenizer: a GPT-4 style byte-level BPE.

Training happens in Rust (the `rustbpe` package, fast and parallel); inference runs on
`tiktoken`, which is what we actually ship: the saved tokenizer is nothing more than a
pickled tiktoken.Encoding. This file also knows how to render a chat conversation into
token ids plus a loss mask (which tokens the assistant is trained to produce).

Special tokens are only ever produced on purpose (encode_special, prepend/append, the
conversation renderer). Ordinary text is always encoded with encode_ordinary, so a user
typing "<|bos|>" gets plain text tokens and can never forge a control token.
"""

import os
import pickle

import rustbpe
import tiktoken

SPECIAL_TOKENS = [
    # BOS opens every document; the data loader packs documents on BOS boundaries
    "<|bos|>",
    # the rest only appear when rendering chat conversations during finetuning
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output is fed back in
    "<|output_end|>",
]

# GPT-4's split pattern with one change: numbers are chunked in runs of at most 2 digits
# (\p{N}{1,2}) instead of 3. At our small vocab sizes (~32K) this measured better: fewer
# vocab slots are spent on 3-digit numbers. 1 was slightly worse, 3 worse still.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# -----------------------------------------------------------------------------
# Tokenizer: rustbpe for training, tiktoken for everything else


class RustBPETokenizer:
    """A thin wrapper around a tiktoken.Encoding; trained with rustbpe."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self._special_cache = {}  # name -> id; encode_special is called in hot loops
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Train a BPE on an iterator of strings. vocab_size counts the special tokens,
        which are not learned: they take the last len(SPECIAL_TOKENS) ids."""
        num_learned = vocab_size - len(SPECIAL_TOKENS)
        if num_learned < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, num_learned, pattern=SPLIT_PATTERN)
        # rustbpe hands back (token bytes as a list of ints, rank) pairs; tiktoken wants bytes keys
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        first_special = len(mergeable_ranks)
        special_tokens = {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=trainer.get_pattern(),
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load the tokenizer that save() (i.e. scripts/tok_train.py) wrote to tokenizer_dir."""
        pickle_path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(pickle_path):
            raise FileNotFoundError(f"No tokenizer found at {pickle_path}; "
                                    f"train one first with `python -m scripts.tok_train`")
        with open(pickle_path, "rb") as f:
            enc = pickle.load(f)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """Wrap one of tiktoken's published encodings ("gpt2", "cl100k_base", ...).
        tiktoken downloads these on first use and caches them (TIKTOKEN_CACHE_DIR)."""
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except OSError as e:  # requests' ConnectionError and friends are OSErrors
            raise RuntimeError(f"could not load tiktoken encoding {tiktoken_name!r}: downloading it failed "
                               f"({type(e).__name__}); tiktoken needs network access on first use, "
                               f"or a pre-filled TIKTOKEN_CACHE_DIR") from e
        # OpenAI's encodings call their document delimiter <|endoftext|>. It plays the role
        # of our <|bos|> (we prepend it to every document), so that is what BOS maps to.
        return cls(enc, "<|endoftext|>")

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def id_to_token(self, id):
        return self.enc.decode([id])

    def encode_special(self, text):
        """Id of a single token given its exact text, typically a special token name."""
        token_id = self._special_cache.get(text)
        if token_id is None:
            token_id = self.enc.encode_single_token(text)
            self._special_cache[text] = token_id
        return token_id

    def get_bos_token_id(self):
        return self.bos_token_id

    def _as_id(self, token):
        # prepend/append may be given as a token id or as a special token's name
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists of ids),
        optionally with a token (id or special name) prepended and/or appended to each."""
        prepend_id = None if prepend is None else self._as_id(prepend)
        append_id = None if append is None else self._as_id(append)

        def wrap(row):
            if prepend_id is not None:
                row.insert(0, prepend_id)
            if append_id is not None:
                row.append(append_id)
            return row

        if isinstance(text, str):
            return wrap(self.enc.encode_ordinary(text))
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [wrap(row) for row in rows]
        raise ValueError(f"Invalid input type: {type(text)} (expected a str or a list of str)")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl (the pickled tiktoken.Encoding) into tokenizer_dir."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        pickle_path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        with open(pickle_path, "wb") as f:
            pickle.dump(self.enc, f)
        print(f"Saved tokenizer encoding to {pickle_path}")

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Turn one chat conversation {"messages": [...]} into (ids, mask), two lists of equal
        length. mask[i] == 1 marks the tokens the assistant should learn to produce: its own
        text, its python tool calls and its <|assistant_end|>. Everything the user or the
        python interpreter says has mask 0. The result is cut to max_tokens.
        The conversation passed in is never modified.
        """
        messages = conversation["messages"]
        if len(messages) == 0:
            raise ValueError("Conversation has no messages")
        # There is no system role in our chat format: a leading system message is folded
        # into the first user message. Build new objects so the caller's dicts stay intact.
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("A system message must be followed by a user message")
            merged_user = dict(messages[1])
            merged_user["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [merged_user] + list(messages[2:])

        bos = self.get_bos_token_id()
        user_start, user_end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
        assistant_start, assistant_end = self.encode_special("<|assistant_start|>"), self.encode_special("<|assistant_end|>")
        python_start, python_end = self.encode_special("<|python_start|>"), self.encode_special("<|python_end|>")
        output_start, output_end = self.encode_special("<|output_start|>"), self.encode_special("<|output_end|>")

        ids, mask = [], []

        def emit(token_ids, supervised):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        emit(bos, 0)
        for i, message in enumerate(messages):
            # turns strictly alternate user, assistant, user, ... which catches malformed data early
            expected_role = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected_role:
                raise ValueError(f"Message {i} is from {message['role']} but should be from {expected_role}")
            content = message["content"]

            if expected_role == "user":
                if not isinstance(content, str):
                    raise ValueError(f"User messages must be strings, got {type(content).__name__} in message {i}")
                emit(user_start, 0)
                emit(self.encode(content), 0)
                emit(user_end, 0)
                continue

            emit(assistant_start, 0)
            if isinstance(content, str):
                emit(self.encode(content), 1)
            elif isinstance(content, list):
                for part in content:
                    part_ids = self.encode(part["text"])
                    if part["type"] == "text":
                        emit(part_ids, 1)
                    elif part["type"] == "python":
                        # the tool call is the assistant's own output: supervised, delimiters included
                        emit(python_start, 1)
                        emit(part_ids, 1)
                        emit(python_end, 1)
                    elif part["type"] == "python_output":
                        # at inference time the interpreter writes these tokens, so never train on them
                        emit(output_start, 0)
                        emit(part_ids, 0)
                        emit(output_end, 0)
                    else:
                        raise ValueError(f"Unknown part type: {part['type']}")
            else:
                raise ValueError(f"Unknown content type: {type(content)}")
            emit(assistant_end, 1)

        # a hard cap on length keeps one long conversation from blowing up memory
        return ids[:max_tokens], mask[:max_tokens]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view of a rendered conversation: supervised tokens green, the rest red,
        separated by '|', optionally each followed by its id in gray."""
        red, green, gray, reset = '\033[91m', '\033[92m', '\033[90m', '\033[0m'
        pieces = []
        for token_id, supervised in zip(ids, mask):
            color = green if supervised == 1 else red
            pieces.append(f"{color}{self.decode([token_id])}{reset}")
            if with_token_id:
                pieces.append(f"{gray}({token_id}){reset}")
        return '|'.join(pieces)

    def render_for_completion(self, conversation):
        """
        Prompt ids for sampling the assistant's next reply (used in RL and evaluation): the
        conversation minus its final assistant message, followed by <|assistant_start|>.
        No mask is returned. The conversation passed in is never modified.
        """
        messages = conversation["messages"]
        if len(messages) == 0 or messages[-1]["role"] != "assistant":
            raise ValueError("Last message must be from the Assistant")
        prompt = dict(conversation)
        prompt["messages"] = list(messages[:-1])
        ids, _ = self.render_conversation(prompt)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

# -----------------------------------------------------------------------------
# nanochat-specific conveniences: the tokenizer lives in <base_dir>/tokenizer


def get_tokenizer():
    from nanochat.common import get_base_dir
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    return RustBPETokenizer.from_directory(tokenizer_dir)


def get_token_bytes(device="cpu"):
    """(vocab_size,) int32 tensor: how many bytes of text each token stands for, 0 for
    special tokens. Lets us report loss in bits per byte, comparable across vocab sizes."""
    import torch
    from nanochat.common import get_base_dir
    token_bytes_path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.exists(token_bytes_path):
        raise FileNotFoundError(f"Token bytes not found at {token_bytes_path}; "
                                f"they are written by `python -m scripts.tok_train`")
    with open(token_bytes_path, "rb") as f:
        token_bytes = torch.load(f, map_location=device)
    return token_bytes
