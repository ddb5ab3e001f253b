"""The one place that turns (prompt, response) into chat-templated token ids and a response mask.

Scoring, masking, training and evaluation all call `encode_pair`, so a per-token score always
lines up with the token it is trained on.

Conventions (see docs/ARCHITECTURE.md):
- "prompt" (STM, paper Table 1): user turn = the prompt, assistant turn = the response; the
  response tokens are scored conditioned on the whole templated prompt.
- "response_only" (used to rank generated candidates): the same template with an EMPTY user
  turn, so the response is scored without the instruction but still as an assistant turn.

The response part is everything the template renders after the generation prompt, up to and
including the last special token (the end-of-turn token); trailing template text after it
(usually a newline) is neither scored nor trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.data.records import CONVENTIONS, RESPONSE_ONLY
from core.errors import LensError


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one templated conversation; response tokens are ids[response_start:]."""

    input_ids: list[int]
    response_start: int
    truncated: bool = False

    @property
    def n_response(self) -> int:
        """Number of response tokens."""
        return len(self.input_ids) - self.response_start

    @property
    def response_mask(self) -> list[int]:
        """1 for response tokens, 0 for the rest."""
        return [0] * self.response_start + [1] * self.n_response


def prompt_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """Chat messages for a user prompt (optionally with a system turn)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


def render_generation_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> str:
    """Templated text up to where the assistant's answer begins (used for generation too)."""
    return tokenizer.apply_chat_template(
        prompt_messages(prompt, system), tokenize=False, add_generation_prompt=True
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the templated prompt up to the assistant's answer: exactly the prefix that
    `encode_pair` puts before the response, so generated text is scored in the same context."""
    return _ids(tokenizer, render_generation_prompt(tokenizer, prompt, system))


def encode_pair(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    convention: str = "prompt",
    max_length: int | None = None,
    system: str | None = None,
) -> EncodedPair:
    """Chat-template (prompt, response) and return the ids and where the response starts.

    Over-long sequences are truncated, never silently: the response is cut from the right; a
    prompt that would leave less than half the budget is cut from the left. `truncated` says so.
    """
    if convention not in CONVENTIONS:
        raise LensError(
            f"Unknown perplexity convention '{convention}' (use {', '.join(CONVENTIONS)})."
        )
    user = "" if convention == RESPONSE_ONLY else prompt
    prefix = render_generation_prompt(tokenizer, user, system)
    full = tokenizer.apply_chat_template(
        prompt_messages(user, system) + [{"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(prefix):
        raise LensError(
            "This model's chat template does not render the prompt as a prefix of the "
            "conversation, so response tokens cannot be located; use a plain template."
        )
    prompt_ids = encode_prompt(tokenizer, user, system)
    response_ids = _ids(tokenizer, full[len(prefix) :])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    last_special = max((i for i, t in enumerate(response_ids) if t in special), default=None)
    if last_special is not None:
        response_ids = response_ids[: last_special + 1]
    if not response_ids:
        raise LensError("The response is empty after templating.")
    truncated = False
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        truncated = True
        if max_length < 2:
            raise LensError(f"max_length {max_length} is too small to score anything.")
        keep_prompt = min(len(prompt_ids), max(1, max_length // 2, max_length - len(response_ids)))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        response_ids = response_ids[: max_length - keep_prompt]
    return EncodedPair(prompt_ids + response_ids, len(prompt_ids), truncated)


def encode_plain_pair(
    tokenizer: Any, context: str, continuation: str, *, max_length: int | None = None
) -> EncodedPair:
    """lm-evaluation-harness's loglikelihood request: plain text, no chat template and no
    special tokens; trailing spaces of `context` move to the continuation; the continuation's
    ids are those of the whole text after the context's ids. Over `max_length` + 1 tokens, the
    context is cut from the left (as lm-eval does); the response is the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    if start >= len(whole):
        raise LensError(f"The continuation {continuation!r} adds no token to its context.")
    truncated = False
    if max_length is not None and len(whole) > max_length + 1:
        cut = len(whole) - (max_length + 1)
        whole, start, truncated = whole[cut:], max(1, start - cut), True
    return EncodedPair(input_ids=list(whole), response_start=max(1, start), truncated=truncated)
