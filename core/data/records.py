"""The example record every task and user dataset is turned into."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair.

    `prompt` is the user turn, `response` the ground-truth assistant turn. `meta` holds what the
    task's scorer needs (asserts, gold answer, choices, ...) and must be JSON-serialisable.
    """

    id: str
    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


@dataclass
class LoadReport:
    """What happened while loading a dataset, so nothing is dropped silently."""

    source: str
    loaded: int = 0
    skipped_empty: int = 0
    skipped_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the UI and CLI."""
        text = f"{self.source}: {self.loaded} examples"
        if self.skipped_empty:
            text += f", {self.skipped_empty} empty rows skipped"
        return text


@dataclass
class Dataset:
    """A named list of examples plus the report of how it was loaded."""

    name: str
    examples: list[Example]
    report: LoadReport

    def fingerprint(self) -> str:
        """Content hash of the examples (ids, prompts, responses), stable across runs."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([ex.id, ex.prompt, ex.response]).encode())
        return h.hexdigest()[:16]


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

    def to_example(self) -> Example:
        """The unscored example behind this record."""
        return Example(id=self.id, prompt=self.prompt, response=self.response, meta=dict(self.meta))

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


def prompt_hash(prompt: str) -> str:
    """Short content hash of a prompt: ties a stored or resumed answer to the exact instruction."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]
