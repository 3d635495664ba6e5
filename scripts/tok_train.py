"""
Train the BPE tokenizer (GPT-4 style, via rustbpe) on the pretraining shards and save it
to <base_dir>/tokenizer: tokenizer.pkl, plus token_bytes.pt (bytes per token id) which
the trainers use to report bits per byte.

Reads the train split of <base_dir>/base_data_climbmix (every shard but the last).

Example:
python -m scripts.tok_train
python -m scripts.tok_train --max-chars=2000000000 --vocab-size=32768
"""
import os
import re
import sys
import time
import logging
import argparse
import itertools

import torch

from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS
from nanochat.common import get_base_dir, Progress
from nanochat.dataset import parquets_iter_batched


class MergeProgressBar(logging.Filter):
    """rustbpe logs 'Progress: N% (done/total merges) - Last merge: ...' about a hundred times
    over a training run; those records become one progress bar, every other record passes."""
    PATTERN = re.compile(r"Progress: \d+% \((\d+)/(\d+) merges\)")

    def __init__(self):
        super().__init__()
        self.bar = None

    def filter(self, record):
        m = self.PATTERN.match(record.getMessage())
        if m is None:
            return True
        done, total = int(m[1]), int(m[2])
        if self.bar is None:
            self.bar = Progress(total, "BPE merges", unit="merges")
        self.bar.update(done - self.bar.done)
        return False

    def close(self):
        if self.bar is not None:
            self.bar.close()

# -----------------------------------------------------------------------------
# Command line

parser = argparse.ArgumentParser(description='Train a BPE tokenizer')
parser.add_argument('--max-chars', type=int, default=2_000_000_000, help='Maximum characters to train on (default: 2B)')
parser.add_argument('--doc-cap', type=int, default=10_000, help='Maximum characters per document (default: 10,000)')
parser.add_argument('--vocab-size', type=int, default=32768, help='Vocabulary size (default: 32768 = 2^15)')
args = parser.parse_args()
min_vocab = 256 + len(SPECIAL_TOKENS)
if args.vocab_size < min_vocab:
    parser.error(f"--vocab-size must be at least {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
print(f"max_chars: {args.max_chars:,}")
print(f"doc_cap: {args.doc_cap:,}")
print(f"vocab_size: {args.vocab_size:,}")

# -----------------------------------------------------------------------------
# Training text: documents of the train split, each cut to --doc-cap characters, until
# just past --max-chars characters in total.

stats = {"chars": 0, "docs": 0}


def text_iterator():
    report_every = max(args.max_chars // 10, 1)  # ~10 progress lines over a full run
    next_report = report_every
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            doc = doc[:args.doc_cap]
            stats["chars"] += len(doc)
            stats["docs"] += 1
            yield doc
            if stats["chars"] >= next_report:
                print(f"  read {stats['chars']:,} chars from {stats['docs']:,} docs")
                next_report += report_every
            # the document that crosses the budget is still used, then we stop
            if stats["chars"] > args.max_chars:
                return


try:
    text_iter = text_iterator()
    # pull the first document now: a missing or empty dataset should fail here with a
    # clear message, not inside rustbpe (or by quietly training a bytes-only tokenizer)
    first_doc = next(text_iter)
except StopIteration:
    print("Error: the train shards hold no documents; download real shards with "
          "`python -m nanochat.dataset -n 8`", file=sys.stderr)
    sys.exit(1)
except FileNotFoundError as e:  # no data dir / no shards / only the val shard
    print(f"Error: {e}", file=sys.stderr)
    sys.exit(1)
text_iter = itertools.chain([first_doc], text_iter)

# -----------------------------------------------------------------------------
# Train

t0 = time.time()
merge_progress = MergeProgressBar()  # upstream shows rustbpe's lines as they are
logging.getLogger("rustbpe").addFilter(merge_progress)
tokenizer = RustBPETokenizer.train_from_iterator(text_iter, args.vocab_size)
merge_progress.close()
train_time = time.time() - t0
print(f"Trained on {stats['chars']:,} chars from {stats['docs']:,} docs")
print(f"Training time: {train_time:.2f}s")

# -----------------------------------------------------------------------------
# Save tokenizer.pkl

base_dir = get_base_dir()
tokenizer_dir = os.path.join(base_dir, "tokenizer")
tokenizer.save(tokenizer_dir)

# -----------------------------------------------------------------------------
# Sanity check: byte-level BPE must round-trip any text exactly

test_text = """Hello world! This is a test.
Numbers: 123, 4567, 89
Contractions: I'm, you're, it's
Special chars: @#$%^&*()
Unicode: 你好世界 🌍"""
assert tokenizer.decode(tokenizer.encode(test_text)) == test_text, "tokenizer failed to round-trip the test text"

# -----------------------------------------------------------------------------
# token_bytes.pt: the number of UTF-8 bytes behind each token id (0 for special tokens).
# Dividing summed loss by summed bytes gives bits per byte, a validation metric that does
# not change with the vocabulary size, so tokenizers can be compared fairly.

vocab_size = tokenizer.get_vocab_size()
special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
# count raw bytes: decoding a lone token to str first would turn partial UTF-8 sequences
# (e.g. single bytes >= 0x80) into a 3-byte replacement character
token_bytes = [0 if token_id in special_ids else len(tokenizer.decode_single_token_bytes(token_id))
               for token_id in range(vocab_size)]
token_bytes = torch.tensor(token_bytes, dtype=torch.int32, device='cpu')
token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
with open(token_bytes_path, "wb") as f:
    torch.save(token_bytes, f)
print(f"Saved token_bytes to {token_bytes_path}")
