"""The paper's protocol in one command: every method, several seeds, one table, one report.

`python -m core protocol` (or a "protocol" job from the app) runs, on one model and one target
task (MBPP, the fixed train / held-out split of `core.data.tasks`):

1. Self-Output data: one generation run (`core.datagen.run`, seed 0) over the training prompts,
   checked by the task's verifier; the kept answers become a training set. With no correct
   sample at all, the Self-Output arm is reported as skipped, with the reason.
2. Training arms, each once per seed, as train jobs of the registry (`core.jobs.registry`: one
   process per run, so memory is returned between runs and a killed arm leaves the others
   intact; on the local queue one after the other, on Ray or SLURM all at once):
   ground truth (``gt``), STM at τ (``stm``, default τ = 2.5), STM at the τ that masks a target
   share of response tokens (``stm_share``, default 25%), the random-mask control with as many
   masked tokens as STM at τ (``random``), and Self-Output (``self_output``); and one arm per
   token loss of `core.training.losses` on the ground-truth data with its default parameters
   (``soft_stm``, ``dft``, ``eaft``, ``kl``, ``asft``) plus STM's mask with the KL term
   (``stm_kl``), each labelled by what it combines ("ground truth + KL β=0.1").
   Each arm evaluates the protocol's suite at step 0 (the base model: the same cached result for
   every arm with the embedded model) and at its last step, through `core.training.callbacks`.
3. Aggregation: per arm, the mean over seeds and a 95% confidence interval (Student t, n - 1
   degrees of freedom) of the target change, each out-of-domain score, BWT and the change of the
   out-of-domain reference NLL (all tokens, and the base-easy tokens as a diagnostic); then the
   paired comparisons, over seeds and then the same evaluation items (hierarchical bootstrap):
   each arm's end against its own step 0 (the forgetting it causes), against ground truth
   (whether it forgets less) and against STM (whether a loss beats the mask), as sentences and
   as tables, with a plain-words headline. Written to `results.json` and
   `results.md` in the protocol folder; then `report.html` over all the runs.

Everything is resumable: a run folder that already holds a finished run is reused, a partial
one resumes from its last checkpoint, the generation resumes from its candidates file. Run
folders are `<runs_dir()>/<protocol id>-<arm>-s<seed>`, so the Runs and Compare pages show them
beside every other run; the protocol folder itself holds `config.json` (kind "protocol"),
`results.*`, `report.html` and `log.txt` of its subprocesses' output.

Two presets: ``cpu`` (the embedded model on 2 CPU cores in about an hour: ground truth, STM,
the random control and Self-Output, 3 seeds each, one epoch in the setting where the CPU sweep
saw ground truth forget, forgetting read from drift; docs/BENCHMARKS.md, "Paper protocol") and
``paper`` (the paper's settings for a GPU: every arm, the token losses' included, all 400 training problems, lr 2e-5, 3
epochs, N = 32 samples of up to 512 tokens, the full ``paper`` suite). Every setting is also a
flag.

One concern per module, each importing only those before it:

- `config`: `ProtocolConfig`, the presets, the arms and their training / generation configs,
  `preflight`, the file and measure names;
- `prose`: the headline, findings, tables, `results.md` and the report;
- `results`: each run's measures, the per-arm aggregate and the paired comparisons;
- `folders`: the protocol's and its runs' folders, progress lines, partial results, the ETA;
- `launch`: every run as a job of the registry, in turn (local) or all at once (a cluster);
- `run`: `run_protocol` and the "protocol" job's `run_job` (`core.jobs.registry.JOB_KINDS`
  names this package, so `run_job` is exported here);
- `view`: `ProtocolView`, `load_protocol`, `list_protocols` (the app's reading);
- `recorded`: the recorded CPU sweep and cpu protocol (`docs/cpu_forgetting.json`,
  `docs/cpu_protocol.json`).

This package re-exports their public names. A module-level setting is read where it is
defined: point `core.study.protocol.recorded.CPU_SWEEP_JSON`, not this package's copy.
"""

from core.study.protocol.config import (
    ARM_HELP,
    ARMS,
    CPU_ARMS,
    EVAL_AT_START_AND_END,
    FORGETTING,
    GENERATION_DIR,
    LOSS_ARMS,
    OOD_DRIFT,
    OOD_NLL,
    PAPER_ARMS,
    PARTIAL_JSON,
    PRESETS,
    PROGRESS_TXT,
    PROTOCOL_KIND,
    REPORT_HTML,
    RESULTS_JSON,
    RESULTS_MD,
    Arm,
    ProtocolConfig,
    arm_specs,
    generation_config,
    loss_text,
    preflight,
    train_config,
)
from core.study.protocol.folders import (
    protocol_eta,
    protocol_folder,
    run_id,
    write_partial_results,
)
from core.study.protocol.launch import RunTarget
from core.study.protocol.prose import (
    PAIRED_TABLES,
    compare_to_gt,
    findings,
    headline,
    markdown_table,
    measure_label,
    metric_name,
    paired_findings,
    paired_table,
    probe_items,
    results_markdown,
    short_headline,
    summary_table,
    write_protocol_report,
)
from core.study.protocol.recorded import (
    CPU_PROTOCOL_JSON,
    CPU_SWEEP_JSON,
    load_cpu_protocol,
    load_cpu_sweep,
    sweep_table,
    sweep_verdict,
)
from core.study.protocol.results import (
    DRIFT_PAIRED,
    PAIRED_METRICS,
    aggregate,
    paired_with_base,
    paired_with_gt,
    paired_with_random,
    paired_with_stm,
    run_measures,
)
from core.study.protocol.run import run_job, run_protocol
from core.study.protocol.view import ProtocolView, list_protocols, load_protocol

__all__ = [
    "ARMS",
    "ARM_HELP",
    "CPU_ARMS",
    "CPU_PROTOCOL_JSON",
    "CPU_SWEEP_JSON",
    "DRIFT_PAIRED",
    "EVAL_AT_START_AND_END",
    "FORGETTING",
    "GENERATION_DIR",
    "LOSS_ARMS",
    "OOD_DRIFT",
    "OOD_NLL",
    "PAIRED_METRICS",
    "PAIRED_TABLES",
    "PAPER_ARMS",
    "PARTIAL_JSON",
    "PRESETS",
    "PROGRESS_TXT",
    "PROTOCOL_KIND",
    "REPORT_HTML",
    "RESULTS_JSON",
    "RESULTS_MD",
    "Arm",
    "ProtocolConfig",
    "ProtocolView",
    "RunTarget",
    "aggregate",
    "arm_specs",
    "compare_to_gt",
    "findings",
    "generation_config",
    "headline",
    "list_protocols",
    "load_cpu_protocol",
    "load_cpu_sweep",
    "load_protocol",
    "loss_text",
    "markdown_table",
    "measure_label",
    "metric_name",
    "paired_findings",
    "paired_table",
    "probe_items",
    "paired_with_base",
    "paired_with_gt",
    "paired_with_random",
    "paired_with_stm",
    "preflight",
    "protocol_eta",
    "protocol_folder",
    "results_markdown",
    "run_id",
    "run_job",
    "run_measures",
    "run_protocol",
    "short_headline",
    "summary_table",
    "sweep_table",
    "sweep_verdict",
    "train_config",
    "write_partial_results",
    "write_protocol_report",
]
