"""hetero.corpus: the standard library's docstrings as a corpus, real queries, and the
synthetic scale-up."""

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hetero import corpus
from hetero.methods import bm25_reference as ref

CORPUS_FILE = Path(corpus.__file__)


def _digest(docs) -> str:
    h = hashlib.sha256()
    for title, text in zip(docs.titles, docs.texts):
        h.update(title.encode() + b"\0" + text.encode() + b"\1")
    return h.hexdigest()


def test_stdlib_corpus_is_several_thousand_titled_documents():
    docs = corpus.stdlib()
    assert corpus.stdlib() is docs  # cached
    assert len(docs) >= 3000
    assert len(set(docs.titles)) == len(docs)  # qualified names are unique
    first = docs[0]
    assert (first.id, first.title) == (0, docs.titles[0]) and docs[-1].id == len(docs) - 1
    for d in docs[::97]:
        assert d.text.startswith(d.title + "\n") and len(d.text) > len(d.title) + 1
    assert "json.dumps" in docs.titles and "collections.OrderedDict" in docs.titles
    roots = {t.split(".")[0] for t in docs.titles}
    assert not roots & {"test", "idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "os",
                        "subprocess", "webbrowser", "site", "lib2to3"}
    assert [t.split(".")[0] for t in docs.titles] == sorted(t.split(".")[0] for t in docs.titles)
    with pytest.raises(IndexError):
        docs[len(docs)]
    assert [d.id for d in docs[2:5]] == [2, 3, 4]


def test_stdlib_corpus_is_the_same_in_a_fresh_interpreter():
    """Another process, with nothing imported before (the module loaded on its own)."""
    code = (f"import importlib.util, hashlib, sys\n"
            f"spec = importlib.util.spec_from_file_location('c', {str(CORPUS_FILE)!r})\n"
            f"c = sys.modules['c'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)\n"
            f"d = c.stdlib(); h = hashlib.sha256()\n"
            f"for a, b in zip(d.titles, d.texts): h.update(a.encode() + b'\\0' + b.encode() + b'\\1')\n"
            f"print(h.hexdigest())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == _digest(corpus.stdlib())
    assert out.stderr == ""  # nothing printed or warned while importing the allow-list


def test_queries_are_real_distinct_and_seeded():
    docs = corpus.stdlib()
    qs = corpus.queries(docs, 250, seed=3)
    assert len(qs) == len(set(qs)) == 250
    assert qs == corpus.queries(docs, 250, seed=3)
    assert qs != corpus.queries(docs, 250, seed=4)
    vocab = {t for text in docs.texts for t in ref.tokenize(text)}
    for q in qs:
        tokens = ref.tokenize(q)
        assert tokens and set(tokens) <= vocab, q
    assert corpus.queries(docs, 0) == []
    tiny = corpus.Corpus(["a"], ["a\nthe only words here"])
    with pytest.raises(ValueError, match="distinct queries"):
        corpus.queries(tiny, 50)
    with pytest.raises(ValueError, match="n must be"):
        corpus.queries(docs, -1)


def test_scale_up_keeps_the_words_and_lengths():
    docs = corpus.stdlib()
    big = corpus.scale_up(docs, 20_000, seed=1)
    assert len(big) == 20_000 and big.texts is big
    assert list(big[:3]) == [big[0], big[1], big[2]] and big[-1] == big[19_999]
    assert list(big)[:50] == [big[i] for i in range(50)]
    words = {w for text in docs.texts for w in corpus._WORDS(text.lower())}
    lengths = []
    for text in big[:2000]:
        ws = text.split()
        assert 1 <= len(ws) <= corpus.MAX_SCALED_WORDS and set(ws) <= words
        lengths.append(len(ws))
    real = np.minimum([len(corpus._WORDS(t.lower())) for t in docs.texts], corpus.MAX_SCALED_WORDS)
    assert abs(np.mean(lengths) - real.mean()) < 0.15 * real.mean()  # lengths resampled from the real ones
    again = corpus.scale_up(docs, 20_000, seed=1)
    assert [again[i] for i in range(0, 20_000, 999)] == [big[i] for i in range(0, 20_000, 999)]
    assert corpus.scale_up(docs, 100, seed=2)[0] != corpus.scale_up(docs, 100, seed=3)[0]
    assert len(big.titles) == 20_000 and big.titles[0].endswith("(resampled)")
    assert len(corpus.scale_up(docs, 0)) == 0
    with pytest.raises(ValueError, match="n_docs"):
        corpus.scale_up(docs, -5)


def test_scale_up_to_a_million_documents_is_quick_and_compact():
    start = time.perf_counter()
    big = corpus.scale_up(corpus.stdlib(), 1_000_000, seed=0)
    assert time.perf_counter() - start < 30
    assert len(big) == 1_000_000
    assert big.nbytes < 400e6  # word ids, not strings
    assert isinstance(big[999_999], str) and big[999_999]


def test_stdlib_corpus_ignores_what_this_process_patched(monkeypatch):
    """The walk runs in a fresh interpreter: a patched stdlib function does not leak in (and
    where no interpreter can be started, the walk runs here, with a warning)."""
    import json

    expected = corpus.stdlib()

    def dumps(*args, **kwargs):  # a patch, as torch patches inspect.getfile
        return ""

    monkeypatch.setattr(json, "dumps", dumps)
    corpus.stdlib.cache_clear()
    try:
        assert _digest(corpus.stdlib()) == _digest(expected)
        corpus.stdlib.cache_clear()
        monkeypatch.setattr(corpus.sys, "executable", "/nonexistent/python")
        with pytest.warns(RuntimeWarning, match="fresh interpreter"):
            here = corpus.stdlib()
        assert "json.dumps" not in here.titles and abs(len(here) - len(expected)) < 10
    finally:
        corpus.stdlib.cache_clear()
