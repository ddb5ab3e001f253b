"""Post-training diagnostics: which tokens did fine-tuning distort, and how large and how
low-rank is the LoRA weight change per layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.errors import LensError
from core.records import ScoredExample

_LAYER = re.compile(r"layers\.(\d+)\.")


def effective_rank(singular_values: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def lora_weight_stats(adapter_dir: str | Path) -> pd.DataFrame:
    """Per adapted module: layer, module, rank r, ‖ΔW‖_F and effective rank of ΔW = s·B·A.

    Reads `adapter_config.json` and `adapter_model.safetensors` written by peft; no base model
    is needed. DoRA magnitude vectors are ignored (they rescale columns, not add a low-rank
    update).
    """
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise LensError(
            f"{folder} is not a LoRA adapter folder (adapter_config.json + safetensors)."
        )
    config = json.loads(config_path.read_text())
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scale = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    weights = load_file(str(weights_path))
    rows = []
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        b = weights.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        delta = scale * (b.float() @ a.float())
        sv = torch.linalg.svdvals(delta).numpy()
        module = name.split(".lora_A.")[0]
        layer = _LAYER.search(module)
        rows.append(
            {
                "module": module.removeprefix("base_model.model."),
                "layer": int(layer.group(1)) if layer else -1,
                "kind": module.rsplit(".", 1)[-1],
                "rank": int(a.shape[0]),
                "fro_norm": float(np.sqrt((sv**2).sum())),
                "effective_rank": effective_rank(sv),
            }
        )
    if not rows:
        raise LensError(f"No LoRA A/B weight pairs found in {weights_path}.")
    return pd.DataFrame(rows).sort_values(["layer", "kind"]).reset_index(drop=True)


def token_ppl_change(
    base: Sequence[ScoredExample], tuned: Sequence[ScoredExample], tau: float = 2.5
) -> pd.DataFrame:
    """Per response token: perplexity under the base and the fine-tuned model and the change
    Δ = ln ppl_tuned − ln ppl_base (negative: fine-tuning made the token more expected).

    Both lists must be scores of the same examples under the same template and convention, so
    their token ids line up; a mismatch is an error, not a silent misalignment.
    """
    tuned_by_id = {ex.id: ex for ex in tuned}
    rows = []
    for b in base:
        t = tuned_by_id.get(b.id)
        if t is None:
            continue
        if b.token_ids != t.token_ids or b.response_start != t.response_start:
            raise LensError(f"Example {b.id}: base and fine-tuned scores tokenise differently.")
        lb, lt = np.asarray(b.logprob), np.asarray(t.logprob)
        for i, token in enumerate(b.response_tokens):
            rows.append(
                {
                    "id": b.id,
                    "source": b.source,
                    "position": i,
                    "token": token,
                    "ppl_base": float(np.exp(-lb[i])),
                    "ppl_tuned": float(np.exp(-lt[i])),
                    "delta": float(lb[i] - lt[i]),
                    "base_easy": bool(np.exp(-lb[i]) <= tau),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "id",
            "source",
            "position",
            "token",
            "ppl_base",
            "ppl_tuned",
            "delta",
            "base_easy",
        ],
    )


def ppl_change_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per source: mean Δ ln ppl on tokens the base model found easy vs hard, and the share of
    tokens that became harder."""
    if frame.empty:
        return pd.DataFrame(columns=["source", "tokens", "mean Δ easy", "mean Δ hard", "% harder"])
    out = []
    for source, group in frame.groupby("source", sort=False):
        easy, hard = group[group["base_easy"]], group[~group["base_easy"]]
        out.append(
            {
                "source": source,
                "tokens": len(group),
                "mean Δ easy": float(easy["delta"].mean()) if len(easy) else float("nan"),
                "mean Δ hard": float(hard["delta"].mean()) if len(hard) else float("nan"),
                "% harder": 100.0 * float((group["delta"] > 0).mean()),
            }
        )
    return pd.DataFrame(out)
