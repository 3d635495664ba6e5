"""
Synthetic long-range tasks, planted in natural filler text: each case is a token sequence
whose answer can be predicted only from something far back in it.

Every case is built from pieces that are tokenized one by one and concatenated, so the token
positions of the planted facts and of the answer are known exactly (no search in the
detokenized text). The filler is a contiguous stretch of natural text (a TokenCorpus window),
never one repeated sentence. Layout of a case of `history_tokens` tokens:

    [BOS] filler ... NEEDLE ... filler ... QUESTION | ANSWER
    `----------------- history_tokens ----------------'  `- the horizon to predict

`depth` (0..1) is the share of the filler that comes before the needle: the needle starts
after round(depth * filler_tokens) filler tokens (plus the BOS and any plant placed before
it), so depth 0 puts it right after the BOS and depth 1 right before the question. The case
records needle_start/needle_end so tests and the harness can check where it really is. Tasks (numbers are drawn from the case's own RNG):

  passkey   needle  "The pass key is 48213. Remember it. 48213 is the pass key."
            question "What is the pass key? The pass key is "        answer "48213"
  needle    (multi-key) four facts "The magic number of the {key} is {value}." at random
            depths, the asked one at `depth`, the others are distractor keys
            question "What is the magic number of the {key}? The magic number of the {key} is "
            answer "{value}" (5 digits)
  repeat    a 48-token passage of other natural text marked "<<< ... >>>" at `depth`
            question "Repeat the marked passage: <<< "                 answer the passage
  assoc     a table of 12 pairs "key: value;" ("kiv: 7319;") at `depth`
            question "Look up kiv: "                                   answer "7319"
  vartrack  a chain "VAR QX = 52817 ." then "VAR LM = QX ." then "VAR PT = LM ." placed at
            increasing depths from `depth`, with two unrelated VAR lines as distractors
            question "What is the value of PT? PT = "                  answer "52817"

Answers never start with a space: the space that would precede them ends the question, so
an answer's tokens are only the retrieved content. needle and assoc cases also carry
`more_queries` (the other keys asked and answered, in text): a training row may go on with
them after the answer, which multiplies the retrieval targets a row holds (the multi-query
form of associative recall); an evaluation scores the one answer only.

A case as a document, for the chat demo (the fact far back in a text to --ingest):

    python -m megacontext.synthetic --task passkey --history 4096 --depth 0.2 --out passkey.txt

writes the history's text without its BOS and question (filler from the held-out test documents,
the CPU preset's tokenizer) and prints the question and the answer.

This module owns the templates and their construction. It never tokenizes whole documents
(longdocs.py) and never cuts rows for training (window_loader.py).
"""

import string
from dataclasses import dataclass, field

import numpy as np

TASKS = ("passkey", "needle", "repeat", "assoc", "vartrack")
KEY_WORDS = (
    "red lantern", "silver key", "old mill", "green door", "quiet harbor", "iron bridge", "paper crane",
    "glass tower", "stone well", "copper bell", "wooden horse", "amber lamp", "velvet box", "broken clock",
    "golden river", "frozen lake", "hidden garden", "northern road", "painted ship", "marble stair",
    "hollow tree", "distant bell", "crimson flag", "winter market", "salt mine", "clay pot", "blue heron",
    "white castle", "narrow gate", "open field",
)
REPEAT_TOKENS = 48
ASSOC_PAIRS = 12
NEEDLE_FACTS = 4


@dataclass
class Case:
    """One synthetic case. tokens = history + answer (numpy int64), history starts with BOS."""
    kind: str
    tokens: np.ndarray
    history_tokens: int           # len(history); the answer follows it
    answer_len: int
    depth: float
    needle_start: int             # token span of the fact that holds the answer
    needle_end: int
    extra: dict = field(default_factory=dict)

    @property
    def history(self):
        return self.tokens[:self.history_tokens]

    @property
    def answer(self):
        return self.tokens[self.history_tokens:self.history_tokens + self.answer_len]


def filler(rng, corpus, n_tokens):
    """n_tokens of contiguous natural text from a random document of the corpus (length-weighted);
    documents are chained when one is too short."""
    lengths = corpus.lengths()
    if lengths.sum() == 0:
        raise ValueError("the filler corpus is empty")
    out, need = [], n_tokens
    while need > 0:
        d = rng.choices(range(len(lengths)), weights=lengths)[0]
        doc = corpus.arrays[d]
        start = rng.randrange(0, max(1, len(doc) - need))
        piece = doc[start:start + need]
        out.append(piece.astype(np.int64))
        need -= len(piece)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _digits(rng, n):
    return str(rng.randrange(10 ** (n - 1), 10 ** n))


def _word(rng, n=3):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


def _var(rng):
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(2))


def _assemble(rng, corpus, bos, history_tokens, plants, question, answer):
    """[BOS] filler with `plants` (list of (depth, tokens)) inserted, then the question.

    plants are placed in order of depth, each at round(depth * room) into the filler-and-plants
    region; returns (tokens, starts) with the start index of every plant in the output."""
    fixed = 1 + sum(len(p) for _, p in plants) + len(question)
    n_filler = history_tokens - fixed
    if n_filler < 0:
        raise ValueError(f"history_tokens={history_tokens} is too short for this task: its fixed parts take "
                         f"{fixed} tokens; use a longer history")
    text = filler(rng, corpus, n_filler)
    order = sorted(range(len(plants)), key=lambda i: plants[i][0])
    pieces, starts, cursor, pos = [np.array([bos], dtype=np.int64)], [0] * len(plants), 0, 1
    for i in order:
        depth, toks = plants[i]
        # where in the filler this plant goes: depth of the whole history, clamped to what is left
        at = min(max(cursor, round(depth * n_filler)), n_filler)
        pieces.append(text[cursor:at])
        pos += at - cursor
        starts[i] = pos
        pieces.append(np.asarray(toks, dtype=np.int64))
        pos += len(toks)
        cursor = at
    pieces.append(text[cursor:])
    pieces.append(np.asarray(question, dtype=np.int64))
    pieces.append(np.asarray(answer, dtype=np.int64))
    tokens = np.concatenate(pieces)
    assert len(tokens) == history_tokens + len(answer)
    return tokens, starts


def make_case(kind, rng, tokenizer, corpus, history_tokens, depth):
    """A Case of the named task with a history of exactly history_tokens tokens."""
    enc = tokenizer.encode
    bos = tokenizer.get_bos_token_id()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    extra = {}
    if kind == "passkey":
        key = _digits(rng, 5)
        needle = enc(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        plants = [(depth, needle)]
        question, answer = enc("\nWhat is the pass key? The pass key is "), enc(key)
    elif kind == "needle":
        keys = rng.sample(KEY_WORDS, NEEDLE_FACTS)
        values = [_digits(rng, 5) for _ in keys]
        plants = [(depth, enc(f"\nThe magic number of the {keys[0]} is {values[0]}.\n"))]
        plants += [(rng.random(), enc(f"\nThe magic number of the {k} is {v}.\n")) for k, v in zip(keys[1:], values[1:])]
        question = enc(f"\nWhat is the magic number of the {keys[0]}? The magic number of the {keys[0]} is ")
        answer = enc(values[0])
        extra["distractors"] = keys[1:]
        extra["more_queries"] = [enc(f". What is the magic number of the {k}? The magic number of the {k} is {v}")
                                 for k, v in zip(keys[1:], values[1:])]
    elif kind == "repeat":
        passage = filler(rng, corpus, REPEAT_TOKENS)
        plants = [(depth, list(enc("\n<<< ")) + passage.tolist() + enc(" >>>\n"))]
        question, answer = enc("\nRepeat the marked passage: <<< "), passage.tolist()
    elif kind == "assoc":
        keys = set()
        while len(keys) < ASSOC_PAIRS:
            keys.add(_word(rng))
        keys = sorted(keys)  # a set iterates in hash order, which changes per process (PYTHONHASHSEED)
        rng.shuffle(keys)
        values = [_digits(rng, 4) for _ in keys]
        asked = rng.randrange(ASSOC_PAIRS)
        table = "".join(f"{k}: {v}; " for k, v in zip(keys, values))
        plants = [(depth, enc(f"\nTable: {table}\n"))]
        question, answer = enc(f"\nLook up {keys[asked]}: "), enc(values[asked])
        extra["asked"] = keys[asked]
        extra["more_queries"] = [enc(f"\nLook up {k}: {v}") for k, v in zip(keys, values) if k != keys[asked]]
    elif kind == "vartrack":
        names = set()
        while len(names) < 5:
            names.add(_var(rng))
        names = sorted(names)  # not the set's hash order (see assoc)
        rng.shuffle(names)
        a, b, c, d1, d2 = names
        value = _digits(rng, 5)
        # the chain starts at `depth`; its later links sit between there and the end
        later = sorted(depth + (1 - depth) * rng.random() * 0.9 for _ in range(2))
        plants = [(depth, enc(f"\nVAR {a} = {value} .\n")), (later[0], enc(f"\nVAR {b} = {a} .\n")),
                  (later[1], enc(f"\nVAR {c} = {b} .\n")),
                  (rng.random(), enc(f"\nVAR {d1} = {_digits(rng, 5)} .\n")), (rng.random(), enc(f"\nVAR {d2} = {d1} .\n"))]
        question, answer = enc(f"\nWhat is the value of {c}? {c} = "), enc(value)
        extra["chain"] = [a, b, c]
    else:
        raise ValueError(f"unknown synthetic task {kind!r}; known: {', '.join(TASKS)}")
    tokens, starts = _assemble(rng, corpus, bos, history_tokens, plants, question, answer)
    extra["filler_tokens"] = history_tokens - 1 - sum(len(p) for _, p in plants) - len(question)
    extra["question_start"] = history_tokens - len(question)
    return Case(kind=kind, tokens=tokens, history_tokens=history_tokens, answer_len=len(answer), depth=depth,
                needle_start=starts[0], needle_end=starts[0] + len(plants[0][1]), extra=extra)


def main(argv=None):
    """Write one case's history as a text file (see the module docstring)."""
    import argparse
    import random
    import sys
    parser = argparse.ArgumentParser(description="Write a synthetic long-range case as a document to ingest.")
    parser.add_argument("--task", default="passkey", choices=TASKS)
    parser.add_argument("--history", type=int, default=4096, help="history length in tokens (default 4096)")
    parser.add_argument("--depth", type=float, default=0.2, help="where the fact sits, 0..1 (default 0.2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the text file to write")
    args = parser.parse_args(argv)
    try:
        from nanochat.tokenizer import get_tokenizer
        from megacontext.longdocs import load_corpus
        tokenizer = get_tokenizer()
        case = make_case(args.task, random.Random(args.seed), tokenizer, load_corpus(tokenizer, "test"),
                         args.history, args.depth)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    q = case.extra["question_start"]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(tokenizer.decode(case.history[1:q].tolist()))
    back = q - case.needle_start
    print(f"wrote {args.out}: {q - 1:,} tokens, the fact {back:,} tokens before the end")
    print(f"fact:     {tokenizer.decode(case.tokens[case.needle_start:case.needle_end].tolist()).strip()!r}")
    print(f"question: {tokenizer.decode(case.history[q:].tolist())!r}")
    print(f"answer:   {tokenizer.decode(case.answer.tolist())!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
