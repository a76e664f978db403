"""Long-context methods, one file each: the four steps' math, reference and implementations.

`get_method("page-sparse", budget_tokens=1024)` builds one by its registered name (the names
`hetero profile --method` takes); `METHODS` lists them.
"""

from .base import Method
from .bm25 import BM25Memory, BM25Retrieval
from .dense import DenseMemory, DenseRetrieval
from .dsa import DSAIndexer, DSAMemory
from .mac import MACMemory, MemoryAsContext
from .page_sparse import PageSparseAttention, PageSparseMemory, dense_attention
from .seer import SeerAttention, SeerMemory
from .twostage import TwoStageMemory, TwoStageRetrieval

# registered name -> class; the class name is accepted too
METHODS: dict[str, type[Method]] = {"page-sparse": PageSparseAttention, "dsa": DSAIndexer, "seer": SeerAttention,
                                   "mac": MemoryAsContext, "bm25": BM25Retrieval, "dense": DenseRetrieval,
                                   "twostage": TwoStageRetrieval}


def get_method(name: str, **options) -> Method:
    """The method registered as `name` (or named by its class), built with `options`."""
    by_class = {cls.__name__: cls for cls in METHODS.values()}
    cls = METHODS.get(name) or by_class.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; methods are {', '.join(METHODS)}")
    return cls(**options)


__all__ = ["METHODS", "BM25Memory", "BM25Retrieval", "DSAIndexer", "DSAMemory", "DenseMemory", "DenseRetrieval",
           "MACMemory", "MemoryAsContext", "Method", "PageSparseAttention", "PageSparseMemory", "SeerAttention",
           "SeerMemory", "TwoStageMemory", "TwoStageRetrieval", "dense_attention", "get_method"]
