"""Post-training diagnostics: which tokens did fine-tuning distort, and how large and how
low-rank is the LoRA weight change per layer.

The token perplexity change of a run is computed once (`compute_ppl_change`: the same examples
scored by the original model and by the run's final model) and saved in the run folder under
`diagnostics/`, so the Compare page and the report show it again without loading a model.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.data.records import Example, ScoredExample
from core.errors import LensError
from core.io import write_json_atomic
from core.masking import DEFAULT_TAU
from core.training.config import TrainConfig
from core.training.data import load_training_examples

_LAYER = re.compile(r"layers\.(\d+)\.")


def effective_rank(singular_values: np.ndarray) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def low_rank_singular_values(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """Singular values of ΔW = scale·B·A (B: m×r, A: r×n) without forming ΔW.

    With B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = Q_B·(scale·R_B·R_Aᵀ)·Q_Aᵀ, and the outer
    factors have orthonormal columns, so ΔW has the singular values of the r×r middle matrix:
    O((m+n)·r²) work instead of an SVD of the full m×n matrix.
    """
    _, r_b = torch.linalg.qr(b.double())
    _, r_a = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scale * (r_b @ r_a.T)).numpy()


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
        sv = low_rank_singular_values(b.float(), a.float(), scale)
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
    base: Sequence[ScoredExample], tuned: Sequence[ScoredExample], tau: float = DEFAULT_TAU
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


# --------------------------------------------------------------------------------------------
# Token perplexity change of a run, computed once and saved in the run folder
# --------------------------------------------------------------------------------------------

DIAGNOSTICS_DIR = "diagnostics"
PPL_CHANGE_PREFIX = "ppl_change-"
TRAINING_EXAMPLES = "train"


@dataclass
class PplChange:
    """The same examples scored by the original model (`base`) and by a run's final model
    (`tuned`), in the same order, with what produced them."""

    run_id: str
    label: str  # which examples, e.g. "training examples (mbpp/train)" or "gsm8k / test"
    base: list[ScoredExample]
    tuned: list[ScoredExample]
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def frame(self, tau: float = DEFAULT_TAU) -> pd.DataFrame:
        """Per response token: ppl before / after and Δ ln ppl (see `token_ppl_change`)."""
        return token_ppl_change(self.base, self.tuned, tau=tau)

    def summary(self, tau: float = DEFAULT_TAU) -> dict[str, Any]:
        """Examples, tokens, mean Δ ln ppl, share of tokens that got more surprising (%), the
        same means split by whether the base model found the token easy (ppl ≤ τ), and the
        mean sequence perplexity before and after."""
        frame = self.frame(tau)
        easy, hard = frame[frame["base_easy"]], frame[~frame["base_easy"]]

        def mean(values: pd.Series) -> float:
            return float(values.mean()) if len(values) else float("nan")

        return {
            "examples": len(self.base),
            "tokens": len(frame),
            "mean_delta": mean(frame["delta"]),
            "pct_harder": 100.0 * mean(frame["delta"] > 0),
            "mean_delta_easy": mean(easy["delta"]),
            "mean_delta_hard": mean(hard["delta"]),
            "seq_ppl_base": float(np.mean([ex.seq_ppl for ex in self.base])),
            "seq_ppl_tuned": float(np.mean([ex.seq_ppl for ex in self.tuned])),
        }

    def to_dict(self) -> dict[str, Any]:
        """Storage form."""
        return {
            "run_id": self.run_id,
            "label": self.label,
            "settings": self.settings,
            "base": [ex.to_dict() for ex in self.base],
            "tuned": [ex.to_dict() for ex in self.tuned],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> PplChange:
        """Inverse of `to_dict`."""
        return cls(
            run_id=str(data["run_id"]),
            label=str(data.get("label", "")),
            base=[ScoredExample.from_dict(d) for d in data["base"]],
            tuned=[ScoredExample.from_dict(d) for d in data["tuned"]],
            settings=dict(data.get("settings") or {}),
            path=path,
        )


def final_model_dir(run_dir: str | Path) -> Path | None:
    """The run's saved final model: `adapter/` holding a PEFT adapter (LoRA, DoRA) or a full
    fine-tuned model (config.json); None while the run has not finished."""
    folder = Path(run_dir) / "adapter"
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return folder
    return None


_FINGERPRINTS: dict[tuple[Any, ...], str] = {}


def _weights_fingerprint(folder: Path) -> str:
    """Content hash of the saved weights (a retrained run gets a new one); remembered per
    file name, size and modification time, so pages can ask on every rerun."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    signature = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if signature not in _FINGERPRINTS:
        h = hashlib.sha256()
        for path in files:
            h.update(path.name.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
        _FINGERPRINTS[signature] = h.hexdigest()[:16]
    return _FINGERPRINTS[signature]


def training_examples(run_config: dict[str, Any], n: int) -> list[Example]:
    """The first `n` examples the run was trained on (task, file, generated set or masked
    export), read the way training reads them."""

    config = TrainConfig.from_dict(run_config)
    dataset, export_rows = load_training_examples(replace(config, limit=n))
    if dataset is not None:
        return list(dataset.examples[:n])
    examples = []
    for row in (export_rows or [])[:n]:
        turns = {m.get("role"): m.get("content", "") for m in row.get("messages", [])}
        examples.append(Example(str(row["id"]), turns.get("user", ""), turns.get("assistant", "")))
    return examples


def ppl_change_key(run_dir: str | Path, examples: Sequence[Example], dtype: str = "auto") -> str:
    """Cache key of a perplexity-change computation: the run's saved weights, the examples'
    content and the dtype (scores differ across dtypes)."""
    folder = final_model_dir(run_dir)
    if folder is None:
        raise LensError(f"Run {Path(run_dir).name} has no saved final model (adapter/) yet.")
    h = hashlib.sha256()
    h.update(json.dumps([_weights_fingerprint(folder), dtype]).encode())
    for ex in examples:
        h.update(json.dumps([ex.id, ex.prompt, ex.response]).encode())
    return h.hexdigest()[:16]


def ppl_change_path(run_dir: str | Path, key: str) -> Path:
    """Where the result with cache key `key` is saved."""
    return Path(run_dir) / DIAGNOSTICS_DIR / f"{PPL_CHANGE_PREFIX}{key}.json"


def load_ppl_change(path: str | Path) -> PplChange | None:
    """A saved result, or None when the file is missing or unreadable (then compute again)."""
    target = Path(path)
    try:
        return PplChange.from_dict(json.loads(target.read_text(encoding="utf-8")), path=target)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def saved_ppl_changes(run_dir: str | Path) -> list[PplChange]:
    """Every saved perplexity-change result of a run, oldest first."""
    folder = Path(run_dir) / DIAGNOSTICS_DIR
    paths = sorted(folder.glob(f"{PPL_CHANGE_PREFIX}*.json"), key=lambda p: p.stat().st_mtime)
    return [c for c in (load_ppl_change(p) for p in paths) if c is not None]


def compute_ppl_change(
    run_dir: str | Path,
    examples: Sequence[Example],
    *,
    label: str,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    status: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PplChange:
    """Score `examples` with the run's original model and with its final model, save the result
    in the run folder (`ppl_change_path`) and return it.

    Loads a private copy of the base model (PEFT injects the adapter into it in place, so the
    process's shared model slot is never touched). Base scores go through the score cache and
    are shared with the other pages; the fine-tuned model gets its own cache identity.
    """
    from core.model.loading import load_model  # lazy: heavy (torch)
    from core.scoring.cache import ScoreCache  # lazy: heavy (pyarrow)
    from core.scoring.score import score_examples  # lazy: heavy (pyarrow)
    from core.study.runs import load_run  # lazy: heavy (pyarrow)

    run = load_run(run_dir)
    folder = final_model_dir(run.run_dir)
    if folder is None:
        raise LensError(f"Run {run.run_id} has no saved final model (adapter/) yet.")
    if not examples:
        raise LensError("Pick at least one example.")
    key = ppl_change_key(run.run_dir, examples, dtype)
    say = status or (lambda message: None)
    base_name = model or str(run.config.get("model") or "default")
    say(f"loading {base_name}")
    lm = load_model(base_name, device=device, dtype=dtype)
    cache = ScoreCache()
    say(f"scoring {len(examples)} examples with the original model")
    base = score_examples(lm, examples, cache=cache, progress=progress).examples
    say("loading the fine-tuned model")
    weights = _weights_fingerprint(folder)
    if (folder / "adapter_config.json").is_file():
        from core.eval.runner import load_adapter  # lazy: heavy (pyarrow)

        tuned_lm = load_adapter(lm, folder)
    else:
        tuned_lm = load_model(str(folder), device=device, dtype=dtype)
    tuned_lm = replace(tuned_lm, fingerprint=f"{lm.fingerprint}+ft:{weights}")
    say(f"scoring {len(examples)} examples with the fine-tuned model")
    tuned = score_examples(tuned_lm, examples, cache=cache, progress=progress).examples
    tuned_ids = {ex.id for ex in tuned}
    base = [ex for ex in base if ex.id in tuned_ids]
    by_id = {ex.id: ex for ex in tuned}
    tuned = [by_id[ex.id] for ex in base]
    if not base:
        raise LensError("None of the picked examples could be scored (empty responses?).")
    result = PplChange(
        run_id=run.run_id,
        label=label,
        base=base,
        tuned=tuned,
        settings={
            "model": base_name,
            "final_model": str(folder),
            "weights": weights,
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    )
    result.frame()  # raises if base and fine-tuned tokenisations differ
    path = ppl_change_path(run.run_dir, key)
    write_json_atomic(path, result.to_dict())
    result.path = path
    return result
