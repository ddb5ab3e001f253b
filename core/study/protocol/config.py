"""What a protocol is: its settings (`ProtocolConfig` and the presets ``cpu`` / ``paper``), the
arms and what each one trains, the Self-Output generation's config, the check of all of them
before a job exists, and the names of the files and measures the protocol writes.

The arms (`ARMS`): the paper's (ground truth, STM at τ and at a masked share, the random
control, Self-Output), then one per token loss of `core.training.losses` on the ground-truth
data and every response token (`soft_stm`, `dft`, `eaft`, `kl`, `asft`: method gt, that loss with
its default parameters), and `stm_kl`, STM's mask at τ with the KL term. STM's mask is combined
with KL only: KL anchors the tokens STM keeps to the base model, a different lever from the mask;
soft STM, DFT and ASFT already weight down the tokens the base (or the model) finds unlikely,
the very tokens STM leaves out, so combining them with the mask would count that twice. Any
other combination runs as a training job (`--method stm --loss eaft`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from core.config import JobConfig
from core.config import help_meta as _help
from core.data.tasks import get_task
from core.datagen.config import GenDataConfig
from core.datagen.run import preflight as generation_preflight
from core.errors import LensError
from core.eval.suites import suite_from_config
from core.masking import DEFAULT_TAU
from core.training.config import TrainConfig

PROTOCOL_KIND = "protocol"
#: The paper's arms: ground truth, STM at τ and at a masked share, the control, Self-Output.
PAPER_ARMS = ("gt", "stm", "stm_share", "random", "self_output")
#: One arm per token loss on ground-truth data (method gt), and STM's mask with the KL term.
LOSS_ARMS = ("soft_stm", "dft", "eaft", "kl", "asft", "stm_kl")
ARMS = (*PAPER_ARMS, *LOSS_ARMS)
#: The arms the cpu preset runs (stm_share and the loss arms on request: 3 more runs each).
CPU_ARMS = ("gt", "stm", "random", "self_output")
#: What each arm trains, for `--methods` and the Reproduce page.
ARM_HELP = {
    "gt": "ground truth, every response token",
    "stm": "STM's mask at τ",
    "stm_share": "STM masking target_share of the tokens",
    "random": "as many tokens as STM at τ masked at random (the control)",
    "self_output": "ground-truth training on the model's own verified answers",
    "soft_stm": "ground truth + soft STM weights",
    "dft": "ground truth + DFT",
    "eaft": "ground truth + EAFT",
    "kl": "ground truth + KL to the base",
    "asft": "ground truth + ASFT (DFT + KL)",
    "stm_kl": "STM's mask at τ + KL to the base",
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
#: results over the runs finished so far, rewritten as each run finishes (means and intervals
#: over the seeds done; no paired comparisons), until results.json replaces it
PARTIAL_JSON = "results-partial.json"
PROGRESS_TXT = "progress.txt"
GENERATION_DIR = "self-output-generation"
# Evaluate at step 0 and at the end only (EvalCallback evaluates every N steps, N beyond any run).
EVAL_AT_START_AND_END = 1_000_000

# The forgetting signals a small model still shows: mean relative change (%) of the
# out-of-domain reference NLL on the tokens the base model found easy, and on all tokens.
FORGETTING = "ood_nll_easy_Δ%"
OOD_NLL = "ood_nll_Δ%"
#: The OOD probe's mean token KL(base || tuned) at the end of a run (core/eval/drift.py).
OOD_DRIFT = "ood:ood_drift:kl"

PRESETS: dict[str, dict[str, Any]] = {
    # The embedded model on 2 CPU cores in about an hour (docs/BENCHMARKS.md, "Paper protocol"):
    # the setting of the CPU sweep (bench/bench_cpu_forgetting.py, docs/cpu_forgetting.json) in
    # which ground truth moved ARC-Easy most (LoRA r 16, lr 1e-3, 64 MBPP problems), one epoch
    # so that 3 seeds of 4 arms fit; forgetting is read from drift from the base model.
    "cpu": {},
    # The paper's setting (docs/METHOD.md) for a GPU: LoRA on all linear layers, lr 2e-5, 3 epochs,
    # cosine, the whole training split, N = 32 samples of up to 512 tokens at T 0.7 / top-p 0.95;
    # every arm, the token losses' included.
    "paper": {
        "methods": list(ARMS),
        "train_preset": "paper",
        "limit": None,
        "max_length": 1024,
        "epochs": 3.0,
        "learning_rate": 2e-5,
        "suite": "paper",
        "seeds": [0, 1, 2],
        "gen_samples": 32,
        "gen_max_new_tokens": 512,
        "gen_prompt_batch": 8,
    },
}


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LensError(f"Seeds must be integers, comma-separated (got {text!r}).") from None


@dataclass
class ProtocolConfig(JobConfig):
    """Everything one protocol run needs; defaults are the ``cpu`` preset."""

    COMMAND: ClassVar[str] = "protocol"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    DEFAULT_PRESET: ClassVar[str] = "cpu"
    LABEL: ClassVar[str] = "protocol"
    PRESET_NOUN: ClassVar[str] = "protocol preset"
    IGNORED_KEYS: ClassVar[tuple[str, ...]] = ("kind",)

    preset: str = field(default="cpu", metadata=_help("cpu (embedded model, 2 cores) or paper"))
    model: str = field(default="default", metadata=_help("model to fine-tune and evaluate"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    precision: str = field(default="auto", metadata=_help("training precision: auto, fp32, bf16"))
    task: str = field(default="mbpp", metadata=_help("target task (its train split is trained)"))
    methods: list[str] = field(
        default_factory=lambda: list(CPU_ARMS),
        metadata=_help(
            "arms, comma-separated: "
            + "; ".join(f"{key} = {text}" for key, text in ARM_HELP.items())
            + " (token losses with their default parameters: train --help)"
        ),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=_help(
            "training seeds, comma-separated (each one runs every arm again)", parse=_parse_ints
        ),
    )
    tau: float = field(
        default=DEFAULT_TAU, metadata=_help("STM threshold of the stm and random arms")
    )
    target_share: float = field(
        default=0.25, metadata=_help("share of response tokens the stm_share arm masks")
    )
    # training (the train preset's values, then these)
    train_preset: str = field(default="cpu-quick", metadata=_help("core.training.trainer preset"))
    limit: int | None = field(default=64, metadata=_help("training examples (none = all)"))
    max_length: int = field(default=256, metadata=_help("tokens per training example"))
    epochs: float = field(default=1.0, metadata=_help("passes over the training data"))
    learning_rate: float = field(default=1e-3, metadata=_help("peak learning rate"))
    batch_size: int = field(default=8, metadata=_help("examples per step"))
    lora_r: int = field(default=16, metadata=_help("LoRA rank"))
    finetune: str = field(default="lora", metadata=_help("lora, dora or full"))
    # evaluation
    suite: str = field(default="protocol", metadata=_help("evaluation suite (core.eval.runner)"))
    eval_limit: int | None = field(
        default=None, metadata=_help("at most N examples per evaluation task")
    )
    # Self-Output generation
    gen_samples: int = field(default=4, metadata=_help("Self-Output samples per prompt"))
    gen_max_new_tokens: int = field(default=160, metadata=_help("longest Self-Output sample"))
    gen_prompt_batch: int = field(default=8, metadata=_help("prompts sampled together"))
    gen_temperature: float = field(default=0.7, metadata=_help("sampling temperature"))
    gen_top_p: float = field(default=0.95, metadata=_help("nucleus top-p"))
    threads: int | None = field(
        default=None, metadata=_help("torch CPU threads for generation (none = default)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if isinstance(self.seeds, str | int):
            self.seeds = _parse_ints(str(self.seeds))
        self.seeds = [int(s) for s in self.seeds]
        self.validate()

    def command(
        self, *, submit: bool = False, extra: Sequence[str] = (), name: str | None = None
    ) -> str:
        """The `python -m core protocol ...` command of this config (and a non-default
        protocol folder `name`)."""
        if name and name != f"protocol-{self.preset}":
            extra = [*extra, "--name", name]
        return super().command(submit=submit, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with "kind": "protocol" (so run listings can tell it apart)."""
        return {"kind": PROTOCOL_KIND, **asdict(self)}

    def validate(self) -> None:
        """Raise `LensError` with one line on a bad setting."""
        unknown = [m for m in self.methods if m not in ARMS]
        checks = [
            (not unknown, f"Unknown arm(s) {', '.join(unknown)} (use {', '.join(ARMS)})."),
            (bool(self.methods), "Name at least one arm."),
            (len(set(self.methods)) == len(self.methods), "An arm is named twice."),
            (bool(self.seeds), "Name at least one seed."),
            (len(set(self.seeds)) == len(self.seeds), "A seed is named twice."),
            (self.tau > 0, "tau must be positive."),
            (0 < self.target_share < 1, "target_share must be between 0 and 1."),
            (self.limit is None or self.limit >= 1, "limit must be at least 1."),
            (self.epochs > 0, "epochs must be positive."),
            (self.batch_size >= 1, "batch_size must be at least 1."),
            (self.gen_samples >= 1, "gen_samples must be at least 1."),
            (self.eval_limit is None or self.eval_limit >= 1, "eval_limit must be at least 1."),
        ]
        for ok, message in checks:
            if not ok:
                raise LensError(message)

    def describe(self) -> str:
        """One line for logs and the jobs list."""
        model = "embedded SmolLM2-135M" if self.model == "default" else self.model
        return (
            f"protocol {self.preset}: {self.task}, {', '.join(self.methods)} x "
            f"{len(self.seeds)} seed(s), suite {self.suite}, {model}"
        )


@dataclass(frozen=True)
class Arm:
    """One method of the protocol: its key (run folder part), label and training settings."""

    key: str
    label: str
    overrides: dict[str, Any]


def _train_default(name: str) -> Any:
    """A `TrainConfig` field's default (the token losses' parameters an arm trains with)."""
    found = next(f for f in fields(TrainConfig) if f.name == name)
    return found.default if found.default is not MISSING else found.default_factory()


def loss_text(loss: str) -> str:
    """A token loss as an arm label names it, with its default parameters: "KL β=0.1",
    "EAFT α=1, K=20"."""
    value = _train_default
    return {
        "soft_stm": f"soft STM T={value('loss_temperature'):g}",
        "dft": "DFT",
        "eaft": f"EAFT α={value('eaft_alpha'):g}, K={value('eaft_k')}",
        "kl": f"KL β={value('kl_beta'):g}",
        "asft": f"ASFT α={value('asft_alpha'):g}",
    }.get(loss, loss)


def arm_specs(config: ProtocolConfig) -> dict[str, Arm]:
    """The training overrides of every arm (Self-Output's data folder is added later). A loss
    arm sets `loss` and leaves its parameters at `TrainConfig`'s defaults; its label says what
    is combined ("ground truth + KL β=0.1", "STM τ=2.5 + KL β=0.1")."""
    tau = f"{config.tau:g}"
    share = f"{100 * config.target_share:g}%"
    losses = {
        loss: Arm(loss, f"ground truth + {loss_text(loss)}", {"method": "gt", "loss": loss})
        for loss in ("soft_stm", "dft", "eaft", "kl", "asft")
    }
    return {
        "gt": Arm("gt", "ground truth", {"method": "gt"}),
        "stm": Arm("stm", f"STM τ={tau}", {"method": "stm", "tau": config.tau}),
        "stm_share": Arm(
            "stm_share",
            f"STM {share} masked",
            {"method": "stm", "tau": None, "target_share": config.target_share},
        ),
        "random": Arm(
            "random", f"random mask (as many as τ={tau})", {"method": "random", "tau": config.tau}
        ),
        "self_output": Arm("self_output", "Self-Output", {"method": "gt"}),
        **losses,
        "stm_kl": Arm(
            "stm_kl",
            f"STM τ={tau} + {loss_text('kl')}",
            {"method": "stm", "tau": config.tau, "loss": "kl"},
        ),
    }


def train_config(
    config: ProtocolConfig, arm: Arm, seed: int, data: str | None = None
) -> dict[str, Any]:
    """The `core.training.config.TrainConfig` (as a dict) of one arm and seed."""
    values: dict[str, Any] = {
        "model": config.model,
        "device": config.device,
        "precision": config.precision,
        "limit": config.limit,
        "max_length": config.max_length,
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "lora_r": config.lora_r,
        "lora_alpha": 2 * config.lora_r,
        "finetune": config.finetune,
        "seed": seed,
        "mask_seed": seed,
        "eval_every": EVAL_AT_START_AND_END,
        "eval_suite": {"suite": config.suite, "limit": config.eval_limit}
        if config.eval_limit
        else config.suite,
        **arm.overrides,
    }
    if data is not None:
        values.update(task=None, split=None, data=data, limit=None)
    else:
        values.update(task=config.task, split=_train_split(config.task))
    return TrainConfig.from_preset(config.train_preset, **values).to_dict()


def _train_split(task: str) -> str:
    """The split an arm trains on: "train" where the task has one (MBPP's fixed split)."""
    spec = get_task(task)
    return "train" if "train" in spec.splits else spec.default_split


def preflight(config: ProtocolConfig) -> None:
    """Check every setting the protocol will use (task, suite, each arm's training config, the
    generation config), so bad input fails with one line before any job exists."""
    arms = arm_specs(config)
    for key in config.methods:
        cfg = train_config(config, arms[key], config.seeds[0])
        suite_from_config(cfg["eval_suite"], config.task)
    if "self_output" in config.methods:
        generation_preflight(GenDataConfig.from_dict(generation_config(config)))


def generation_config(config: ProtocolConfig) -> dict[str, Any]:
    """The `core.datagen.config.GenDataConfig` (as a dict) of the Self-Output data."""
    return GenDataConfig.from_preset(
        "cpu-quick" if config.preset == "cpu" else "paper",
        kind="self_output",
        model=config.model,
        device=config.device,
        task=config.task,
        split=_train_split(config.task),
        limit=config.limit,
        n_samples=config.gen_samples,
        max_new_tokens=config.gen_max_new_tokens,
        prompt_batch=config.gen_prompt_batch,
        temperature=config.gen_temperature,
        top_p=config.gen_top_p,
        seed=0,
        threads=config.threads,
    ).to_dict()
