"""Fine-tuning with the mask: TRL's SFTTrainer on pre-tokenized (input_ids, labels) data.

What reaches the trainer is decided here and nowhere else:

- Token ids come from `core.model.encoding.encode_pair` (prompt-conditioned chat template, the same
  ids scoring used), and labels from `core.masking.rules.labels_for`: -100 on prompt/template tokens
  and on masked response tokens, the token id elsewhere.
- `method` picks the mask: ``gt`` trains every response token; ``stm`` masks tokens whose
  perplexity under the ORIGINAL model exceeds tau (mode high); ``random`` masks as many tokens
  as stm would at random positions (the control); ``low`` masks ppl < tau; ``percentile`` masks
  k% per example. Scores come from `core.scoring.score_examples` with the score cache, computed
  before any weight changes, in float32 (the app's CPU default, so Explore's scores are reused).
- Examples left with no trainable token stay in the data (they add no loss: TRL divides the
  summed token loss by the number of trainable tokens) and are counted in `summary.json`, the
  log and the start of the run; nothing is dropped silently. Over-long examples are truncated by
  `encode_pair` and counted too.

Why SFTTrainer takes the data as is: TRL 1.16 treats a dataset that already has `input_ids`
as processed, keeps an existing `labels` column, and its collator pads labels with -100. Its
preparation would, with `max_length` set, truncate and then silently drop examples with no
trainable label, so preparation is skipped (`skip_prepare_dataset`) and `max_length` is None:
truncation already happened, visibly, in `encode_pair`.

Data sources (`TrainConfig`): a built-in task split (``task`` + ``split``), or ``data``: a
JSONL/CSV file of prompt/response rows, a generated-set folder (``manifest.json`` of kind
self_output / rephrase + ``examples.jsonl``, see `core.datagen.store`), or a masked export folder
from `core.masking.export_masked_dataset` (its labels already carry a mask; train it with
method ``gt``).

Token losses (`TrainConfig.loss`, `core.training.losses`): `TokenLossTrainer` is the one
SFTTrainer subclass. nll and dft are TRL's own `loss_type`s and run through SFTTrainer
unchanged; soft_stm, eaft, kl and asft reuse the same fused forward (TRL's per-token log-probs,
entropy and top-1) and add only what the loss needs: the base model's forward pass (soft_stm,
kl, asft; LoRA: the adapter disabled in this process; full fine-tuning: a frozen copy made
before training, whose size is logged), and the backbone's hidden states for EAFT's top-K
entropy and the full-vocabulary KL (TRL's tiled divergence kernel: neither model's logits are
built). The weights each logging step trained with go into the step's metrics.jsonl record.

Evaluation during training plugs in as extra `transformers.TrainerCallback`s: pass them to
`build_trainer` / `run_training`; in background jobs, `job_callbacks` asks
`core.training.callbacks_mk.make_training_callbacks(config, run_dir)` for them when ``eval_every`` is set.

Several processes: the same command runs under Accelerate (DDP), all processes sharing one run
folder: ``accelerate launch --num_processes N -m core train --config run.json --run-dir runs/x``.
Every process builds the training data (the main process of each machine first, so its scoring
fills the score cache the others read), prints the sha256 of its rows (`TrainingData.
labels_sha256`) and stops with an error unless all processes hold the same rows. Only the
main process (rank 0) writes config.json, metrics.jsonl, checkpoints' shared files, adapter/,
summary.json and the registry row, prints the run's progress, and evaluates (`EvalCallback`): the
other processes wait for its rounds at their next step (`EVAL_WAIT_S`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.trainer.utils import add_fused_lm_head

from core import __version__
from core.errors import LensError
from core.eval.drift import reference_bytes
from core.io import replace_dir_atomic, write_json_atomic
from core.jobs.metrics import DataRecord, DoneRecord, loss_by_step
from core.jobs.runfiles import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_JSON,
    SUMMARY_JSON,
    StatusFn,
    append_metric,
    checkpoint_step,
    checkpoints,
    read_metrics,
)
from core.jobs.state import StateReporter, as_reporter
from core.training.callbacks import _metrics_callback, job_callbacks
from core.training.checkpoints import clean_partial, rewind_metrics, with_atomic_checkpoints
from core.training.config import REPORTERS, TrainConfig
from core.training.data import TrainingData, build_training_data
from core.training.losses import (
    TokenLoss,
    WeightLog,
    dft_weights,
    eaft_weights_from_entropy,
    kl_k3,
    logit_transform,
    reduce_terms,
    soft_stm_weights,
    token_terms,
    topk_entropy_from_hidden,
)

#: How long the other processes of a multi-process run wait (at their next gradient all-reduce)
#: for rank 0's evaluation round: torch's default of 30 minutes can be shorter than one round of
#: a large suite on a large model. Used only when `eval_every` is set.
EVAL_WAIT_S = 6 * 3600
DEFAULT_DDP_TIMEOUT_S = 1800

# --------------------------------------------------------------------------- token losses

#: the batch key of a batch's response-token count (masked ones included), added by
#: `ResponseCountCollator` for the logged effective-token share and popped before the forward
N_RESPONSE = "n_response"


class ResponseCountCollator:
    """TRL's collator, plus each batch's response-token count (the rows' `n_response`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        counts = [e.get(N_RESPONSE) for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != N_RESPONSE} for e in examples])
        if all(c is not None for c in counts):
            batch[N_RESPONSE] = torch.tensor(sum(int(c) for c in counts))
        return batch


@dataclass
class TokenTerms:
    """One micro-batch's per-token loss, shaped like TRL's fused outputs (batch, length - 1),
    zero off the label positions: `per_token` (with gradient), `weights` and `kl` (without;
    `kl` None unless the loss has a KL term), `mask` (label positions) and the fused outputs."""

    per_token: torch.Tensor
    weights: torch.Tensor
    kl: torch.Tensor | None
    mask: torch.Tensor
    outputs: Any


@contextlib.contextmanager
def _caught_output(module: Any) -> Iterator[dict[str, Any]]:
    """The output of `module`'s next forward call(s) inside the block, as `box["output"]`."""
    box: dict[str, Any] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        box["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def causal_lm(model: Any) -> Any:
    """The transformers causal LM under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def free_bytes(device: torch.device) -> int:
    """Memory free for one more copy of a model on `device` (host memory for a CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def base_copy_problem(model: Any) -> str | None:
    """Why a frozen copy of `model` (the base of a full fine-tune) cannot be kept, or None."""
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params):
        return "its weights are offloaded (parameters on the meta device), so they cannot be copied"
    offloaded = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if offloaded & {"disk", "cpu"} and any(p.device.type == "cuda" for p in params):
        return "it is split across the GPU and offloaded memory, so a copy would not fit either"
    device = params[0].device if params else torch.device("cpu")
    need, free = reference_bytes(model), free_bytes(device)
    if need * 1.05 > free:
        return (
            f"a frozen copy needs {need / 2**20:.0f} MiB and {device.type} has "
            f"{free / 2**20:.0f} MiB free"
        )
    return None


def frozen_base_copy(config: TrainConfig, model: Any) -> Any | None:
    """The frozen copy of the base a full fine-tune's loss needs (soft_stm, kl, asft), made
    before training changes a weight; None when the loss needs no base or LoRA/DoRA keeps it
    (the adapter disabled). One line when the base cannot be recovered this way."""
    if config.finetune != "full" or not config.needs_base_model():
        return None
    problem = base_copy_problem(model)
    if problem:
        raise LensError(
            f"Loss {config.loss} needs the base model's predictions; a full fine-tune keeps them "
            f"only in a frozen copy of the base, and {problem}. Use --finetune lora (the base "
            "is the model with its adapter disabled) or a loss without the base (nll, dft, eaft)."
        )
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    size = reference_bytes(reference) / 2**20
    note = f"loss {config.loss}: a frozen copy of the base model for its predictions"
    print(f"{note} ({size:.0f} MiB)", flush=True)
    return reference


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order (similar lengths batched together, the longest batch
    first), drawn from a generator seeded by the data seed and the epoch.

    The stock sampler draws from torch's global generator when its epoch starts, so a run
    resumed mid-epoch (whose fresh process starts that epoch from another generator state)
    trained on other batches than the uninterrupted run from that point on. Seeded per epoch
    (`set_epoch`, which the Trainer calls on the data loader at every epoch, skipped batches
    included), every epoch's order depends on the seed and the epoch alone."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of epoch `epoch` next."""
        self.epoch = epoch
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class TokenLossTrainer(SFTTrainer):
    """TRL's SFTTrainer with the token losses of `core.training.losses` (see the module
    docstring). `token_loss` says which; `weight_log` pools the weights trained with between
    logging steps; `reference` is a full fine-tune's frozen base copy (None: LoRA/DoRA disable
    their adapter for the base pass)."""

    def __init__(
        self,
        *args: Any,
        token_loss: TokenLoss,
        weight_log: WeightLog | None = None,
        reference: Any = None,
        **kwargs: Any,
    ) -> None:
        self.token_loss = token_loss
        self.weight_log = weight_log if weight_log is not None else WeightLog()
        self.reference = reference
        super().__init__(*args, **kwargs)
        if self.args.loss_type != token_loss.trl_loss_type:
            raise LensError(
                f"Loss {token_loss.name} runs with SFTConfig(loss_type="
                f"{token_loss.trl_loss_type!r}), not {self.args.loss_type!r}."
            )
        if reference is not None:
            add_fused_lm_head(reference, outputs=("log_probs",))
        self._check_loss_setup()

    def _check_loss_setup(self) -> None:
        spec = self.token_loss
        lm = causal_lm(self.model)
        if (
            spec.needs_base
            and self.reference is None
            and not hasattr(self.model, "disable_adapter")
        ):
            raise LensError(
                f"Loss {spec.name} needs the base model's predictions: this model has no adapter "
                "to disable (a full fine-tune) and no frozen base copy was made."
            )
        vocab = lm.get_output_embeddings().weight.shape[0]
        if spec.name == "eaft" and spec.eaft_k > vocab:
            raise LensError(f"eaft_k {spec.eaft_k} is larger than the vocabulary ({vocab}).")
        parallel = getattr(self.accelerator, "parallelism_config", None)
        if not spec.in_trl and parallel is not None and getattr(parallel, "sp_enabled", False):
            raise LensError(
                f"Loss {spec.name} is not supported with sequence parallelism; use nll or dft."
            )

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """The length-grouped order, seeded per epoch (`EpochLengthGroupedSampler`)."""
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochLengthGroupedSampler(
                sampler.batch_size, lengths=sampler.lengths, seed=int(seed)
            )
        return sampler

    # -- the loss ---------------------------------------------------------------------------

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        n_response = inputs.pop(N_RESPONSE, None)
        training = self.model.training
        if self.token_loss.in_trl:
            with _caught_output(self.accelerator.unwrap_model(model)) as caught:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            out = caught.get("output")
            if training and getattr(out, "label_mask", None) is not None:
                valid = out.log_probs[out.label_mask]
                weights = dft_weights(valid) if self.token_loss.name == "dft" else None
                self.weight_log.add(
                    torch.ones_like(valid) if weights is None else weights, n_response
                )
            return result
        terms = self.token_terms(model, inputs)
        num = terms.mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = reduce_terms(terms.per_token, num)
        # as SFTTrainer: num_items_in_batch counts every rank's tokens, DDP averages gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled and getattr(terms.outputs, "aux_loss", None) is not None:
            steps = (
                self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            )
            loss = loss + self.router_aux_loss_coef * terms.outputs.aux_loss / steps
        self._fused_metrics(terms.outputs, inputs, "train" if training else "eval")
        if training:
            kl = terms.kl[terms.mask] if terms.kl is not None else None
            self.weight_log.add(terms.weights[terms.mask], n_response, kl)
        return (loss, terms.outputs) if return_outputs else loss

    def token_terms(self, model: Any, inputs: dict[str, Any]) -> TokenTerms:
        """The per-token loss of soft_stm, eaft, kl and asft on one micro-batch (nll and dft:
        SFTTrainer's own `compute_loss`)."""
        spec = self.token_loss
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        unwrapped = self.accelerator.unwrap_model(model)
        lm = causal_lm(unwrapped)
        base_log_probs = base_hidden = None
        if spec.needs_base:  # first, so the trained model's pass keeps its train mode
            base = self._base_pass(unwrapped, inputs, hidden=spec.full_kl)
            base_hidden, base_log_probs = (base, None) if spec.full_kl else (None, base)
        catch = _caught_output(lm.base_model) if spec.needs_hidden else contextlib.nullcontext({})
        with catch as caught:
            outputs = model(**inputs, fused_lm_head=True)
        log_probs, mask = outputs.log_probs, outputs.label_mask
        hidden = caught["output"].last_hidden_state[:, :-1][mask] if spec.needs_hidden else None
        weights: torch.Tensor | None = None
        if spec.name == "soft_stm":
            weights = soft_stm_weights(base_log_probs, spec.temperature)
        elif spec.name == "asft":
            weights = dft_weights(log_probs)
        elif spec.name == "eaft":
            head = lm.get_output_embeddings()
            scale, cap = logit_transform(lm.config.get_text_config())
            rows = hidden.to(head.weight.device)
            entropy = topk_entropy_from_hidden(
                rows, head.weight, head.bias, spec.eaft_k, scale=scale, softcap=cap
            )
            valid = eaft_weights_from_entropy(entropy, spec.eaft_k, spec.eaft_alpha)
            weights = torch.ones(mask.shape, device=valid.device).masked_scatter(mask, valid)
        kl = None
        if spec.has_kl:
            if spec.full_kl:
                valid = self._full_kl(lm, hidden, base_hidden[:, :-1][mask])
                kl = torch.zeros(mask.shape, device=valid.device).masked_scatter(mask, valid)
            else:
                kl = kl_k3(log_probs, base_log_probs).masked_fill(~mask, 0.0)
        per_token = token_terms(log_probs, weights, kl, spec.kl_coef)
        shown = torch.ones_like(log_probs) if weights is None else weights
        return TokenTerms(
            per_token=per_token,
            weights=shown.detach(),
            kl=None if kl is None else kl.detach(),
            mask=mask,
            outputs=outputs,
        )

    def _base_pass(self, unwrapped: Any, inputs: dict[str, Any], *, hidden: bool) -> torch.Tensor:
        """The base model on this batch, without gradient and in eval mode: its label
        log-probs through the fused head, or (`hidden`) its backbone's last hidden states.
        LoRA/DoRA: the trained model with its adapter disabled; full: the frozen copy."""
        if self.reference is not None:
            ref, context = self.reference, contextlib.nullcontext()
        else:
            ref, context = unwrapped, unwrapped.disable_adapter()
        was_training = ref.training
        ref.eval()
        try:
            with torch.no_grad(), context:
                if hidden:
                    skip = ("labels", "output_router_logits")
                    fwd = {k: v for k, v in inputs.items() if k not in skip}
                    return causal_lm(ref).base_model(**fwd).last_hidden_state
                return ref(**inputs, fused_lm_head=True).log_probs
        finally:
            if was_training:
                ref.train()

    def _full_kl(self, lm: Any, hidden: torch.Tensor, base_hidden: torch.Tensor) -> torch.Tensor:
        """KL(p_base || p_theta) over the vocabulary at each label position (rows of the two
        models' last hidden states), by TRL's tiled divergence kernel (beta 0 = forward KL);
        the gradient flows to the trained model only."""
        ref_lm = causal_lm(self.reference) if self.reference is not None else lm
        head, ref_head = lm.get_output_embeddings(), ref_lm.get_output_embeddings()
        if hidden.shape[0] == 0:
            return hidden.new_zeros(0, dtype=torch.float32)
        scale, cap = logit_transform(lm.config.get_text_config())
        ref_scale, ref_cap = logit_transform(ref_lm.config.get_text_config())
        student = (hidden.to(head.weight.device), head.weight, head.bias)
        teacher = (base_hidden.to(ref_head.weight.device), ref_head.weight, ref_head.bias)
        # beta 0.0: the forward KL(teacher || student); temperature 1.0
        kl, _entropy = ChunkedDivergenceFunction.apply(
            *student, *teacher, 0.0, 1.0, scale, cap, ref_scale, ref_cap
        )
        return kl.float()

    def _fused_metrics(self, outputs: Any, inputs: dict[str, Any], mode: str) -> None:
        """The entropy, token accuracy and token count SFTTrainer's `compute_loss` records."""
        gather = self.accelerator.gather_for_metrics
        num_valid = gather(outputs.label_mask.sum()).sum()
        entropy_sum = gather(outputs.entropy.detach().sum()).sum()
        num_correct = gather(outputs.is_top1.sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
        accuracy = (num_correct / num_valid).item() if num_valid > 0 else 0.0
        metrics["mean_token_accuracy"].append(accuracy)
        if mode == "train":
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            else:
                local = torch.tensor(inputs["input_ids"].size(1), device=inputs["input_ids"].device)
            self._total_train_tokens += gather(local).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled and getattr(outputs, "aux_loss", None) is not None:
            metrics["aux_loss"].append(gather(outputs.aux_loss).mean().item())


# --------------------------------------------------------------------------- trainer


def cpu_has_fast_bf16() -> bool:
    """True if the CPU has AMX or AVX512-BF16 (bf16 matmuls much faster than fp32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device_type: str) -> bool:
    """Whether to train under bf16 autocast: auto = CUDA with bf16, or a CPU with AMX/AVX512-BF16."""
    import torch

    if precision == "bf16":
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise LensError("bf16 was requested but this GPU does not support it; use fp32.")
        if device_type == "mps":
            raise LensError("bf16 training is not supported on MPS here; use fp32.")
        return True
    if precision == "fp32":
        return False
    if device_type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    return False


def _training_device(config: TrainConfig) -> str:
    """The device this process trains on (each Accelerate process gets its own GPU)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if config.device == "auto" and local_rank is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local_rank)}"
    return config.device


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless started by `accelerate launch` /
    torchrun, which set RANK and WORLD_SIZE."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_same_data(data: TrainingData, rank: int, world_size: int) -> str:
    """Under several processes: print this rank's `labels_sha256`, gather every rank's, and
    raise `LensError` on every rank unless they are all the same (each process trains on its
    share of ITS rows, so rows that differ would silently train on a mix). Returns the digest."""
    from accelerate.utils import gather_object

    digest = data.labels_sha256
    print(
        f"rank {rank}/{world_size}: training data sha256 {digest} "
        f"({data.n_examples} examples, {data.n_trainable_tokens} trained tokens"
        + (f"; {data.scores}" if data.scores else "")
        + ")",
        flush=True,
    )
    digests = gather_object([digest])
    if len(set(digests)) > 1:
        shown = ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(digests))
        raise LensError(
            f"The {world_size} processes built different training data ({shown}); every process "
            "must see the same data, models and score cache settings."
        )
    return digest


def _check_reporters(names: list[str]) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise LensError(
                f"report_to {name} needs the '{name}' package: "
                'pip install "perplexity-lens[tracking]"'
            )


def _peft_config(config: TrainConfig) -> Any:
    if config.finetune == "full":
        return None
    from peft import LoraConfig

    target: Any = config.lora_target
    if target != "all-linear":
        target = [t.strip() for t in target.split(",") if t.strip()]
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target,
        use_dora=config.finetune == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_trainer(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: Sequence[Any] | None = None,
    lm: Any = None,
    data: TrainingData | None = None,
    status: StatusFn | None = None,
) -> tuple[Any, TrainingData]:
    """A `TokenLossTrainer` ready to `.train()`, and the data it trains on.

    `callbacks` are extra `transformers.TrainerCallback`s (e.g. evaluation every N steps).
    `lm` is a `core.model.loading.LoadedModel` to train (loaded in float32 if not given); masked
    methods score the data with it BEFORE training, i.e. under the original weights, and a full
    fine-tune whose loss needs the base keeps a frozen copy of those weights.
    """
    import warnings

    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig

    from core.model.loading import load_model  # lazy: heavy (torch)

    run = Path(run_dir)
    _check_reporters(config.report_to)
    token_loss = TokenLoss.from_config(config)
    if lm is None:
        if status:
            status(f"loading model {config.model}")
        lm = load_model(config.model, device=_training_device(config), dtype="float32")
    bf16 = resolve_precision(config.precision, lm.device.type)
    if "tensorboard" in config.report_to:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run / "tensorboard"))
    datasets.disable_progress_bars()
    # transformers 5 deprecation noise from peft/TRL internals, not actionable by the user
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    # The arguments come before the data: they set up the distributed state (gloo on CPU, NCCL
    # on GPUs, with `ddp_timeout`) that `main_process_first` below waits on.
    args = SFTConfig(
        output_dir=str(run / CHECKPOINTS_DIR),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_every else "epoch",
        save_steps=config.save_every or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=lm.device.type == "cpu",
        gradient_checkpointing=None,  # deprecated alias in transformers 5; TRL defaults it on
        activation_checkpointing=config.gradient_checkpointing,
        report_to=list(config.report_to) or "none",
        run_name=run.name,
        disable_tqdm=True,
        log_level="warning",
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        loss_type=token_loss.trl_loss_type,  # dft: TRL's own path
        remove_unused_columns=False,  # the rows' n_response reaches ResponseCountCollator
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=0,
        eval_strategy="no",
        ddp_timeout=EVAL_WAIT_S if config.eval_every else DEFAULT_DDP_TIMEOUT_S,
    )
    if data is None:
        # Several processes: the main process of each machine scores first and fills the score
        # cache, then the others build the same rows from it (no-op in a single process).
        with args.main_process_first(desc="building the training data"):
            data = build_training_data(config, lm, status=status)
    if args.world_size > 1:
        check_same_data(data, args.process_index, args.world_size)
    train_dataset = datasets.Dataset.from_list(
        [
            {"input_ids": r["input_ids"], "labels": r["labels"], N_RESPONSE: r.get(N_RESPONSE)}
            for r in data.rows
        ]
    )
    reference = frozen_base_copy(config, lm.model)  # before any weight changes
    weight_log = WeightLog()
    try:
        # checkpoints written whole or not at all (a kill while saving leaves nothing to resume)
        trainer = with_atomic_checkpoints(TokenLossTrainer)(
            model=lm.model,
            args=args,
            train_dataset=train_dataset,
            processing_class=lm.tokenizer,
            peft_config=_peft_config(config),
            callbacks=[_metrics_callback(run, status, weight_log), *(callbacks or [])],
            token_loss=token_loss,
            weight_log=weight_log,
            reference=reference,
        )
    except ValueError as exc:  # what TRL refuses, e.g. loss_type='dft' with an option it rejects
        text = str(exc)
        if "loss_type='dft'" not in text and "lm_head" not in text:
            raise
        raise LensError(
            f"TRL refuses loss {config.loss} in this setting: {text.split('. ')[0].rstrip('.')}."
        ) from None
    trainer.data_collator = ResponseCountCollator(trainer.data_collator)
    # Our callback prints one readable line per step; transformers' printer would add a dict.
    trainer.remove_callback(PrinterCallback)
    return trainer, data


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The newest `checkpoint-N` folder that was written to the end (has trainer_state.json)."""
    found = checkpoints(folder, complete=True)
    return found[-1] if found else None


def _loss_summary(records: list[dict[str, Any]], n: int = 3) -> dict[str, Any]:
    by_step = loss_by_step(records)
    losses = [by_step[s] for s in sorted(by_step)]
    if not losses:
        return {"train_loss_first": None, "train_loss_last": None}
    k = max(1, min(n, len(losses) // 2))  # first and last windows never overlap
    return {
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "logged_steps": len(losses),
    }


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {
        "perplexity_lens": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }


def _save_final_model(trainer: Any, target: Path) -> None:
    """Save the adapter (or full model) and tokenizer to `target` via a temp folder + rename."""

    replace_dir_atomic(target, lambda folder: trainer.save_model(str(folder)))


def run_training(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    callbacks: Sequence[Any] | None = None,
    status: StatusFn | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (resuming from its last complete checkpoint) and return the
    summary also written to summary.json.

    Writes config.json (or checks that the folder's config is the same), metrics.jsonl (start,
    train, checkpoint and done records), checkpoints/, adapter/ and summary.json. Under several
    processes only rank 0 writes them and prints the run's lines (see the module docstring); the
    other ranks return an empty summary.
    """

    run = Path(run_dir).expanduser().absolute()
    main = process_rank()[0] == 0
    run.mkdir(parents=True, exist_ok=True)
    existing = run / CONFIG_JSON
    if existing.is_file():
        if TrainConfig.from_json_file(existing).to_dict() != config.to_dict():
            raise LensError(
                f"{run} holds a run with a different config; use a new run folder or "
                f"--config {existing}."
            )
    elif main:
        write_json_atomic(existing, config.to_dict())
    started = time.time()
    if main:
        print(f"run folder: {run}", flush=True)
        print(f"config: {config.describe()}", flush=True)
    trainer, data = build_trainer(config, run, callbacks=callbacks, status=status)
    main = trainer.is_world_process_zero()
    if main:  # what a killed attempt left half-written goes; its steps after the checkpoint too
        removed = clean_partial(run / CHECKPOINTS_DIR)
        if removed:
            print(
                f"removed what a killed attempt left half-written: {', '.join(removed)}", flush=True
            )
    trainer.accelerator.wait_for_everyone()
    resume = last_complete_checkpoint(run / CHECKPOINTS_DIR)
    if main:
        rewind_metrics(run, (checkpoint_step(resume) or 0) if resume else 0)
        print(f"data: {data.describe()}", flush=True)
        if data.fully_masked_ids:
            shown = ", ".join(data.fully_masked_ids[:20])
            print(f"examples with no trainable token: {shown}", flush=True)
        if data.skipped:
            shown = "; ".join(f"{i}: {r}" for i, r in data.skipped[:20])
            print(f"skipped examples: {shown}", flush=True)
        if resume is not None:
            print(f"resuming from {resume.name}", flush=True)
        append_metric(run, DataRecord(fields=data.summary()))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    reporter = as_reporter(status)
    if reporter is not None:
        reporter.saving("the final model")
    summary: dict[str, Any] = {}
    if main:
        _save_final_model(trainer, run / ADAPTER_DIR)
        summary = {
            "config": config.to_dict(),
            "model": config.model,
            "finetune": config.finetune,
            "adapter_dir": str(run / ADAPTER_DIR),
            "data": data.summary(),
            "final_step": int(trainer.state.global_step),
            "max_steps": int(trainer.state.max_steps),
            "epochs": float(trainer.state.epoch or 0.0),
            "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
            "wall_time_s": time.time() - started,
            "resumed_from": resume.name if resume else None,
            "precision": "bf16" if trainer.args.bf16 else "fp32",
            "device": str(trainer.args.device),
            "world_size": int(trainer.args.world_size),
            **_loss_summary(read_metrics(run)),
            "versions": _versions(),
            "finished": time.time(),
        }
        write_json_atomic(run / SUMMARY_JSON, summary)
        done = DoneRecord(
            step=summary["final_step"],
            fields={k: summary[k] for k in ("train_loss_first", "train_loss_last")},
        )
        append_metric(run, done)
        print(
            f"done: step {summary['final_step']}, loss {summary['train_loss_first']:.4f} -> "
            f"{summary['train_loss_last']:.4f}, saved {run / ADAPTER_DIR}",
            flush=True,
        )
    return summary


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "train" job process (see `core.jobs.registry.run_job_process`)."""
    config = TrainConfig.from_dict(job.config)

    # the job's state (preparing data, evaluating step k, training step k/N, final evaluation,
    # saving): run_state.json, the status line and the log, with ETAs from measured rates
    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    run_training(config, job.path, callbacks=job_callbacks(config, job.path, status), status=status)
