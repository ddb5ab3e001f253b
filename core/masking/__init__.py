"""Masking: which response tokens leave the loss (STM and its controls), and the masked-set export."""

#: The paper's token-perplexity threshold (docs/METHOD.md): the one default every page, config and
#: command starts from.
DEFAULT_TAU = 2.5

#: The τ a page or URL may set: token perplexity is at least 1, and the masking studio's slider
#: ends at 1000.
TAU_MIN, TAU_MAX = 1.0, 1000.0


def parse_tau(text: object) -> float | None:
    """τ from text (a URL's ``?tau=``): the number when it is finite and within
    [TAU_MIN, TAU_MAX], else None."""
    try:
        value = float(str(text).strip())
    except ValueError:
        return None
    return value if TAU_MIN <= value <= TAU_MAX else None
