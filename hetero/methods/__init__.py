"""Long-context methods, one file each: the four steps' math, reference and implementations."""

from .base import Method
from .page_sparse import PageSparseAttention, PageSparseMemory, dense_attention

__all__ = ["Method", "PageSparseAttention", "PageSparseMemory", "dense_attention"]
