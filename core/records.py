"""Scored-example record: per-token scores aligned with the chat-templated token ids.

A `ScoredExample` holds the whole templated conversation (`token_ids`, `tokens`) and, for the
response part only (positions `response_start` .. end), the log-probability of each token under
the scoring model, its rank and the model's top-k alternatives. Response tokens always form the
tail of the sequence, so the response mask is `[0] * response_start + [1] * n_response`.
Masking, training and evaluation index into these same ids, so a per-token value always lines up
with the token it belongs to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROMPT_CONDITIONED = "prompt"
RESPONSE_ONLY = "response_only"
CONVENTIONS = (PROMPT_CONDITIONED, RESPONSE_ONLY)


@dataclass
class ScoredExample:
    """Per-token scores of one example's response under one model and convention."""

    id: str
    prompt: str
    response: str
    convention: str
    token_ids: list[int]
    tokens: list[str]
    response_start: int
    logprob: list[float]
    rank: list[int]
    top_ids: list[list[int]]
    top_tokens: list[list[str]]
    top_logprobs: list[list[float]]
    truncated: bool = False
    source: str = "ground_truth"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_response(self) -> int:
        """Number of scored (response) tokens, end-of-turn token included."""
        return len(self.token_ids) - self.response_start

    @property
    def response_mask(self) -> list[int]:
        """1 for response tokens (scored and trainable), 0 for prompt/template tokens."""
        return [0] * self.response_start + [1] * self.n_response

    @property
    def response_tokens(self) -> list[str]:
        """Decoded strings of the response tokens."""
        return self.tokens[self.response_start :]

    @property
    def response_token_ids(self) -> list[int]:
        """Ids of the response tokens."""
        return self.token_ids[self.response_start :]

    def ppl_array(self) -> np.ndarray:
        """Token perplexities exp(-logprob) of the response tokens, as float64."""
        return np.exp(-np.asarray(self.logprob, dtype=np.float64))

    @property
    def ppl(self) -> list[float]:
        """Token perplexities of the response tokens."""
        return self.ppl_array().tolist()

    @property
    def seq_ppl(self) -> float:
        """Sequence perplexity: exp(mean NLL over response tokens)."""
        if not self.logprob:
            return float("nan")
        return math.exp(-float(np.mean(self.logprob)))

    def to_dict(self) -> dict[str, Any]:
        """Storage form (everything needed to rebuild the record)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoredExample:
        """Inverse of `to_dict`; ignores derived keys written by `to_json_row`."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json_row(self) -> dict[str, Any]:
        """The CLI's output row: storage fields plus derived ppl, mask and sequence ppl."""
        row = self.to_dict()
        row["ppl"] = self.ppl
        row["response_mask"] = self.response_mask
        row["seq_ppl"] = self.seq_ppl
        return row
