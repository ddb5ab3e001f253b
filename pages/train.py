"""Train: launch fine-tuning runs (GT, STM, controls, token losses) as background jobs and
follow them.

Jobs are separate processes (core.jobs): closing or reloading the browser never stops them. The
selected job lives in the URL (`?job=...`), so a reload re-attaches to it; the jobs list and the
job view poll the registry every few seconds in fragments and never block the page.
"""

from dataclasses import fields
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from components.jobs_view import (
    backend_caption,
    current_state,
    fmt_seconds,
    job_header,
    job_log,
    job_picker,
    job_registry,
    jobs_table,
    watched_job,
)
from components.session import (
    NO_FILE,
    load_dataset_cached,
    missing_data_message,
    sidebar_selection,
    url_tau,
)
from core.config import field_default
from core.errors import LensError
from core.eval.suites import SUITES as EVAL_SUITES
from core.fmt import count, num, share
from core.io import read_json
from core.jobs.metrics import DataRecord, EvalRecord, TrainRecord, latest, of_kind
from core.jobs.registry import FAILED, RUNNING, SUCCEEDED
from core.jobs.runfiles import SUMMARY_JSON, read_records, run_progress
from core.masking.config import METHODS, PERCENTILE_RULES
from core.study.estimates import (
    Estimate,
    device_note,
    estimate_training,
    preset_for_device,
    runs_key,
)
from core.training.config import (
    FINETUNES,
    KL_ESTIMATORS,
    LOSS_FORMULAS,
    LOSSES,
    PRESETS,
    REPORTERS,
    SCHEDULERS,
    TrainConfig,
)
from core.viz.charts import plotly_config
from core.viz.run_charts import training_loss_figure

POLL_SECONDS = 2.0
METHOD_LABELS = {
    "gt": "Ground truth (every response token)",
    "stm": "STM: mask high-perplexity tokens",
    "random": "Random mask, same count (control)",
    "low": "Mask low-perplexity tokens",
    "percentile": "Percentile (k% per example)",
}
FINETUNE_LABELS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tuning"}
LOSS_LABELS = {
    "nll": "NLL (plain cross-entropy)",
    "soft_stm": "Soft STM: weight p_base^(1/T)",
    "dft": "DFT: weight p (TRL's own)",
    "eaft": "EAFT: weight by top-K entropy",
    "kl": "CE + β·KL to the base",
    "asft": "ASFT: DFT + α·KL to the base",
}
LOSS_HELP = (
    "How each token the method keeps counts in the loss (the method is the mask: which "
    "tokens; the loss: how much each one weighs). Per token t, the sum divided by the tokens in "
    "the loss:\n\n" + "\n\n".join(f"**{name}**: {text}" for name, text in LOSS_FORMULAS.items())
)
DATA_KINDS = {
    "sidebar": "Sidebar data (ground-truth responses)",
    "generated": "A generated set (Self-Output / Rephrase)",
    "path": "A folder or file path (masked export, generated set, JSONL/CSV)",
}

sel = sidebar_selection()
registry = job_registry()

st.title("Train")
st.caption(
    "Fine-tune on ground-truth answers, with Selective Token Masking, or with a control mask. "
    "Runs are background jobs: they keep going when you close or reload this page, and one "
    "job runs per device at a time (the rest wait in the queue)."
)


@st.cache_data(show_spinner=False, max_entries=64)
def _estimate(config: dict, n_examples: int | None, root: str, stamp: str) -> Estimate:
    """The form's time estimate from the run folders under `root` (read again when `stamp`,
    their fingerprint, changes)."""
    return estimate_training(TrainConfig.from_dict(config), n_examples, root=root)


def _n_examples(kind: str, values: dict) -> int | None:
    """How many examples the run will train on, when it is known before it starts."""
    if kind == "sidebar":
        try:
            return len(load_dataset_cached(sel).examples)
        except LensError:
            return None
    return values.pop("_n_examples", None)


def _data_values(kind: str) -> dict:
    """Data settings of the config, from the sidebar or a chosen set/path."""
    if kind == "sidebar":
        if sel.kind == "task":
            return {"task": sel.task, "split": sel.split, "data": None, "limit": sel.limit}
        if not sel.data_path:
            raise LensError(missing_data_message(sel) or NO_FILE)
        return {
            "task": None,
            "data": sel.data_path,
            "prompt_col": sel.prompt_col,
            "response_col": sel.response_col,
            "id_col": sel.id_col or None,
            "limit": sel.limit,
        }
    if kind == "generated":
        from core.datagen.store import list_generated_sets

        sets = list_generated_sets()
        if not sets:
            raise LensError("No generated sets yet: make one on the Generate page first.")
        names = {str(s.path): f"{s.name} · {s.kind} · {count(s.n_examples)} examples" for s in sets}
        path = st.selectbox("Generated set", list(names), format_func=names.get)
        size = next(s.n_examples for s in sets if str(s.path) == path)
        return {"task": None, "data": path, "id_col": "id", "limit": None, "_n_examples": size}
    path = st.text_input(
        "Path", placeholder="/path/to/masked-export  or  /path/to/data.jsonl", key="data_path"
    ).strip()
    if not path:
        raise LensError("Enter the path of a masked export folder, a generated set or a file.")
    if not Path(path).expanduser().exists():
        raise LensError(f"Not found: {path}")
    return {"task": None, "data": path, "limit": None}


def launch_form() -> None:
    """The settings, the equivalent CLI command, and the Start button."""
    with st.container(border=True):
        st.subheader("New training run")
        c1, c2, c3 = st.columns(3)
        fitting = preset_for_device(sel.device)
        preset = c1.selectbox(
            "Preset",
            list(PRESETS),
            index=list(PRESETS).index(fitting),
            key="train_preset",
            help="**paper**: lr 2e-5, 3 epochs, cosine, LoRA on all linear layers (for a GPU). "
            "**cpu-quick**: 48 examples, 2 epochs, lr 5e-4: 5-8 minutes on 2 CPU cores with the "
            f"embedded model. The form opens on **{fitting}**: {device_note(sel.device)}.",
        )
        base = TrainConfig.from_preset(preset)
        method = c2.selectbox("Method", METHODS, format_func=METHOD_LABELS.get, key="train_method")
        finetune = c3.selectbox(
            "Fine-tuning",
            FINETUNES,
            index=FINETUNES.index(base.finetune),
            format_func=FINETUNE_LABELS.get,
            key="train_finetune",
        )
        values: dict = {"method": method, "finetune": finetune, "model": sel.model}
        values["device"] = sel.device

        if method in ("stm", "random", "low"):
            m1, m2 = st.columns(2)
            by_share = m1.radio(
                "Threshold", ["τ", "Target share"], horizontal=True, key="threshold_kind"
            )
            if by_share == "τ":
                tau_q = url_tau()
                values["tau"] = m2.number_input(
                    "τ (token perplexity)", min_value=1.0, value=tau_q, step=0.1, format="%.2f"
                )
                values["target_share"] = None
            else:
                share = m2.slider("Share of response tokens to mask (%)", 0, 100, 22)
                values.update(tau=None, target_share=share / 100)
        elif method == "percentile":
            m1, m2 = st.columns(2)
            values["percentile_rule"] = m1.selectbox("Which k%", PERCENTILE_RULES)
            values["k_percent"] = float(m2.slider("k (%)", 0, 100, 20))

        _loss_values(values, finetune)

        kind = st.radio(
            "Training data",
            list(DATA_KINDS),
            format_func=DATA_KINDS.get,
            horizontal=True,
            key="train_data_kind",
        )
        try:
            values.update(_data_values(kind))
        except LensError as exc:
            st.error(str(exc))
            return
        n_examples = _n_examples(kind, values)
        if kind == "sidebar" and base.limit and sel.limit != base.limit:
            st.caption(
                f"The {preset} preset is sized for {count(base.limit)} examples; the sidebar "
                f"selects the first {count(sel.limit)}."
            )

        with st.expander("Hyperparameters"):
            h1, h2, h3, h4 = st.columns(4)
            k = f"-{preset}"  # a preset change resets these widgets to its values
            values["learning_rate"] = h1.number_input(
                "Learning rate",
                min_value=1e-8,
                value=base.learning_rate,
                format="%.2e",
                step=base.learning_rate / 2,
                key="lr" + k,
            )
            by_steps = st.session_state.get("steps" + k) is not None
            values["epochs"] = h2.number_input(
                "Epochs",
                min_value=0.1,
                value=base.epochs,
                step=1.0,
                key="epochs" + k,
                disabled=by_steps,
                help="Max steps is set: it decides the run's length." if by_steps else None,
            )
            values["max_steps"] = h3.number_input(
                "Max steps", min_value=1, value=None, placeholder="from epochs", key="steps" + k
            )
            values["batch_size"] = h4.number_input(
                "Batch size", min_value=1, value=base.batch_size, key="bs" + k
            )
            h1, h2, h3, h4 = st.columns(4)
            values["max_length"] = h1.number_input(
                "Max tokens / example", min_value=16, value=base.max_length, key="len" + k
            )
            values["grad_accum"] = h2.number_input(
                "Grad. accumulation", min_value=1, value=base.grad_accum, key="ga" + k
            )
            values["lr_scheduler"] = h3.selectbox(
                "Schedule", SCHEDULERS, index=SCHEDULERS.index(base.lr_scheduler), key="sch" + k
            )
            values["warmup_ratio"] = h4.number_input(
                "Warmup share", 0.0, 0.99, value=base.warmup_ratio, step=0.05, key="wu" + k
            )
            h1, h2, h3, h4 = st.columns(4)
            if finetune != "full":
                values["lora_r"] = h1.number_input("LoRA r", 1, 1024, base.lora_r, key="r" + k)
                values["lora_alpha"] = h2.number_input(
                    "LoRA alpha", 1, 4096, base.lora_alpha, key="alpha" + k
                )
            values["precision"] = h3.selectbox(
                "Precision",
                ["auto", "fp32", "bf16"],
                key="prec" + k,
                help="auto: bf16 autocast on GPUs with bf16 and on CPUs with AMX/AVX512-BF16.",
            )
            values["seed"] = h4.number_input("Seed", 0, 2**31 - 1, base.seed, key="seed" + k)
            h1, h2 = st.columns(2)
            values["save_every"] = h1.number_input(
                "Checkpoint every N steps",
                min_value=1,
                value=None,
                placeholder="every epoch",
                key="save" + k,
            )
            values["report_to"] = h2.multiselect("Also log to", list(REPORTERS), key="report" + k)
            h1, h2, h3 = st.columns(3)
            values["eval_every"] = h1.number_input(
                "Evaluate every N steps",
                min_value=1,
                value=None,
                placeholder="off",
                key="eval_every" + k,
                help="Target and out-of-domain scores during training: at step 0 (the base "
                "model), every N steps and at the end. The Runs page charts them live.",
            )
            if values["eval_every"]:
                eval_suite = h2.selectbox(
                    "Evaluation suite",
                    list(EVAL_SUITES),
                    index=list(EVAL_SUITES).index("during"),
                    key="eval_suite" + k,
                    help="during: forward passes only (fast). tiny: every scorer on 2-3 examples.",
                )
                eval_limit = h3.number_input(
                    "Examples per eval task",
                    min_value=1,
                    value=None,
                    placeholder="suite's",
                    key="eval_limit" + k,
                )
                values["eval_suite"] = {"suite": eval_suite, "limit": eval_limit}
                st.caption(
                    f"The **{eval_suite}** suite runs at step 0, every "
                    f"{count(values['eval_every'])} steps and at the end."
                )
            else:
                h2.caption(
                    "Evaluation is off: no suite runs during training. Set N to evaluate at "
                    "step 0, every N steps and at the end, or evaluate the finished adapter on "
                    "the Runs page."
                )

        try:
            config = TrainConfig.from_preset(preset, **values)
        except LensError as exc:
            st.error(str(exc))
            return
        st.caption(_estimate(config.to_dict(), n_examples, *runs_key()).text())
        st.caption("Equivalent command (runs in the foreground; add `--submit` to queue it):")
        st.code(config.command(), language="bash", wrap_lines=True)
        # A callback (not `if st.button`): it runs before the script, so a rerun early in the
        # script can never swallow the click. It submits exactly the config shown above.
        st.button(
            "Start training",
            type="primary",
            icon=":material/play_arrow:",
            on_click=_start_job,
            args=(config.to_dict(), config.device, config.describe()),
        )
        backend_caption(registry)
        if st.session_state.get("train_start_error"):
            st.error(st.session_state.pop("train_start_error"))
        # kept while that job is selected: the job table's rerun on a new job must not drop it
        note = st.session_state.get("train_start_note")
        if note and note["job"] == st.query_params.get("job"):
            st.info(note["text"])


def _field_help(name: str) -> str:
    """A TrainConfig field's help text (the CLI's), for a widget's tooltip."""
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def _loss_values(values: dict, finetune: str) -> None:
    """The token loss and, only when it has them, its parameters (with their formula)."""
    l1, l2, l3 = st.columns(3)
    loss = l1.selectbox(
        "Token loss", LOSSES, format_func=LOSS_LABELS.get, key="train_loss", help=LOSS_HELP
    )
    values["loss"] = loss

    def number(column: Any, label: str, name: str, **kwargs: Any) -> Any:
        default = field_default(TrainConfig, name)
        help_text = _field_help(name)
        return column.number_input(
            label, value=default, key=f"train_{name}", help=help_text, **kwargs
        )

    if loss == "soft_stm":
        values["loss_temperature"] = number(l2, "T", "loss_temperature", min_value=0.0, step=0.25)
    elif loss == "eaft":
        values["eaft_alpha"] = number(l2, "α", "eaft_alpha", min_value=0.0, step=0.25)
        values["eaft_k"] = number(l3, "K", "eaft_k", min_value=2)
    elif loss in ("kl", "asft"):
        name, label = ("kl_beta", "β") if loss == "kl" else ("asft_alpha", "α")
        values[name] = number(l2, label, name, min_value=0.0, step=0.05, format="%g")
        values["kl_estimator"] = l3.selectbox(
            "KL estimator",
            KL_ESTIMATORS,
            key="train_kl_estimator",
            help=_field_help("kl_estimator"),
        )
    note = f"Per token: {LOSS_FORMULAS[loss]}."
    if loss in ("soft_stm", "kl", "asft"):
        note += (
            " A frozen copy of the base model is kept for its predictions (one more model in "
            "memory)."
            if finetune == "full"
            else " The base model's pass is the same model with its adapter disabled."
        )
    st.caption(note)


def _weights_line(record: TrainRecord) -> str:
    """The token weights a logged step trained with, in words."""
    line = (
        f"Token weights at step {count(record.step)}: mean {num(record.weight_mean)} over the "
        f"tokens in the loss; effective share {share(record.weight_share or 0.0)} of the "
        "response tokens (masked ones count as 0)"
    )
    if record.kl is not None:
        line += f"; KL to the base {num(record.kl)} per token"
    return line + "."


def _start_job(config: dict, device: str, label: str) -> None:
    """Queue the job and select it (the URL keeps the selection across reloads)."""
    try:
        job, new = registry.submit_once("train", config, device=device, label=label)
    except LensError as exc:
        st.session_state["train_start_error"] = str(exc)
        return
    if not new:
        st.session_state["train_start_note"] = {
            "job": job.id,
            "text": f"The same training job is already {job.status} (job {job.id}): showing "
            "it, not queuing it twice.",
        }
    st.query_params["job"] = job.id


def jobs_frame(jobs: list) -> pd.DataFrame:
    """One row per job: status, progress, ETA, last loss, label."""
    rows = []
    for job in jobs:
        prog = run_progress(read_records(job.run_dir))
        rows.append(
            {
                "job": job.id,
                "status": job.status,
                "progress": prog.fraction,
                "step": f"{prog.step}/{prog.max_steps}" if prog.max_steps else "",
                "ETA": fmt_seconds(prog.eta_seconds) if job.status == RUNNING else "",
                "loss": num(prog.last_loss, 4),  # the one number rule; "–" before a step
                "elapsed": fmt_seconds(job.elapsed),
                "run": job.label,
                "where": job.where,
                "now": job.message,
            }
        )
    return pd.DataFrame(rows)


def jobs_list() -> None:
    """The registry, refreshed every few seconds; reruns the page when jobs appear."""
    jobs_table(
        registry.list,
        jobs_frame,
        state_key="train_job_ids",
        empty="No training runs yet. Start one above, or from the command line.",
        column_config={
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0),
        },
    )


def job_view(job_id: str) -> None:
    """Status, progress, loss chart, data facts, log tail and actions of one job."""

    @st.fragment(run_every=POLL_SECONDS)
    def view() -> None:
        job = watched_job(registry, job_id, "train_view_status")
        if job is None:
            return
        records = read_records(job.run_dir)
        prog = run_progress(records)
        job_header(registry, job, resume_note="it continues from its last checkpoint.")
        # while the job reports its state, the header's bar says it (one bar, not two)
        if (job.status == RUNNING or prog.max_steps) and current_state(job.run_dir, job) is None:
            running = job.status == RUNNING and prog.eta_seconds
            eta = f" · about {fmt_seconds(prog.eta_seconds)} left" if running else ""
            text = f"step {count(prog.step)} of {count(prog.max_steps)}{eta}"
            st.progress(prog.fraction, text=text)
        if job.status == FAILED:
            st.error(job.error.splitlines()[0] if job.error else "failed")
        data_record = latest(records, DataRecord)
        data = data_record.fields if data_record else None
        if data:
            st.caption(
                f"Data: {count(data.get('n_examples'))} examples, "
                f"{count(data.get('n_trainable_tokens'))} of "
                f"{count(data.get('n_response_tokens'))} response tokens trained "
                f"({share(data.get('masked_share') or 0.0)} masked: {data.get('mask')}); "
                f"{count(data.get('n_truncated', 0))} truncated."
            )
            if data.get("n_fully_masked"):
                st.warning(
                    f"{count(data['n_fully_masked'])} examples have no trainable token left: "
                    "they stay in the data but carry no loss. Ids: "
                    + ", ".join(map(str, data.get("fully_masked_ids", [])[:20]))
                )
        trained = of_kind(records, TrainRecord)
        if trained:
            st.plotly_chart(training_loss_figure(records), config=plotly_config(f"loss_{job.id}"))
            if trained[-1].weight_mean is not None:
                st.caption(_weights_line(trained[-1]))
        evals = of_kind(records, EvalRecord)
        if evals:
            frame = pd.DataFrame([e.to_dict() for e in evals])
            st.dataframe(
                frame.pivot_table(index="step", columns=["task", "metric"], values="value"),
                width="stretch",
            )
        summary = read_json(Path(job.run_dir) / SUMMARY_JSON)
        if job.status == SUCCEEDED and isinstance(summary, dict):
            first, last = summary.get("train_loss_first"), summary.get("train_loss_last")
            if first is not None and last is not None:
                st.success(
                    f"Done in {fmt_seconds(summary.get('wall_time_s'))}: loss {num(first)} → "
                    f"{num(last)}. Adapter: `{summary.get('adapter_dir')}`"
                )
        job_log(job, lines=40)

    view()


launch_form()
st.subheader("Jobs")
jobs_list()

chosen = job_picker(registry.list(refresh=False))
if chosen:
    job_view(chosen)
elif st.query_params.get("job"):
    st.warning(f"Job {st.query_params['job']} is not in {registry.path}.")
