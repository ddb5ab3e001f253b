"""How much each response token counts under each token loss (issue #21): the per-token weight
formulas training uses, and what the Masking studio shows of them before training.

The masking rules (`core.masking.rules`) decide WHICH response tokens are in the loss; a token
loss decides HOW MUCH each of them counts. The weight formulas live here, one layer below
training, as pure functions of torch tensors written with tensor methods only (this module
imports no torch): `core.training.losses` imports them from here for the trainer, and the studio
calls the very same functions on the stored per-token scores, so the two cannot disagree.

With p_θ the model being trained, p_base the model training starts from (the base) and sg a
stop-gradient, per response token t:

| loss     | w_t                         | added term        | at step 0 (θ = base)               |
|----------|-----------------------------|-------------------|------------------------------------|
| nll      | 1                           |                   | 1                                  |
| soft_stm | p_base(y_t)^(1/T)           |                   | the same (the base never changes)  |
| dft      | sg(p_θ(y_t))                |                   | p_base(y_t)                        |
| eaft     | sg((H_topK,t / ln K)^α)     |                   | the base's top-K entropy           |
| kl       | 1                           | β · KL(base ‖ θ)  | 1; KL = 0                          |
| asft     | sg(p_θ(y_t))                | α · KL(base ‖ θ)  | p_base(y_t); KL = 0                |

H_topK is the entropy of the softmax over the K largest logits. Log-softmax does not change
when every logit moves by the same amount, so the top-K log-probabilities a scoring pass keeps
(`TokenScores.top_logprobs`, the full-vocabulary log-probs of the K likeliest tokens) give the
same entropy as the top-K logits training projects: `topk_entropy` takes either.

The effective-token share of a set of response tokens is Σ_t w_t / N over all N of them, a
token a hard mask (STM) leaves out counting as weight 0: `effective_share`, the definition the
trainer logs as `weight_share` (`core.training.losses.WeightLog`).

At step 0 the studio's weights ARE training's first step's: the studio's "base" is the selected
model, the model a run would start from. dft, eaft and asft weigh by the model being trained,
so their weights move as training does; soft_stm's never do. kl and asft add a KL term rather
than weighting tokens: KL(base ‖ θ) is 0 at step 0 (a fresh LoRA adapter is the base exactly;
`kl_k3` of a token and itself is 0), so at step 0 kl is nll and asft is dft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from core import fmt
from core.errors import LensError

if TYPE_CHECKING:
    import torch

# --------------------------------------------------------------------------- the formulas
# Tensor methods only (no `import torch`): the trainer calls these on its batches, the studio
# on the scores' columns.


def soft_stm_weights(base_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_base(y_t)^(1/T) = exp(log p_base(y_t) / T), without gradient."""
    return (base_log_probs.detach().float() / temperature).exp()


def dft_weights(log_probs: torch.Tensor) -> torch.Tensor:
    """sg(p_t) = exp(log p_t), without gradient (DFT's weight, as TRL computes it)."""
    return log_probs.detach().exp()


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats, float32) of the softmax over each row's top-k logits, without gradient.
    Rows of log-probabilities give the same entropy (the softmax ignores a shift per row)."""
    top = logits.detach().float().topk(k, dim=-1).values
    log_p = top.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def eaft_weights_from_entropy(entropy: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """(H_topK / ln K)^alpha, clamped to [0, 1] against rounding; 1 everywhere at alpha = 0."""
    return (entropy.detach().float() / math.log(k)).clamp(0.0, 1.0).pow(alpha)


def eaft_weights(logits: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """EAFT's weight from the current model's logits (rows = positions), without gradient."""
    return eaft_weights_from_entropy(topk_entropy(logits, k), k, alpha)


def kl_k3(log_probs: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(p_base || p_theta) from the label token alone: exp(r) - 1 - r with
    r = log p_base(y_t) - log p_t (>= 0; 0 where the two agree)."""
    r = base_log_probs.detach().float() - log_probs.float()
    return r.expm1() - r


# --------------------------------------------------------------------------- the studio

#: the token losses, in training's order (`core.training.config.LOSSES`; a test keeps them equal)
LOSS_NAMES = ("nll", "soft_stm", "dft", "eaft", "kl", "asft")
#: losses whose weight follows the model being trained: shown at step 0, where p_θ = p_base
ONLINE_LOSSES = ("dft", "eaft", "asft")
#: losses that add a KL(base ‖ θ) term to each token's loss (0 at step 0)
KL_LOSSES = ("kl", "asft")

#: each loss's per-token weight as the studio's table writes it
WEIGHT_FORMULAS = {
    "nll": "w = 1",
    "soft_stm": "w = p_base(y)^(1/T)",
    "dft": "w = sg(p_θ(y)); step 0: p_base(y)",
    "eaft": "w = sg((H_topK / ln K)^α); step 0: the base's top-K",
    "kl": "w = 1, + β·KL(base ‖ θ), 0 at step 0",
    "asft": "w = sg(p_θ(y)), + α·KL(base ‖ θ), 0 at step 0",
}
#: the effective-token share, as the table's help and the trainer's `weight_share` define it
SHARE_FORMULA = "Σ_t w_t / N over the N response tokens, a masked token counting w = 0"


@dataclass(frozen=True)
class WeightParams:
    """The weight parameters of the losses that have them (training's defaults:
    `TrainConfig.loss_temperature`, `eaft_alpha`, `eaft_k`)."""

    temperature: float = 1.0
    eaft_alpha: float = 1.0
    eaft_k: int = 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LensError(f"soft_stm's T must be > 0, got {self.temperature!r}.")
        if not (math.isfinite(self.eaft_alpha) and self.eaft_alpha >= 0):
            raise LensError(f"EAFT's α must be >= 0, got {self.eaft_alpha!r}.")
        if int(self.eaft_k) != self.eaft_k or self.eaft_k < 2:
            raise LensError(f"EAFT's K must be a whole number >= 2, got {self.eaft_k!r}.")

    def label(self, loss: str) -> str:
        """The loss with its weight parameter, e.g. "soft_stm T=1", "eaft α=1 K=20"."""
        if loss == "soft_stm":
            return f"soft_stm T={fmt.num(self.temperature)}"
        if loss == "eaft":
            return f"eaft α={fmt.num(self.eaft_alpha)} K={self.eaft_k}"
        return loss


@dataclass(frozen=True)
class BaseTokens:
    """Per response token, what the step-0 weights are computed from: the base model's
    log-probability of the label (`logprob`) and the entropy (nats) of its renormalised top-`k`
    distribution (`entropy`; NaN when no top-k was kept, `k` = 0)."""

    logprob: np.ndarray
    entropy: np.ndarray
    k: int

    @classmethod
    def from_scores(cls, logprob: np.ndarray, top_logprobs: np.ndarray, k: int) -> BaseTokens:
        """From a scoring pass's columns: `logprob` (R,) and `top_logprobs` (R, width); the
        entropy over the top min(k, width) (`topk_entropy`, training's function)."""
        import torch  # lazy: heavy

        logprob = np.asarray(logprob, dtype=np.float64).reshape(-1)
        top = np.asarray(top_logprobs, dtype=np.float32)
        if top.ndim != 2 or top.shape[0] != logprob.size:
            raise ValueError(f"top_logprobs {top.shape} do not match {logprob.size} tokens")
        used = min(int(k), top.shape[1])
        if used < 2:
            return cls(logprob, np.full(logprob.size, np.nan), 0)
        entropy = topk_entropy(torch.from_numpy(np.ascontiguousarray(top)), used)
        return cls(logprob, entropy.double().numpy(), used)

    def __len__(self) -> int:
        return int(self.logprob.size)

    @property
    def prob(self) -> np.ndarray:
        """p_base of each label token."""
        return np.exp(self.logprob)

    def slice(self, start: int, stop: int) -> BaseTokens:
        """The tokens [start:stop] (one example's, by the scores' offsets)."""
        return BaseTokens(self.logprob[start:stop], self.entropy[start:stop], self.k)


@dataclass(frozen=True)
class LossWeights:
    """One loss's weight on each token of a `BaseTokens`, at step 0. `exact` says whether it is
    the weight training's first step would use with these parameters: EAFT's entropy over
    fewer than K log-probs is not (`approx` says what it is instead); `note` names the term a
    KL loss adds."""

    loss: str
    label: str
    weights: np.ndarray
    exact: bool = True
    approx: str = ""
    note: str = ""

    @property
    def online(self) -> bool:
        """Whether the weight follows the model being trained (shown at step 0)."""
        return self.loss in ONLINE_LOSSES

    @property
    def has_kl(self) -> bool:
        return self.loss in KL_LOSSES

    def share(self, masked: np.ndarray | None = None) -> float:
        """Effective-token share of these tokens (`effective_share`)."""
        return effective_share(self.weights, masked)

    def slice(self, start: int, stop: int) -> LossWeights:
        return replace(self, weights=self.weights[start:stop])


def step0_weights(loss: str, base: BaseTokens, params: WeightParams) -> LossWeights:
    """`loss`'s weight on each of `base`'s tokens at step 0 (θ = base), from the formulas the
    trainer calls (float64). EAFT over a top-k narrower than `params.eaft_k` uses the k there is
    (its weight is then EAFT's at K = k, and `exact` is False)."""
    import torch  # lazy: heavy

    if loss not in LOSS_NAMES:
        raise LensError(f"Unknown loss '{loss}' (use {', '.join(LOSS_NAMES)}).")
    label, approx, note = params.label(loss), "", ""
    log_p = torch.from_numpy(np.ascontiguousarray(base.logprob, dtype=np.float64))
    if loss == "soft_stm":
        weights = soft_stm_weights(log_p, params.temperature)
    elif loss in ("dft", "asft"):  # sg(p_θ) with θ = base
        weights = dft_weights(log_p)
    elif loss == "eaft":
        if base.k < 2:
            weights = torch.full_like(log_p, math.nan)
            approx = "needs the top-K log-probs; these scores keep none"
        else:
            entropy = torch.from_numpy(np.ascontiguousarray(base.entropy, dtype=np.float32))
            weights = eaft_weights_from_entropy(entropy, base.k, params.eaft_alpha)
            if base.k < params.eaft_k:
                approx = f"K = {base.k} (the stored top-{base.k}), not {params.eaft_k}"
    else:  # nll, kl: every token counts 1 (kl adds β·KL, 0 at step 0)
        weights = torch.ones_like(log_p)
    if loss in KL_LOSSES:
        kl0 = kl_k3(log_p, log_p)  # the KL term at step 0, from the trainer's estimate: 0
        at_step0 = fmt.num(float(kl0.abs().max()) if len(log_p) else 0.0)
        note = f"adds {'β' if loss == 'kl' else 'α'}·KL(base ‖ θ), {at_step0} at step 0"
    return LossWeights(loss, label, weights.double().numpy(), not approx, approx, note)


def loss_weights(
    base: BaseTokens, params: WeightParams, losses: tuple[str, ...] = LOSS_NAMES
) -> dict[str, LossWeights]:
    """Every loss's step-0 weights on `base`'s tokens, by loss name."""
    return {loss: step0_weights(loss, base, params) for loss in losses}


def effective_share(weights: np.ndarray, masked: np.ndarray | None = None) -> float:
    """Σ_t w_t / N over the N response tokens, a token `masked` leaves out counting 0, each
    weight clamped to [0, 1] as the trainer logs it (`WeightLog`'s `weight_share`); NaN for no
    tokens or unknown weights."""
    w = np.clip(np.asarray(weights, dtype=np.float64).reshape(-1), 0.0, 1.0)
    if masked is not None:
        masked = np.asarray(masked, dtype=bool).reshape(-1)
        if masked.shape != w.shape:
            raise ValueError(f"mask of {masked.size} tokens for {w.size} weights")
        w = np.where(masked, 0.0, w)
    if not w.size:
        return math.nan
    return float(w.sum() / w.size)


def share_table(
    weights: dict[str, LossWeights], masked: np.ndarray | None = None, mask_label: str = ""
) -> pd.DataFrame:
    """The effective-token share of each loss as the studio shows it: the loss, its weight
    formula, the share over every response token and, with `masked`, under that mask
    (column named after `mask_label`), each number written by `core.fmt`."""
    rows = []
    for loss, w in weights.items():
        row = {
            "loss": w.label + (" · step 0" if w.online else ""),
            "per-token weight": WEIGHT_FORMULAS[loss],
            "Σw/N, every token": fmt.share(w.share()),
        }
        if masked is not None:
            row[f"Σw/N, {mask_label or 'masked'}"] = fmt.share(w.share(masked))
        if w.approx:  # said in full beside the table
            row["note"] = "approximate"
        else:
            row["note"] = "moves as θ trains" if w.online else ""
        rows.append(row)
    return pd.DataFrame(rows)
