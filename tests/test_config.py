"""One config mechanism for every command (score, mask, the job kinds, report, models, jobs,
backend, tasks, migrate): config -> equivalent command -> flags -> the same config (the command a page shows must run what the page shows), for
random configs of each kind; and the defects the old per-kind flag builders had."""

from __future__ import annotations

import shlex
import typing
from dataclasses import MISSING
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from core.cli import build_parser, main
from core.data.tasks import TasksConfig
from core.datagen.config import GenDataConfig
from core.errors import LensError
from core.eval.config import EvalConfig
from core.jobs.cluster import BackendConfig
from core.jobs.registry import JobsConfig
from core.masking.config import MaskCommandConfig
from core.migrate import MigrateConfig
from core.model.config import ModelsConfig
from core.scoring.config import ScoreConfig
from core.study.protocol import ARMS, ProtocolConfig
from core.study.report_config import ReportConfig
from core.study.sweep import SweepConfig
from core.training.config import REPORTERS, TrainConfig

KINDS = (
    ScoreConfig,
    MaskCommandConfig,
    TrainConfig,
    GenDataConfig,
    EvalConfig,
    ProtocolConfig,
    SweepConfig,
    ReportConfig,
    ModelsConfig,
    JobsConfig,
    BackendConfig,
    TasksConfig,
    MigrateConfig,
)

# Free-text values that must survive shell quoting; list fields draw their items from these.
TEXTS = ("my model", "/tmp/a b/data.jsonl", "x,y")
LIST_ITEMS = {
    "report_to": tuple(REPORTERS),
    "methods": ARMS,
    "taus": (1.5, 2.0, 10.0),
    "lm_eval_tasks": ("arc_easy", "piqa"),
    "tasks": ("arc_easy:validation", "mmlu", "gsm8k"),
    "runs": ("20261203-130418-cc24", *TEXTS),
    "models": ("default", *TEXTS),
    # probe files must exist and hold prompts (checked when the config is made)
    "probes": tuple(
        str(Path(__file__).parent / "data" / name)
        for name in ("probe_prompts.txt", "probe dir/my probe.jsonl")
    ),
}
SPECIAL = {
    "eval_suite": st.sampled_from([None, ["tiny"], {"suite": "tiny", "limit": 2}]),
    "seeds": st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
    "adapter": st.just(None),  # resolving one needs a run folder: tests/test_eval_jobs.py
    "suite": st.sampled_from(["default", "tiny", "during"]),
}


def _default(f) -> typing.Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def _strategy(cls: type, f, hint: typing.Any) -> st.SearchStrategy:
    if f.name in SPECIAL:
        return SPECIAL[f.name]
    if "choices" in f.metadata:
        return st.sampled_from(list(f.metadata["choices"]))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and args else hint
    if base is bool:
        strategy: st.SearchStrategy = st.booleans()
    elif base is int:
        strategy = st.integers(1, 64)
    elif base is float:
        strategy = st.sampled_from([0.05, 0.25, 0.5, 0.75, 2.5, 3.0, 1e-4])
    elif typing.get_origin(base) is list:
        strategy = st.lists(st.sampled_from(LIST_ITEMS[f.name]), max_size=3, unique=True)
    else:
        strategy = st.sampled_from([_default(f), *TEXTS])
    return st.one_of(st.none(), strategy) if optional else strategy


@st.composite
def configs(draw: st.DrawFn, cls: type) -> typing.Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in cls.cli_fields():
        if draw(st.booleans()):  # about half the fields stay at the preset's value
            values[f.name] = draw(_strategy(cls, f, hints[f.name]))
    preset = draw(st.sampled_from(list(cls.PRESETS))) if cls.PRESETS else None
    try:
        return cls.from_preset(preset, **values)
    except LensError:
        assume(False)


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.COMMAND)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_the_equivalent_command_parses_back_to_the_same_config(cls, data):
    config = data.draw(configs(cls))
    command = config.command()
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "core", cls.COMMAND]
    args = build_parser().parse_args(argv[3:])
    assert cls.from_args(args) == config
    assert cls.from_dict(config.to_dict()) == config  # config.json round trip too


def test_limit_none_reaches_train_and_generate_configs():
    """`--limit none` used to be dropped (the preset's 48 / 8 examples were kept)."""
    data = "/tmp/generated-set"
    train = TrainConfig.from_preset("cpu-quick", data=data, task=None, limit=None)
    assert "--limit none" in train.command()
    args = build_parser().parse_args(shlex.split(train.command())[3:])
    assert TrainConfig.from_args(args).limit is None
    gen = GenDataConfig.from_preset("cpu-quick", limit=None)
    args = build_parser().parse_args(shlex.split(gen.command())[3:])
    assert GenDataConfig.from_args(args).limit is None
    # and an explicit value still wins over the preset
    args = build_parser().parse_args(["train", "--preset", "cpu-quick", "--limit", "7"])
    assert TrainConfig.from_args(args).limit == 7


def test_data_flag_clears_the_default_task_and_the_command_leaves_it_implied():
    args = build_parser().parse_args(["train", "--data", "/tmp/x.jsonl"])
    config = TrainConfig.from_args(args)
    assert (config.task, config.data) == (None, "/tmp/x.jsonl")
    assert "--task" not in config.command()


def _exit_code(argv: list[str]) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        return exc.code


def test_bad_flag_values_are_one_line_errors(capsys):
    for argv, reason in (
        (["train", "--limit", "many"], "--limit"),
        (["train", "--nosuch-flag"], "unrecognized arguments"),
        (["protocol", "--seeds", "0,x"], "Seeds must be integers"),
        (["generate", "--kind", "poem"], "--kind"),
    ):
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and reason in err[0], err
