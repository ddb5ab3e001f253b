"""Token-level losses (issue #21): per-token weights and terms as pure torch functions.

`TrainConfig.method` decides which response tokens are in the loss (the mask: gt, stm, random,
...); `TrainConfig.loss` decides how each of them counts. With p = p_theta(y_t | x, y_<t) of the
model being trained, p_base the same token's probability under the base model (the model
training starts from: LoRA with its adapter disabled, a full fine-tune's frozen copy), sg a
stop-gradient and N the number of tokens in the loss (TRL's `num_items_in_batch`):

    loss = sum_t [ w_t * (-log p_t) + c * KL_t ] / N

| loss     | w_t                           | c     | source                                        |
|----------|-------------------------------|-------|-----------------------------------------------|
| nll      | 1                             | 0     | plain SFT (TRL's own path)                    |
| soft_stm | p_base(y_t)^(1/T)             | 0     | FLOW token mode, arXiv 2502.02797             |
| dft      | sg(p_t)                       | 0     | DFT, arXiv 2508.05629 (TRL's loss_type="dft") |
| eaft     | sg((H_topK,t / ln K)^alpha)   | 0     | EAFT, arXiv 2601.02151                        |
| kl       | 1                             | beta  | STM paper (arXiv 2501.14315) Table 8          |
| asft     | sg(p_t)                       | alpha | ASFT, arXiv 2509.23753                        |

KL_t is KL(p_base || p_theta) at position t: over the whole vocabulary (`full`, Table 8's
baseline and ASFT's anchor, as LLaMA-Factory's `asft` and the ASFT repository compute it), or
the k3 estimate exp(r) - 1 - r, r = log p_base(y_t) - log p_t, on the label token only (`k3`, the
STM repository's `train_with_kl.py`; that script adds the term with the PPO reward's sign,
`loss - beta * k3`, and gathers the label at the unshifted position; here it is `+ beta * k3` at
the position that predicts the label, as its comment intends).

EAFT's normalisation: H_topK is the entropy of the current model's top-K logits renormalised
by a softmax, divided by ln K, its largest possible value, so the weight lies in [0, 1] for any
K. LLaMA-Factory divides by the constant 3.0 (about ln 20, its fixed K) and axolotl does not
divide at all (weights up to ln K, about 3 at K = 20: three times the step size of the others
on uncertain tokens); ln K is the paper's "normalised entropy" and equals LLaMA-Factory's at
K = 20 up to 0.14%.

Every weight lies in [0, 1]; `WeightLog` pools them per logging step for metrics.jsonl: the mean
weight of the tokens in the loss, the effective-token share sum(w) / (response tokens, masked
ones included: STM's hard mask counts as weight 0), a fixed-bin histogram, and the mean KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.masking.weights import dft_weights as dft_weights
from core.masking.weights import eaft_weights as eaft_weights
from core.masking.weights import eaft_weights_from_entropy as eaft_weights_from_entropy
from core.masking.weights import kl_k3 as kl_k3
from core.masking.weights import soft_stm_weights as soft_stm_weights
from core.masking.weights import topk_entropy as topk_entropy
from core.training.config import BASE_LOSSES, TrainConfig

#: the logged weight histogram: WEIGHT_BINS equal bins over [0, 1] (the last one includes 1)
WEIGHT_BINS = 10
#: logits computed at a time when projecting hidden states (EAFT's top-K): about 128 MiB
PROJECTION_BUDGET = 2**25


@dataclass(frozen=True)
class TokenLoss:
    """One token loss and its parameters (see the module docstring); built from a
    `TrainConfig`, whose `validate` has checked the ranges."""

    name: str = "nll"
    temperature: float = 1.0
    eaft_alpha: float = 1.0
    eaft_k: int = 20
    kl_beta: float = 0.1
    kl_estimator: str = "full"
    asft_alpha: float = 0.1

    @classmethod
    def from_config(cls, config: TrainConfig) -> TokenLoss:
        return cls(
            name=config.loss,
            temperature=float(config.loss_temperature),
            eaft_alpha=float(config.eaft_alpha),
            eaft_k=int(config.eaft_k),
            kl_beta=float(config.kl_beta),
            kl_estimator=config.kl_estimator,
            asft_alpha=float(config.asft_alpha),
        )

    @property
    def in_trl(self) -> bool:
        """nll and dft are TRL's own `loss_type`s: SFTTrainer computes them."""
        return self.name in ("nll", "dft")

    @property
    def trl_loss_type(self) -> str:
        return "dft" if self.name == "dft" else "nll"

    @property
    def needs_base(self) -> bool:
        return self.name in BASE_LOSSES

    @property
    def kl_coef(self) -> float:
        """c of the module docstring: beta for kl, alpha for asft, else 0."""
        return {"kl": self.kl_beta, "asft": self.asft_alpha}.get(self.name, 0.0)

    @property
    def has_kl(self) -> bool:
        return self.name in ("kl", "asft")

    @property
    def full_kl(self) -> bool:
        """Whether the KL term needs both models' whole next-token distributions."""
        return self.has_kl and self.kl_estimator == "full"

    @property
    def needs_hidden(self) -> bool:
        """Whether the trained model's hidden states are needed beyond TRL's log-probs (EAFT's
        top-K entropy, the full KL)."""
        return self.name == "eaft" or self.full_kl


# --------------------------------------------------------------------------- weights and terms
# The per-token weight formulas (soft_stm_weights, dft_weights, topk_entropy,
# eaft_weights_from_entropy, eaft_weights, kl_k3) live in core.masking.weights, imported above:
# the Masking studio shows the weights a run would start with through the same functions.


def kl_full(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_theta) per row over the whole vocabulary (float32); the gradient flows to
    `logits` only. The reference formula: the trainer computes the same with TRL's tiled kernel
    from hidden states, without building the logits."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_b = torch.log_softmax(base_logits.detach().float(), dim=-1)
    return (log_b.exp() * (log_b - log_p)).sum(dim=-1)


def token_terms(
    log_probs: torch.Tensor,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token loss w_t * (-log p_t) + c * KL_t (zero where `log_probs` is, i.e. off the
    label positions, when `weights` and `kl` are zero or finite there). No weights: plain
    -log p_t, bit for bit; a zero `kl_coef` adds nothing."""
    terms = -log_probs if weights is None else weights.to(log_probs.dtype) * -log_probs
    if kl is not None and kl_coef:
        terms = terms + kl_coef * kl.to(terms.dtype)
    return terms


def reduce_terms(terms: torch.Tensor, num_items: Any) -> torch.Tensor:
    """sum of the per-token terms / N, N clamped to 1 (a batch without trainable tokens is 0)."""
    return terms.sum() / torch.as_tensor(num_items, device=terms.device).clamp(min=1)


# --------------------------------------------------------------------------- from hidden states


def logit_transform(text_config: Any) -> tuple[float, float | None]:
    """(scale, softcap) a model applies to its LM head's output, read from its (text) config as
    TRL 1.16's fused LM head reads them: `logit_scale` / `output_multiplier` /
    `lm_head_multiplier` multiply, `logits_scaling` divides (HyperCLOVA X: multiplies), then
    `final_logit_softcapping` caps (Gemma 2)."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    scaling = getattr(text_config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if getattr(text_config, "model_type", "") == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), getattr(
        text_config, "final_logit_softcapping", None
    )


def project_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """float32 logits of `hidden` (rows, H) through an LM head, with the model's scale and cap."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def topk_entropy_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """`topk_entropy` of the logits of `hidden` (rows, H), projected a block of rows at a time
    (never all rows' logits at once), without gradient."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    rows = max(1, PROJECTION_BUDGET // max(1, weight.shape[0]))
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start : start + rows].detach()
            logits = project_logits(chunk, weight, bias, scale, softcap)
            out[start : start + rows] = topk_entropy(logits, k)
    return out


# --------------------------------------------------------------------------- what a run logs


@dataclass
class WeightLog:
    """The weights of the tokens in the loss, pooled over one logging window (the trainer adds
    every micro-batch; the metrics callback takes the window at each logged step)."""

    sum_w: Any = 0.0
    n_loss: Any = 0
    n_response: Any = 0
    hist: Any = None
    kl_sum: Any = 0.0
    kl_n: Any = 0
    has_kl: bool = False
    steps: int = 0

    def add(
        self,
        weights: torch.Tensor,
        n_response: Any = None,
        kl: torch.Tensor | None = None,
    ) -> None:
        """`weights` (and `kl`) of this micro-batch's tokens in the loss, flat; `n_response` its
        response tokens, masked ones included (None: the tokens in the loss). Kept on the
        device until `take` (no synchronisation per step)."""
        w = weights.detach().float().clamp(0.0, 1.0)
        self.sum_w = self.sum_w + w.sum()
        self.n_loss = self.n_loss + w.numel()
        self.n_response = self.n_response + (w.numel() if n_response is None else n_response)
        counts = torch.histc(w, bins=WEIGHT_BINS, min=0.0, max=1.0)
        self.hist = counts if self.hist is None else self.hist + counts
        if kl is not None:
            self.has_kl = True
            self.kl_sum = self.kl_sum + kl.detach().float().sum()
            self.kl_n = self.kl_n + kl.numel()
        self.steps += 1

    def take(self) -> dict[str, Any] | None:
        """The window's `weight_mean`, `weight_share`, `weight_hist` (counts per bin) and `kl`
        (mean per token in the loss, for kl / asft), and a fresh window; None if empty."""
        if not self.steps:
            return None
        n_loss = int(self.n_loss)
        n_response = int(self.n_response)
        sum_w = float(self.sum_w)
        out: dict[str, Any] = {
            "weight_mean": sum_w / n_loss if n_loss else None,
            "weight_share": sum_w / n_response if n_response else None,
            "weight_hist": [int(c) for c in self.hist.tolist()],
        }
        if self.has_kl:
            out["kl"] = float(self.kl_sum) / int(self.kl_n) if int(self.kl_n) else None
        self.reset()
        return out

    def reset(self) -> None:
        """An empty window."""
        self.sum_w, self.n_loss, self.n_response, self.hist = 0.0, 0, 0, None
        self.kl_sum, self.kl_n, self.has_kl, self.steps = 0.0, 0, False, 0


def weight_bins() -> list[tuple[float, float]]:
    """The histogram's bins as (low, high) pairs."""
    return [(i / WEIGHT_BINS, (i + 1) / WEIGHT_BINS) for i in range(WEIGHT_BINS)]
