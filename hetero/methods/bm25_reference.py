"""BM25 in numpy float64: the definition every implementation of `BM25Retrieval` is tested
against (and the tokenizer they all share).

    tokenize   lowercase the text, take every run of two or more word characters (the regex
               TOKEN_PATTERN, Unicode-aware), drop the STOPWORDS
    index      per (term t, document d) with tf = count of t in d, dl = tokens of d,
               avgdl = mean dl over the N documents, df = documents holding t:
                   idf(t)    = ln(1 + (N - df + 0.5) / (df + 0.5))            (Lucene)
                   w(t, d)   = idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    relevancy  score(q, d) = sum of w(t, d) over the query's tokens t (a repeated token counts
               each time; a token not in the vocabulary, and a document without t, add 0)
    retrieval  the k best documents: score descending, equal scores to the lower document id;
               fewer than k documents: -1 ids (score -inf) pad the row
    apply      the prompt: retrieved passages (best first, those with a positive score), within
               a budget of words, then the query (see `prompt`)
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
# English stop words: Lucene's classic English stop set (the same 33 words as bm25s's "en" list)
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with"))
K1, B = 1.2, 0.75

_find = re.compile(TOKEN_PATTERN).findall


def tokenize(text: str, stopwords=STOPWORDS) -> list[str]:
    """The default tokenizer: lowercase, runs of >= 2 word characters, stop words dropped."""
    return [t for t in _find(text.lower()) if t not in stopwords]


def idf(df, n: int):
    """Lucene's idf of terms in `df` of `n` documents (always > 0)."""
    df = np.asarray(df, dtype=np.float64)
    return np.log(1.0 + (n - df + 0.5) / (df + 0.5))


def index(doc_tokens: list[list[str]], k1: float = K1, b: float = B) -> dict:
    """{"vocab": term -> id (first appearance order), "n": N, "avgdl": float,
    "postings": term id -> (doc ids int64 ascending, weights float64), "dl": int64 [N]}."""
    vocab: dict[str, int] = {}
    for tokens in doc_tokens:
        for t in tokens:
            vocab.setdefault(t, len(vocab))
    n = len(doc_tokens)
    dl = np.array([len(t) for t in doc_tokens], dtype=np.int64)
    avgdl = float(dl.sum()) / n if n else 0.0
    rows: dict[int, tuple[list[int], list[int]]] = {}
    for d, tokens in enumerate(doc_tokens):
        for t, tf in Counter(tokens).items():
            docs, tfs = rows.setdefault(vocab[t], ([], []))
            docs.append(d)
            tfs.append(tf)
    postings = {}
    for t, (docs, tfs) in rows.items():
        docs = np.array(docs, dtype=np.int64)
        tf = np.array(tfs, dtype=np.float64)
        norm = k1 * (1.0 - b + b * dl[docs] / avgdl)
        postings[t] = (docs, float(idf(len(docs), n)) * tf / (tf + norm))
    return {"vocab": vocab, "n": n, "avgdl": avgdl, "postings": postings, "dl": dl}


def scores(idx: dict, query_tokens: list[list[str]]) -> np.ndarray:
    """float64 [B, N]: each query's score of every document."""
    out = np.zeros((len(query_tokens), idx["n"]), dtype=np.float64)
    for q, tokens in enumerate(query_tokens):
        for t in tokens:
            term = idx["vocab"].get(t)
            if term is not None:
                docs, w = idx["postings"][term]
                out[q, docs] += w
    return out


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, k], scores float64 [B, k]): per row the k best documents, score
    descending, equal scores to the lower id; -1 / -inf padding past the row's documents."""
    batch, n = scores.shape
    ids = np.full((batch, k), -1, dtype=np.int64)
    vals = np.full((batch, k), -np.inf)
    width = min(k, n)
    for q in range(batch):
        order = np.lexsort((np.arange(n), -scores[q]))[:width]  # by -score, then id
        ids[q, :width] = order
        vals[q, :width] = scores[q, order]
    return ids, vals


def prompt(passages: list[str], query: str, budget: int, separator: str = "\n\n") -> str:
    """The augmented prompt: `passages` (best first) joined by `separator`, then the query.
    `budget` counts words (whitespace-separated) of passages: passages are taken whole while
    they fit; the first that does not is cut to the words left; the query is never cut."""
    kept, left = [], budget
    for text in passages:
        if left <= 0:
            break
        words = text.split()
        if len(words) <= left:
            kept.append(text)
            left -= len(words)
        else:
            kept.append(" ".join(words[:left]))
            left = 0
    return separator.join([*kept, query])
