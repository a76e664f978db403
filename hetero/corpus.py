"""A real text corpus with nothing to download: the docstrings of the Python standard library.

    from hetero import corpus
    docs = corpus.stdlib()                # ~4-5K documents, one per documented object
    docs[0].title, docs[0].text           # 'abc', 'abc\\nAbstract Base Classes (ABCs) according to PEP 3119.'
    texts = docs.texts                    # tuple[str]: what a retrieval method indexes
    qs = corpus.queries(docs, 200)        # real queries: content words of documents' first sentences
    big = corpus.scale_up(docs, 1_000_000)  # a synthetic 1M-document corpus with the same term statistics

`stdlib()` imports the modules of a fixed allow-list (`MODULES`: pure-Python modules with no
import side effects, no test packages, nothing that opens windows or browsers, prints, or
differs by platform in what it defines) and makes one document per documented object: the
module itself, its public classes and functions, and their public methods and properties,
each titled by its qualified name (`json.JSONDecoder.decode`), its text the title line then
the cleaned docstring. Walking is in sorted order, so for one Python version the corpus is
the same on every run and every machine; a module of the list that a version lacks (or that
fails to import) is skipped. Built once per process (cached), in well under a second.

`scale_up` makes a large corpus for benchmarks: each synthetic document resamples the words
of two real documents (three quarters from the first, one quarter from the second), its
length the first one's (capped at MAX_SCALED_WORDS words), so document lengths, term
burstiness and each term's document frequency *as a fraction of the corpus* stay those of the
real corpus (the vocabulary does not grow with the corpus). The documents are stored as word
ids and made into strings only when read.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import re
import subprocess
import sys
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where needed: the stdlib walk runs this file in an interpreter that has
# only the standard library

# The modules whose docstrings make the corpus, in the order walked (sorted). Left out on
# purpose: test packages (test, unittest.test, ...), anything with import side effects
# (antigravity, this, idlelib, tkinter, turtle*, webbrowser, site), modules deprecated in 3.11
# (they warn on import and are gone in 3.13), and modules that define different objects on
# different platforms (os, subprocess, socket, selectors, signal, shutil, tempfile, locale,
# getpass, multiprocessing, asyncio's event loops, ctypes, curses, ...).
MODULES = tuple(sorted((
    "abc", "argparse", "ast", "asyncio.base_events", "asyncio.coroutines", "asyncio.events", "asyncio.exceptions",
    "asyncio.futures", "asyncio.locks", "asyncio.protocols", "asyncio.queues", "asyncio.runners", "asyncio.streams",
    "asyncio.taskgroups", "asyncio.tasks", "asyncio.timeouts", "asyncio.transports", "base64", "bdb", "bisect",
    "cProfile", "calendar", "cmd", "code", "codecs", "codeop", "collections", "collections.abc", "colorsys",
    "compileall", "concurrent.futures", "concurrent.futures.thread", "configparser", "contextlib", "contextvars",
    "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email",
    "email.base64mime", "email.charset", "email.contentmanager", "email.encoders", "email.errors",
    "email.feedparser", "email.generator", "email.header", "email.headerregistry", "email.iterators",
    "email.message", "email.mime", "email.mime.application", "email.mime.audio", "email.mime.base",
    "email.mime.image", "email.mime.message", "email.mime.multipart", "email.mime.nonmultipart", "email.mime.text",
    "email.parser", "email.policy", "email.quoprimime", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "genericpath", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.entities", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.machinery",
    "importlib.metadata", "importlib.readers", "importlib.resources", "importlib.resources.abc",
    "importlib.resources.readers", "importlib.resources.simple", "importlib.simple", "importlib.util", "inspect",
    "io", "ipaddress", "json", "json.decoder", "json.encoder", "json.scanner", "json.tool", "keyword",
    "linecache", "logging", "logging.config", "logging.handlers", "mailbox", "mimetypes", "modulefinder",
    "netrc", "ntpath", "nturl2path", "numbers", "opcode", "operator", "optparse", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "plistlib", "poplib", "posixpath", "pprint", "profile", "pstats", "py_compile",
    "pyclbr", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "shelve", "shlex",
    "smtplib", "socketserver", "stat", "statistics", "string", "stringprep", "struct", "symtable", "tabnanny",
    "tarfile", "textwrap", "threading", "timeit", "token", "tokenize", "tomllib", "trace", "traceback",
    "tracemalloc", "types", "typing", "unittest", "unittest.async_case", "unittest.case", "unittest.loader",
    "unittest.main", "unittest.mock", "unittest.result", "unittest.runner", "unittest.suite", "urllib",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.response", "urllib.robotparser", "uuid", "warnings",
    "wave", "weakref", "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util",
    "wsgiref.validate", "xml", "xml.dom", "xml.dom.NodeFilter", "xml.dom.domreg", "xml.dom.expatbuilder",
    "xml.dom.minicompat", "xml.dom.minidom", "xml.dom.pulldom", "xml.dom.xmlbuilder", "xml.etree",
    "xml.etree.ElementInclude", "xml.etree.ElementPath", "xml.etree.ElementTree", "xml.parsers",
    "xml.parsers.expat", "xml.sax", "xml.sax.expatreader", "xml.sax.handler", "xml.sax.saxutils",
    "xml.sax.xmlreader", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zoneinfo",
)))

# module-level objects that are documents, and class members that are
_TOP_KINDS = (type, types.FunctionType, types.BuiltinFunctionType)
_MEMBER_KINDS = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                 types.ClassMethodDescriptorType, types.GetSetDescriptorType, property)

MAX_SCALED_WORDS = 128  # longest synthetic document of scale_up, in words
_WORDS = re.compile(r"(?u)\b\w\w+\b").findall  # scale_up's words: the BM25 tokenizer's, stop words kept


@dataclass(frozen=True)
class Document:
    """One document: its position in the corpus, title (the object's qualified name) and
    text (the title line, then the docstring)."""

    id: int
    title: str
    text: str


class Corpus(Sequence):
    """An immutable sequence of `Document`s; `texts` and `titles` as tuples of str."""

    def __init__(self, titles, texts):
        self.titles = tuple(titles)
        self.texts = tuple(texts)
        if len(self.titles) != len(self.texts):
            raise ValueError(f"{len(self.titles)} titles but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        return Document(i, self.titles[i], self.texts[i])

    def __repr__(self) -> str:
        return f"Corpus({len(self)} documents)"


# --- the standard library's docstrings -----------------------------------------------------

def _import(name: str):
    """The module, or None when it is missing or fails to import (anything it prints or warns
    is swallowed)."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except Exception:
        return None


def _doc(obj) -> str | None:
    doc = obj.__doc__ if not isinstance(obj, (classmethod, staticmethod)) else obj.__func__.__doc__
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc)
    return doc or None


def _documented(module) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module and its public objects, sorted by name."""
    mod = module.__name__
    out = []
    doc = _doc(module)
    if doc:
        out.append((mod, doc))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not isinstance(obj, _TOP_KINDS):
            continue
        # defined here under this name (not an import, not an alias)
        if getattr(obj, "__module__", None) != mod or getattr(obj, "__qualname__", None) != name:
            continue
        doc = _doc(obj)
        if doc:
            out.append((f"{mod}.{name}", doc))
        if isinstance(obj, type):
            for member, value in sorted(vars(obj).items()):
                if member.startswith("_"):
                    continue
                target = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if not isinstance(target, _MEMBER_KINDS):
                    continue
                doc = _doc(target)
                if doc:
                    out.append((f"{mod}.{name}.{member}", doc))
    return out


def _walk() -> list[tuple[str, str]]:
    """(title, text) of every document, walking MODULES in this process."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io's deprecation when its attributes are read
        for name in MODULES:
            module = _import(name)
            if module is None:
                continue
            for title, doc in _documented(module):
                out.append((title, f"{title}\n{doc}"))
    return out


# The walk runs in a fresh interpreter (-I -S: no site-packages, no environment): what this
# process imported or patched cannot change the corpus (importing torch, for one, replaces
# inspect.getfile), and the allow-list's imports stay out of this process.
_CHILD = ("import importlib.util, json, sys\n"
          "spec = importlib.util.spec_from_file_location('_hetero_corpus', sys.argv[1])\n"
          "m = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
          "spec.loader.exec_module(m)\n"
          "sys.stdout.write(json.dumps(m._walk()))\n")


@functools.cache
def stdlib() -> Corpus:
    """The corpus of the standard library's docstrings (see the module's docstring), walked
    in a fresh interpreter and cached for the process (in-process, with a RuntimeWarning,
    where no interpreter can be started). RuntimeError when docstrings are stripped (-OO)."""
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD, __file__], capture_output=True, timeout=120,
                              check=True)
        pairs = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        warnings.warn(f"could not walk the standard library in a fresh interpreter ({exc!r}); walking it here, "
                      f"where modules this process patched may change the corpus", RuntimeWarning, stacklevel=2)
        pairs = _walk()
    if not pairs:
        raise RuntimeError("no docstrings found in the standard library: is Python running with -OO?")
    return Corpus([t for t, _ in pairs], [x for _, x in pairs])


# --- queries ---------------------------------------------------------------------------

_FIRST_SENTENCE = re.compile(r"(.+?)(?:\.\s|\.$|\n\s*\n|$)", re.S)


def queries(corpus: Corpus, n: int = 200, seed: int = 0, terms: tuple[int, int] = (2, 4)) -> list[str]:
    """`n` distinct real queries made from the corpus (seeded): for documents drawn at
    random, 2-4 (`terms`) content words (the BM25 tokenizer's words minus its stop words) of
    the first sentence of the docstring, in their order; one query in five is instead the
    words of the object's qualified name (`json.JSONDecoder.decode` -> "json jsondecoder
    decode"). ValueError when the corpus cannot give `n` distinct queries."""
    import numpy as np

    from .methods.bm25_reference import STOPWORDS

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    lo, hi = terms
    if not (1 <= lo <= hi):
        raise ValueError(f"terms must be (min, max) with 1 <= min <= max, got {terms!r}")
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 20 * n + 1000:
            raise ValueError(f"the corpus ({len(corpus)} documents) gave only {len(out)} distinct queries of {n}")
        doc = corpus[int(rng.integers(len(corpus)))]
        if rng.random() < 0.2:
            words = _WORDS(doc.title.lower())
        else:
            body = doc.text.split("\n", 1)[1] if "\n" in doc.text else doc.text
            sentence = _FIRST_SENTENCE.match(body.strip()).group(1)
            words = [w for w in _WORDS(sentence.lower()) if w not in STOPWORDS]
            if len(words) > hi:
                count = int(rng.integers(lo, hi + 1))
                keep = np.sort(rng.choice(len(words), count, replace=False))
                words = [words[i] for i in keep]
        if len(words) >= 1:
            out.setdefault(" ".join(words))
    return list(out)


# --- synthetic scale-up ------------------------------------------------------------------

class ScaledCorpus(Sequence):
    """`n` synthetic documents (see `scale_up`), stored as word ids; reading one builds its
    text. Indexing gives the text (a str) — this is a sequence of texts, like `Corpus.texts`;
    `texts` is the corpus itself and `titles` each document's source title."""

    def __init__(self, words: tuple[str, ...], ids: np.ndarray, offsets: np.ndarray, sources: np.ndarray,
                 source_titles: tuple[str, ...]):
        import numpy as np

        self.words = words  # the word of each word id
        self._ids, self._offsets = ids, offsets
        self._sources, self._source_titles = sources, source_titles
        self._lookup = np.array(words, dtype=object)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return " ".join(self._lookup[self._ids[self._offsets[i]:self._offsets[i + 1]]])

    def __iter__(self, chunk: int = 8192):
        words, ids, offsets = self.words, self._ids, self._offsets
        for lo in range(0, len(self), chunk):
            hi = min(lo + chunk, len(self))
            flat = [words[i] for i in ids[offsets[lo]:offsets[hi]].tolist()]
            ends = (offsets[lo:hi + 1] - offsets[lo]).tolist()
            for j in range(hi - lo):
                yield " ".join(flat[ends[j]:ends[j + 1]])

    @property
    def texts(self) -> "ScaledCorpus":
        return self

    @property
    def titles(self) -> list[str]:
        return [f"{self._source_titles[s]} (resampled)" for s in self._sources.tolist()]

    @property
    def nbytes(self) -> int:
        return int(self._ids.nbytes + self._offsets.nbytes + self._sources.nbytes)

    def __repr__(self) -> str:
        return f"ScaledCorpus({len(self)} documents, {len(self._ids)} words)"


def scale_up(corpus: Corpus, n_docs: int, seed: int = 0, chunk: int = 200_000) -> ScaledCorpus:
    """`n_docs` synthetic documents made from `corpus` (seeded): document i resamples, with
    replacement, the words (lowercased, the BM25 tokenizer's words, stop words kept) of a
    random real document A (with probability 3/4 per word) and another B (1/4); its length
    is A's, capped at MAX_SCALED_WORDS. About 30 words a document: 1M documents take ~200 MB
    and a few seconds."""
    import numpy as np

    if isinstance(n_docs, bool) or not isinstance(n_docs, (int, np.integer)) or n_docs < 0:
        raise ValueError(f"n_docs must be an int >= 0, got {n_docs!r}")
    if len(corpus) == 0:
        raise ValueError("corpus is empty")
    texts = corpus.texts if hasattr(corpus, "texts") else corpus
    vocab: dict[str, int] = {}
    stream, lengths = [], []
    for text in texts:
        ids = [vocab.setdefault(w, len(vocab)) for w in _WORDS(text.lower())]
        stream.extend(ids)
        lengths.append(len(ids))
    stream = np.asarray(stream, dtype=np.int32)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    usable = np.flatnonzero(lengths > 0)
    if usable.size == 0:
        raise ValueError("no document of the corpus has a word")
    rng = np.random.default_rng(seed)
    n_docs = int(n_docs)
    first = usable[rng.integers(usable.size, size=n_docs)]
    second = usable[rng.integers(usable.size, size=n_docs)]
    doc_len = np.minimum(lengths[first], MAX_SCALED_WORDS)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(doc_len, out=offsets[1:])
    ids = np.empty(int(offsets[-1]), dtype=np.int32)
    for lo in range(0, n_docs, chunk):  # bounded temporaries
        hi = min(lo + chunk, n_docs)
        a, b, n = offsets[lo], offsets[hi], doc_len[lo:hi]
        owner = np.repeat(np.arange(lo, hi), n)
        src = np.where(rng.random(b - a) < 0.75, first[owner], second[owner])
        pos = starts[src] + np.minimum((rng.random(b - a) * lengths[src]).astype(np.int64), lengths[src] - 1)
        ids[a:b] = stream[pos]
    words = tuple(vocab)
    return ScaledCorpus(words, ids, offsets, first.astype(np.int32), tuple(corpus.titles))
