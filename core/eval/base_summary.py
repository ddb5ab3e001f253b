"""The base model's side of drift, kept once per model and probe so that a round after the first
runs one pass (the tuned model's) instead of two, with the KL still exact.

At an answer position let h_b be the base's last hidden state (the output head's input), z_b =
W h_b its logits, p = softmax(z_b), and h_t, z_t = W h_t the tuned model's. With the same output
head W on both sides (a LoRA/DoRA adapter does not touch it):

    KL(p || q) = sum_v p_v (z_b,v - z_t,v) - lse(z_b) + lse(z_t)
               = e . (h_b - h_t) - lse(z_b) + lse(z_t),        e = W^T p,

an identity, not an approximation: sum_v p_v (W h)_v = (W^T p) . h. So the base's side of every
answer position is summarised by h_b and e (two vectors of the hidden size, not the vocabulary),
lse(z_b), the base's entropy, its top-1 token and its log-probability of the answer token. That
is kept in `<cache_dir()>/drift_base.sqlite` (float64, h_b at the model's own precision; about
9 KB a position for a 576-wide model, 16 MB for the cpu preset's 100-prompt OOD probe), keyed by
the model, its dtype and device type, a digest of its output head and the exact token ids
teacher-forced; a changed model, template, answer or head is a new key.

It applies when the output head is a plain `torch.nn.Linear` without bias whose output is the
model's logits unchanged (no soft-capping or scaling: checked on every batch); otherwise
`core.eval.drift` runs both passes as before. Computed in float64 from the float32 logits and
hidden states; it agrees with the two-pass computation to about 1e-7 nats, and is exactly 0
when the tuned hidden states equal the base's (a fresh adapter).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.io import cache_dir
from core.kvstore import KVCache

if TYPE_CHECKING:
    import torch

    from core.model.encoding import EncodedPair
    from core.model.loading import LoadedModel

#: Bump when a summary's content or meaning changes: old rows are then never read.
SUMMARY_VERSION = 1
#: Vocabulary rows per float64 block of e = W^T p (bounds the float64 copy of the head).
_VOCAB_BLOCK = 8192
_FIELDS = ("h", "e", "lse", "lp", "ent", "top1")
#: One sequence's summary: the arrays named in `_FIELDS`, one row per answer position.
Summary = dict[str, np.ndarray]


def _encode(summary: Summary) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **summary)
    return buf.getvalue()


def _decode(value: bytes | str) -> Summary:
    data = value.encode() if isinstance(value, str) else value
    with np.load(io.BytesIO(data)) as npz:
        return {name: npz[name] for name in _FIELDS}


class BaseSummaryCache(KVCache[Summary]):
    """Per teacher-forced sequence, the base model's summary of its answer positions."""

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__(
            Path(path) if path else cache_dir() / "drift_base.sqlite",
            "summaries",
            encode=_encode,
            decode=_decode,
        )

    @staticmethod
    def key(model_key: str, enc: EncodedPair) -> str:
        """Cache key of one sequence's summary under `model_key` (`summary_model_key`)."""
        payload = json.dumps([SUMMARY_VERSION, model_key, list(enc.input_ids), enc.response_start])
        return hashlib.sha256(payload.encode()).hexdigest()


def plain_head(lm: LoadedModel) -> torch.nn.Linear | None:
    """The model's output head when the summary identity holds for it (a plain, bias-free
    `nn.Linear`: an adapter or a saved copy on the head wraps it), else None."""
    import torch  # lazy: heavy

    getter = getattr(lm.model, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head


def summary_model_key(lm: LoadedModel, head: torch.nn.Linear) -> str:
    """What identifies the base side of a summary: the model and dtype (`cache_key`), the device
    type (kernels differ) and a digest of a strided sample of the head's weights."""
    import torch  # lazy: heavy

    with torch.no_grad():
        flat = head.weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].float().cpu().numpy()
    digest = hashlib.sha256(sample.tobytes()).hexdigest()[:16]
    shape = "x".join(str(s) for s in head.weight.shape)
    return f"{lm.cache_key}|{lm.device.type}|head:{shape}:{digest}"


def forward_with_hidden(
    lm: LoadedModel, head: torch.nn.Linear, encs: Sequence[EncodedPair]
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """`lm.response_logits(encs)` and, per pair, the head's input at the same positions (None
    when the head's output is not exactly the logits: then the identity does not hold)."""
    import torch  # lazy: heavy

    seen: dict[str, torch.Tensor] = {}

    def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        seen["h"], seen["z"] = args[0], output

    handle = head.register_forward_hook(hook)
    try:
        logits = lm.response_logits(encs)
    finally:
        handle.remove()
    h, z = seen.get("h"), seen.get("z")
    sizes = [int(x.shape[0]) for x in logits]
    if (
        h is None
        or z is None
        or h.ndim != 2
        or z.ndim != 2
        or z.shape[0] != sum(sizes)
        or not torch.equal(z, torch.cat(logits))
    ):
        return logits, None
    return logits, list(h.split(sizes))


def summarise(
    head: torch.nn.Linear, hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> Summary:
    """The base's summary of one sequence's answer positions (rows of `hidden` / `logits`)."""
    import torch  # lazy: heavy

    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    weight = head.weight.detach()
    e = torch.zeros((z.shape[0], weight.shape[1]), dtype=torch.float64, device=z.device)
    for start in range(0, weight.shape[0], _VOCAB_BLOCK):
        block = weight[start : start + _VOCAB_BLOCK].double()
        e += p[:, start : start + block.shape[0]] @ block
    tgt = targets.to(z.device)[:, None]
    return {
        "h": hidden.detach().float().cpu().numpy(),
        "e": e.cpu().numpy(),
        "lse": lse.cpu().numpy(),
        "lp": logp.gather(-1, tgt)[:, 0].cpu().numpy(),
        "ent": (-(p * logp).sum(-1)).cpu().numpy(),
        "top1": logp.argmax(-1).cpu().numpy(),
    }


def summary_drift(
    summary: Summary,
    hidden: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, np.ndarray]:
    """`core.eval.drift.token_drift`'s statistics from the base's summary and the tuned
    model's hidden states and logits at the same positions (float64)."""
    import torch  # lazy: heavy

    z = logits.double()
    lse = torch.logsumexp(z, dim=-1)
    logq = z - lse[:, None]
    dev = z.device
    h_base = torch.from_numpy(summary["h"]).to(dev, torch.float64)
    e = torch.from_numpy(summary["e"]).to(dev)
    lse_base = torch.from_numpy(summary["lse"]).to(dev)
    kl = ((e * (h_base - hidden.double())).sum(-1) - lse_base + lse).clamp(min=0.0)
    tgt = targets.to(dev)[:, None]
    return {
        "kl": kl.cpu().numpy(),
        "agree": summary["top1"] == logq.argmax(-1).cpu().numpy(),
        "ref_lp": summary["lp"],
        "tuned_lp": logq.gather(-1, tgt)[:, 0].cpu().numpy(),
        "ref_ent": summary["ent"],
        "tuned_ent": (-(logq.exp() * logq).sum(-1)).cpu().numpy(),
    }
