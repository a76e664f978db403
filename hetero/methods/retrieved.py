"""What a retrieval method's step returns: the documents chosen per query and the prompt
augmented with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Retrieved:
    """Per query (row): the top-k document ids, best first (equal scores: lower id first),
    -1 where fewer than k documents exist; their scores (-inf at padding); and, for methods
    that build one, the augmented prompt (retrieved passages, then the query)."""

    ids: torch.Tensor  # int64 [B, k]
    scores: torch.Tensor  # float32 [B, k]
    prompts: list[str] | None = None

    @classmethod
    def build(cls, ids, scores, prompts=None) -> "Retrieved":
        ids = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).to(torch.int64).cpu()
        scores = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
        scores = scores.to(torch.float32).cpu()
        if ids.shape != scores.shape or ids.dim() != 2:
            raise ValueError(f"ids {list(ids.shape)} and scores {list(scores.shape)} must both be [queries, k]")
        return cls(ids, scores, list(prompts) if prompts is not None else None)

    def __len__(self) -> int:
        return int(self.ids.shape[0])
