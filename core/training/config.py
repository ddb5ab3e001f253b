"""`TrainConfig`: every training hyperparameter in one dataclass, its presets, and its command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig, field_from, parse_json_or_list
from core.config import help_meta as _help
from core.errors import LensError
from core.eval.suites import suite_from_config
from core.masking.config import METHOD_HELP, METHOD_MODES, METHODS, MaskConfig

FINETUNES = ("lora", "dora", "full")
PRECISIONS = ("auto", "fp32", "bf16")
REPORTERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# Token losses (issue #21; formulas and sources in README "Token losses" and
# core/training/losses.py). `method` decides WHICH response tokens are in the loss (the mask);
# `loss` decides HOW each of them is weighted, so "stm + kl" is method stm with loss kl.
LOSSES = ("nll", "soft_stm", "dft", "eaft", "kl", "asft")
#: losses that need the base model's forward pass (LoRA: adapter disabled; full: a frozen copy)
BASE_LOSSES = ("soft_stm", "kl", "asft")
KL_ESTIMATORS = ("full", "k3")
#: one line per loss: its per-token term, for --help, the Train page and the README
LOSS_FORMULAS = {
    "nll": "-log p(y_t): plain cross-entropy on the tokens the method keeps",
    "soft_stm": "p_base(y_t)^(1/T) · -log p(y_t): STM's soft twin, the weight from the base "
    "model's probability (FLOW token mode, arXiv 2502.02797)",
    "dft": "sg(p(y_t)) · -log p(y_t): Dynamic Fine-Tuning (arXiv 2508.05629), run by TRL's own "
    "loss_type='dft'",
    "eaft": "(H_topK(t) / ln K)^α · -log p(y_t), weight without gradient, H_topK the entropy of "
    "the current model's renormalised top-K distribution (EAFT, arXiv 2601.02151)",
    "kl": "-log p(y_t) + β · KL(p_base ‖ p)(t): the STM paper's KL-to-base baseline (arXiv "
    "2501.14315, Table 8)",
    "asft": "sg(p(y_t)) · -log p(y_t) + α · KL(p_base ‖ p)(t): DFT anchored to the base (ASFT, "
    "arXiv 2509.23753)",
}


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's recipe (docs/METHOD.md): LoRA on all linear layers, lr 2e-5, 3 epochs, cosine.
    "paper": {},
    # Measured on 2 CPU cores with the embedded model (docs/BENCHMARKS.md, "Training"): 5-8
    # minutes end to end (the shared host's speed varies), and the model changes measurably.
    "cpu-quick": {
        "limit": 48,
        "max_length": 320,
        "epochs": 2.0,
        "learning_rate": 5e-4,
        "lr_scheduler": "cosine",
        "batch_size": 8,
        "lora_r": 16,
        "lora_alpha": 32,
    },
}


@dataclass
class TrainConfig(JobConfig):
    """Everything one training run needs; defaults are the ``paper`` preset.

    Build one with `TrainConfig.from_preset("cpu-quick", limit=32)`; `to_dict` / `from_dict`
    round-trip it through `config.json`.
    """

    COMMAND: ClassVar[str] = "train"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = "paper"
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("task", "data"),)
    CONFIG_FILE: ClassVar[bool] = True
    LABEL: ClassVar[str] = "training"

    preset: str = field(default="paper", metadata=_help("preset the defaults come from"))
    # model
    model: str = field(
        default="default",
        metadata=_help("'default' (embedded SmolLM2-135M), a Hugging Face id or a local folder"),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(
        default="auto",
        metadata=_help(
            "auto (bf16 on GPUs with bf16 and on CPUs with AMX/AVX512-BF16), fp32, bf16",
            choices=PRECISIONS,
        ),
    )
    # data
    task: str | None = field(default="mbpp", metadata=_help("built-in task to train on"))
    split: str | None = field(default="train", metadata=_help("task split"))
    data: str | None = field(
        default=None,
        metadata=_help(
            "instead of a task: JSONL/CSV of prompt/response, a generated-set folder or a "
            "masked export folder"
        ),
    )
    prompt_col: str = field(default="prompt", metadata=_help("prompt column of a data file"))
    response_col: str = field(default="response", metadata=_help("response column of a data file"))
    id_col: str | None = field(
        default=None, metadata=_help("id column of a data file (default: row numbers)")
    )
    limit: int | None = field(default=None, metadata=_help("first N examples only"))
    max_length: int = field(default=1024, metadata=_help("tokens per example (longer: truncated)"))
    # mask: the method names the mode, the rest is MaskConfig's vocabulary (core/masking/config.py)
    method: str = field(default="gt", metadata=_help(METHOD_HELP, choices=METHODS))
    tau: float | None = field_from(MaskConfig, "tau")
    target_share: float | None = field_from(MaskConfig, "target_share")
    k_percent: float = field_from(MaskConfig, "k_percent")
    percentile_rule: str = field_from(MaskConfig, "percentile_rule")
    mask_seed: int = field_from(MaskConfig, "seed")
    # token loss: how each token the method keeps is weighted (README "Token losses")
    loss: str = field(
        default="nll",
        metadata=_help(
            "token loss on the tokens the method keeps (per token t; the sum is divided by the "
            "number of tokens in the loss): "
            + "; ".join(f"{name} = {text}" for name, text in LOSS_FORMULAS.items())
            + ". Example: --method stm --loss kl is the STM mask with the KL term",
            choices=LOSSES,
        ),
    )
    loss_temperature: float = field(
        default=1.0,
        metadata=_help(
            "soft_stm: T > 0 in p_base(y_t)^(1/T); larger T flattens the weights toward 1 "
            "(FLOW's script defaults to 1 and picks T from the median base loss)"
        ),
    )
    eaft_alpha: float = field(
        default=1.0,
        metadata=_help(
            "eaft: α >= 0, the exponent of the normalised entropy (LLaMA-Factory, axolotl: 1)"
        ),
    )
    eaft_k: int = field(
        default=20,
        metadata=_help("eaft: K >= 2, the top-K logits whose entropy is taken (default 20)"),
    )
    kl_beta: float = field(
        default=0.1,
        metadata=_help(
            "kl: β >= 0 of the KL term (the STM and ASFT repositories default to 0.1; the STM "
            "paper's Table 8 used 1e-5)"
        ),
    )
    kl_estimator: str = field(
        default="full",
        metadata=_help(
            "kl, asft: full = KL(p_base ‖ p) over the whole vocabulary at each position in the "
            "loss (Table 8's baseline, ASFT); k3 = exp(r) - 1 - r with r = log p_base(y_t) - "
            "log p(y_t), on the label token only (the STM repository's train_with_kl.py)",
            choices=KL_ESTIMATORS,
        ),
    )
    asft_alpha: float = field(
        default=0.1,
        metadata=_help("asft: α >= 0 of the KL term (ASFT and LLaMA-Factory default 0.1)"),
    )
    # fine-tuning
    finetune: str = field(
        default="lora", metadata=_help("LoRA, DoRA or full fine-tuning", choices=FINETUNES)
    )
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    lora_alpha: int = field(default=32, metadata=_help("LoRA alpha"))
    lora_dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    lora_target: str = field(
        default="all-linear", metadata=_help("'all-linear' or comma-separated module names")
    )
    learning_rate: float = field(default=2e-5, metadata=_help("peak learning rate"))
    epochs: float = field(default=3.0, metadata=_help("passes over the data"))
    max_steps: int | None = field(
        default=None, metadata=_help("stop after N steps (overrides epochs)")
    )
    lr_scheduler: str = field(
        default="cosine", metadata=_help("learning-rate schedule", choices=SCHEDULERS)
    )
    warmup_ratio: float = field(default=0.0, metadata=_help("share of steps for linear warmup"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    batch_size: int = field(default=8, metadata=_help("examples per device per step"))
    grad_accum: int = field(default=1, metadata=_help("gradient accumulation steps"))
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations (less memory, slower)")
    )
    seed: int = field(default=0, metadata=_help("training seed (data order, LoRA init)"))
    # checkpoints, logging, evaluation
    save_every: int | None = field(
        default=None, metadata=_help("checkpoint every N steps (default: every epoch)")
    )
    save_total_limit: int = field(default=2, metadata=_help("checkpoints kept"))
    logging_steps: int = field(default=1, metadata=_help("log the loss every N steps"))
    report_to: list[str] = field(
        default_factory=list, metadata=_help("also log to: tensorboard, mlflow, wandb")
    )
    eval_every: int | None = field(
        default=None, metadata=_help("evaluate every N steps (needs core.eval.runner)")
    )
    eval_suite: Any = field(
        default=None,
        metadata=_help(
            "what to evaluate (passed to the evaluation callbacks)",
            parse=parse_json_or_list,
            metavar="JSON|A,B",
        ),
    )

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [r for r in self.report_to.split(",") if r.strip()]
        self.report_to = [r.strip().lower() for r in self.report_to if r.strip().lower() != "none"]
        self.validate()

    # -- checks and derived values ----------------------------------------------------------

    def validate(self) -> None:
        """Raise LensError (one line) on any inconsistent setting."""
        if self.preset not in PRESETS:
            raise LensError(f"Unknown preset '{self.preset}' (use {', '.join(PRESETS)}).")
        if self.method not in METHODS:
            raise LensError(f"Unknown method '{self.method}' (use {', '.join(METHODS)}).")
        if self.finetune not in FINETUNES:
            raise LensError(f"Unknown fine-tuning '{self.finetune}' (use {', '.join(FINETUNES)}).")
        if self.precision not in PRECISIONS:
            raise LensError(f"Unknown precision '{self.precision}' (use {', '.join(PRECISIONS)}).")
        if self.lr_scheduler not in SCHEDULERS:
            raise LensError(
                f"Unknown lr scheduler '{self.lr_scheduler}' (use {', '.join(SCHEDULERS)})."
            )
        if bool(self.task) == bool(self.data):
            raise LensError("Give exactly one training data source: a task or a data path.")
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad:
            raise LensError(
                f"Unknown report_to '{bad[0]}' (use {', '.join(REPORTERS)}, or leave it empty)."
            )
        positive = {
            "learning_rate": self.learning_rate,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "logging_steps": self.logging_steps,
            "save_total_limit": self.save_total_limit,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
        }
        for name, value in positive.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise LensError(f"{name} must be a number > 0, got {value!r}.")
        for name in ("limit", "max_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LensError(f"{name} must be a whole number >= 1, got {value!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 16:
            raise LensError(f"max_length must be at least 16 tokens, got {self.max_length!r}.")
        if not 0 <= self.warmup_ratio < 1:
            raise LensError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise LensError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.method != "gt":
            self.mask_config()  # validates tau / share / k
        self._validate_loss()

        suite_from_config(self.eval_suite)  # a bad suite fails here, not at the first round

    def _validate_loss(self) -> None:
        """The token loss and its parameters (one line each)."""
        if self.loss not in LOSSES:
            raise LensError(f"Unknown loss '{self.loss}' (use {', '.join(LOSSES)}).")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise LensError(
                f"Unknown kl_estimator '{self.kl_estimator}' (use {', '.join(KL_ESTIMATORS)})."
            )
        numbers = {
            "loss_temperature": self.loss_temperature,
            "eaft_alpha": self.eaft_alpha,
            "kl_beta": self.kl_beta,
            "asft_alpha": self.asft_alpha,
        }
        for name, value in numbers.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
                raise LensError(f"{name} must be a number, got {value!r}.")
        if self.loss_temperature <= 0:
            raise LensError(
                f"loss_temperature (soft_stm's T) must be > 0, got {self.loss_temperature!r}."
            )
        for name in ("eaft_alpha", "kl_beta", "asft_alpha"):
            if numbers[name] < 0:
                raise LensError(f"{name} must be >= 0, got {numbers[name]!r}.")
        if not isinstance(self.eaft_k, int) or isinstance(self.eaft_k, bool) or self.eaft_k < 2:
            raise LensError(
                f"eaft_k (EAFT's top K) must be a whole number >= 2, got {self.eaft_k!r}."
            )
        if "lm_head" in self.lora_target.split(",") and self.finetune != "full":
            # TRL 1.16 computes every loss through its fused LM head (SFTTrainer refuses an adapter
            # on lm_head); dft runs TRL's own path, so this is where TRL would refuse it
            raise LensError(
                f"lora_target names lm_head: TRL's fused LM head, through which loss {self.loss} "
                "runs, refuses an adapter there; leave lm_head out of --lora-target."
            )

    def mask_config(self) -> MaskConfig:
        """The `MaskConfig` of a masked method (LensError for method gt). A target share, when
        set, is used instead of tau."""
        mode = METHOD_MODES[self.method]
        if mode is None:
            raise LensError("Method gt trains every response token; it has no mask.")
        if mode == "percentile":
            return MaskConfig(
                mode=mode,
                k_percent=self.k_percent,
                percentile_rule=self.percentile_rule,
                seed=self.mask_seed,
            )
        if self.target_share is not None:
            return MaskConfig(
                mode=mode, tau=None, target_share=self.target_share, seed=self.mask_seed
            )
        return MaskConfig(mode=mode, tau=self.tau, seed=self.mask_seed)

    def data_label(self) -> str:
        """Short description of the training data."""
        head = f"{self.task}/{self.split}" if self.task else Path(str(self.data)).name
        return head + (f"[:{self.limit}]" if self.limit else "")

    def method_label(self) -> str:
        """Short description of the mask, e.g. 'stm τ=2.5' or 'gt'."""
        if self.method == "gt":
            return "gt"
        if self.method == "percentile":
            return f"percentile {self.percentile_rule} {self.k_percent:g}%"
        if self.target_share is not None:
            return f"{self.method} share={self.target_share:g}"
        return f"{self.method} τ={self.tau:g}"

    def loss_label(self) -> str:
        """Short description of the token loss with its parameters, e.g. 'kl β=0.1 (full KL)'."""
        if self.loss == "soft_stm":
            return f"soft_stm T={self.loss_temperature:g}"
        if self.loss == "eaft":
            return f"eaft α={self.eaft_alpha:g} K={self.eaft_k}"
        if self.loss == "kl":
            return f"kl β={self.kl_beta:g} ({self.kl_estimator} KL)"
        if self.loss == "asft":
            return f"asft α={self.asft_alpha:g} ({self.kl_estimator} KL)"
        return self.loss

    def training_label(self) -> str:
        """What is combined: the mask, then the loss when it is not plain nll, e.g.
        'stm τ=2.5 + kl β=0.1 (full KL)'."""
        if self.loss == "nll":
            return self.method_label()
        return f"{self.method_label()} + {self.loss_label()}"

    def needs_base_model(self) -> bool:
        """Whether the loss runs the base model too (LoRA: adapter disabled; full: a frozen copy)."""
        return self.loss in BASE_LOSSES

    def describe(self) -> str:
        """One-line label for job lists."""
        model = "default" if self.model == "default" else Path(self.model).name
        return f"{self.training_label()} · {self.finetune} · {self.data_label()} · {model}"


# --------------------------------------------------------------------------- CLI flags
