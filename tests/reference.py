"""Straightforward reference implementations the tests and benchmarks compare the fast paths
with (not product code)."""

from __future__ import annotations

import torch

from core.data.records import PROMPT_CONDITIONED, Example
from core.model.encoding import encode_pair
from core.model.loading import LoadedModel


@torch.inference_mode()
def score_one_reference(
    lm: LoadedModel,
    example: Example,
    *,
    convention: str = PROMPT_CONDITIONED,
    max_length: int | None = None,
) -> list[float]:
    """Straightforward one-example scoring (full logits, no batching): the test reference and
    the benchmark's naive baseline. Returns the response tokens' log-probabilities."""
    enc = encode_pair(
        lm.tokenizer,
        example.prompt,
        example.response,
        convention=convention,
        max_length=min(max_length or lm.max_length, lm.max_length),
    )
    ids = torch.tensor([enc.input_ids], device=lm.device)
    logits = lm.model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = ids[0, 1:]
    lp = logprobs.gather(-1, targets[:, None])[:, 0]
    return lp[enc.response_start - 1 :].tolist()
