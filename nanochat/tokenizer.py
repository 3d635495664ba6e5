"""
The nanochat tokenizer: a GPT-4 style byte-level BPE.

Training happens in Rust (the `rustbpe` package, fast and parallel); inference runs on
`tiktoken`, which is what we actually ship: the saved tokenizer is nothing more than a
pickled tiktoken.Encoding. This file also knows how to render a chat conversation into
token ids plus a loss mask (which tokens the assistant is trained to produce).

Special tokens are only ever produced on purpose (encode_special, prepend/append, the
conversation renderer). Ordinary text is always encoded with encode_ordinary, so a user
typing "<|bos|>" gets plain text tokens and can never forge a control token.

Ours beside upstream's (same order, names and results): bad input is one ValueError /
FileNotFoundError / RuntimeError line naming the fix instead of an assert or a bare
traceback (each marked `# ours:` below).
"""

import os
import copy
from functools import lru_cache

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
import pickle
import rustbpe
import tiktoken

class RustBPETokenizer:
    """A thin wrapper around a tiktoken.Encoding; trained with rustbpe."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        # 1) learn the merges in Rust
        tokenizer = rustbpe.Tokenizer()
        # vocab_size counts the special tokens, which are not learned: they take the last ids
        vocab_size_no_special = vocab_size - len(SPECIAL_TOKENS)
        if vocab_size_no_special < 256:  # ours: a ValueError naming the smallest vocab_size
            raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        tokenizer.train_from_iterator(text_iterator, vocab_size_no_special, pattern=SPLIT_PATTERN)
        # 2) wrap them in a tiktoken encoding; rustbpe hands back (list of byte values, rank) pairs
        pattern = tokenizer.get_pattern()
        mergeable_ranks_list = tokenizer.get_mergeable_ranks()
        mergeable_ranks = {bytes(k): v for k, v in mergeable_ranks_list}
        tokens_offset = len(mergeable_ranks)
        special_tokens = {name: tokens_offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,  # token bytes -> rank (lower merges first)
            special_tokens=special_tokens,  # special token name -> id
        )
        return cls(enc, "<|bos|>")

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load the tokenizer that save() (i.e. scripts/tok_train.py) wrote to tokenizer_dir."""
        pickle_path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(pickle_path):  # ours: name the command that writes it
            raise FileNotFoundError(f"No tokenizer found at {pickle_path}; "
                                    f"train one first with `python -m scripts.tok_train`")
        with open(pickle_path, "rb") as f:
            enc = pickle.load(f)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        # one of tiktoken's published encodings ("gpt2", "cl100k_base", ...); tiktoken
        # downloads it on first use and caches it (TIKTOKEN_CACHE_DIR)
        try:
            enc = tiktoken.get_encoding(tiktoken_name)
        except OSError as e:  # ours: requests' ConnectionError and friends are OSErrors
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

    @lru_cache(maxsize=32)  # called in hot loops (the renderer, the engine's stop tokens)
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, append=None, num_threads=8):
        # a str gives a list of ids, a list of str a list of such lists;
        # prepend/append may be a token id or a special token's name

        if prepend is not None:
            prepend_id = prepend if isinstance(prepend, int) else self.encode_special(prepend)
        if append is not None:
            append_id = append if isinstance(append, int) else self.encode_special(append)

        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if prepend is not None:
                ids.insert(0, prepend_id)
            if append is not None:
                ids.append(append_id)
        elif isinstance(text, list):
            ids = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if prepend is not None:
                for ids_row in ids:
                    ids_row.insert(0, prepend_id)
            if append is not None:
                for ids_row in ids:
                    ids_row.append(append_id)
        else:
            raise ValueError(f"Invalid input type: {type(text)} (expected a str or a list of str)")

        return ids

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids):
        return self.enc.decode(ids)

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def save(self, tokenizer_dir):
        # tokenizer.pkl is the pickled tiktoken.Encoding, nothing more
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
        # the two lists we return, and the one way tokens get into them
        ids, mask = [], []
        def add_tokens(token_ids, mask_val):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            ids.extend(token_ids)
            mask.extend([mask_val] * len(token_ids))

        if len(conversation["messages"]) == 0:  # ours: a ValueError before anything indexes [0]
            raise ValueError("Conversation has no messages")
        # There is no system role in our chat format: a leading system message is folded
        # into the first user message, on a copy so the caller's dicts stay intact.
        if conversation["messages"][0]["role"] == "system":
            conversation = copy.deepcopy(conversation)
            messages = conversation["messages"]
            if len(messages) < 2 or messages[1]["role"] != "user":  # ours: ValueError, not assert/IndexError
                raise ValueError("A system message must be followed by a user message")
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        else:
            messages = conversation["messages"]

        bos = self.get_bos_token_id()
        user_start, user_end = self.encode_special("<|user_start|>"), self.encode_special("<|user_end|>")
        assistant_start, assistant_end = self.encode_special("<|assistant_start|>"), self.encode_special("<|assistant_end|>")
        python_start, python_end = self.encode_special("<|python_start|>"), self.encode_special("<|python_end|>")
        output_start, output_end = self.encode_special("<|output_start|>"), self.encode_special("<|output_end|>")

        add_tokens(bos, 0)
        for i, message in enumerate(messages):

            # turns strictly alternate user, assistant, user, ... which catches malformed data early
            must_be_from = "user" if i % 2 == 0 else "assistant"
            if message["role"] != must_be_from:  # ours: ValueError, not assert
                raise ValueError(f"Message {i} is from {message['role']} but should be from {must_be_from}")

            # a str, or (assistant only) a list of text / python / python_output parts
            content = message["content"]

            if message["role"] == "user":
                if not isinstance(content, str):  # ours: ValueError, not assert
                    raise ValueError(f"User messages must be strings, got {type(content).__name__} in message {i}")
                value_ids = self.encode(content)
                add_tokens(user_start, 0)
                add_tokens(value_ids, 0)
                add_tokens(user_end, 0)
            elif message["role"] == "assistant":
                add_tokens(assistant_start, 0)
                if isinstance(content, str):
                    value_ids = self.encode(content)
                    add_tokens(value_ids, 1)
                elif isinstance(content, list):
                    for part in content:
                        value_ids = self.encode(part["text"])
                        if part["type"] == "text":
                            add_tokens(value_ids, 1)
                        elif part["type"] == "python":
                            # the tool call is the assistant's own output: supervised, delimiters included
                            add_tokens(python_start, 1)
                            add_tokens(value_ids, 1)
                            add_tokens(python_end, 1)
                        elif part["type"] == "python_output":
                            # at inference time the interpreter writes these tokens, so never train on them
                            add_tokens(output_start, 0)
                            add_tokens(value_ids, 0)
                            add_tokens(output_end, 0)
                        else:
                            raise ValueError(f"Unknown part type: {part['type']}")
                else:
                    raise ValueError(f"Unknown content type: {type(content)}")
                add_tokens(assistant_end, 1)

        # a hard cap on length keeps one long conversation from blowing up memory
        ids = ids[:max_tokens]
        mask = mask[:max_tokens]
        return ids, mask

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view of a rendered conversation: supervised tokens green, the rest red,
        separated by '|', optionally each followed by its id in gray."""
        RED = '\033[91m'
        GREEN = '\033[92m'
        RESET = '\033[0m'
        GRAY = '\033[90m'
        tokens = []
        for i, (token_id, mask_val) in enumerate(zip(ids, mask)):
            token_str = self.decode([token_id])
            color = GREEN if mask_val == 1 else RED
            tokens.append(f"{color}{token_str}{RESET}")
            if with_token_id:
                tokens.append(f"{GRAY}({token_id}){RESET}")
        return '|'.join(tokens)

    def render_for_completion(self, conversation):
        """
        Prompt ids for sampling the assistant's next reply (used in RL and evaluation): the
        conversation minus its final assistant message, followed by <|assistant_start|>.
        No mask is returned. The conversation passed in is never modified.
        """
        # drop the final assistant message, on a copy
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if len(messages) == 0 or messages[-1]["role"] != "assistant":  # ours: ValueError, not assert
            raise ValueError("Last message must be from the Assistant")
        messages.pop()

        ids, mask = self.render_conversation(conversation)

        # the model continues from <|assistant_start|>
        assistant_start = self.encode_special("<|assistant_start|>")
        ids.append(assistant_start)
        return ids

# -----------------------------------------------------------------------------
# nanochat-specific conveniences: the tokenizer lives in <base_dir>/tokenizer

def get_tokenizer():
    from nanochat.common import get_base_dir
    base_dir = get_base_dir()
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    return RustBPETokenizer.from_directory(tokenizer_dir)

def get_token_bytes(device="cpu"):
    # (vocab_size,) int32: how many bytes of text each token stands for, 0 for special
    # tokens; lets us report loss in bits per byte, comparable across vocab sizes
    import torch
    from nanochat.common import get_base_dir
    base_dir = get_base_dir()
    tokenizer_dir = os.path.join(base_dir, "tokenizer")
    token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
    if not os.path.exists(token_bytes_path):  # ours: FileNotFoundError naming the command, not assert
        raise FileNotFoundError(f"Token bytes not found at {token_bytes_path}; "
                                f"they are written by `python -m scripts.tok_train`")
    with open(token_bytes_path, "rb") as f:
        token_bytes = torch.load(f, map_location=device)
    return token_bytes
