"""One mask vocabulary (`core.masking.config.MaskConfig`) for `train`, `mask` and the Masking
studio; `score` and `mask` as `JobConfig`s. What users already have keeps working: a run
folder's flat config.json, `train --method stm --tau 2.5`, `mask --tau/--share/--seed`, and
the page's old score command; bad values are one-line errors."""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import fields
from pathlib import Path

import pytest

from core.cli import build_parser, main
from core.config import field_default
from core.data.records import ScoredExample
from core.errors import LensError
from core.masking import DEFAULT_TAU
from core.masking.config import (
    DEFAULT_K_PERCENT,
    METHOD_MODES,
    METHODS,
    MODES,
    PERCENTILE_RULES,
    MaskCommandConfig,
    MaskConfig,
)
from core.masking.export import load_masked_dataset
from core.scoring.config import ScoreConfig
from core.study.runs import load_run
from core.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
OLD_RUN = ROOT / "tests" / "data" / "runs" / "old-stm-run"
#: TrainConfig's mask fields (the names every run's config.json has) -> MaskConfig's
TRAIN_MASK_FIELDS = {
    "tau": "tau",
    "target_share": "target_share",
    "k_percent": "k_percent",
    "percentile_rule": "percentile_rule",
    "mask_seed": "seed",
}


def _meta(cls: type, name: str) -> dict:
    return dict(next(f for f in fields(cls) if f.name == name).metadata)


def _exit(argv: list[str]) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        return exc.code


def _one_line_error(capsys, argv: list[str], reason: str) -> None:
    assert _exit(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and reason in err[0], (argv, err)


# --------------------------------------------------------------------------- one vocabulary


def test_train_and_mask_declare_their_mask_fields_from_mask_config():
    for train_name, name in TRAIN_MASK_FIELDS.items():
        assert _meta(TrainConfig, train_name) == _meta(MaskConfig, name), train_name
        assert field_default(TrainConfig, train_name) == field_default(MaskConfig, name)
    for name in ("mode", "tau", "k_percent", "percentile_rule", "seed"):
        assert _meta(MaskCommandConfig, name) == _meta(MaskConfig, name), name
        assert field_default(MaskCommandConfig, name) == field_default(MaskConfig, name)
    assert (
        _meta(MaskCommandConfig, "target_share")["help"]
        == _meta(MaskConfig, "target_share")["help"]
    )
    assert field_default(MaskConfig, "tau") == DEFAULT_TAU
    assert field_default(MaskConfig, "k_percent") == DEFAULT_K_PERCENT
    # every training method names a mask mode, gt none
    assert METHODS == ("gt", "stm", "random", "low", "percentile")
    assert METHOD_MODES["gt"] is None
    assert {m for m in METHOD_MODES.values() if m} == set(MODES)
    assert _meta(TrainConfig, "method")["choices"] == METHODS
    assert _meta(MaskConfig, "mode")["choices"] == MODES
    assert _meta(MaskConfig, "percentile_rule")["choices"] == PERCENTILE_RULES


def test_a_train_config_masks_as_the_mask_command_does():
    """`train --method M ...` and `mask --mode METHOD_MODES[M] ...` give the same MaskConfig."""
    cases = [
        ({"method": "stm", "tau": 3.0}, ["--mode", "high", "--tau", "3.0"]),
        ({"method": "low", "tau": 1.5}, ["--mode", "low", "--tau", "1.5"]),
        (
            {"method": "random", "tau": None, "target_share": 0.2, "mask_seed": 4},
            ["--mode", "random", "--share", "0.2", "--seed", "4"],
        ),
        (
            {"method": "percentile", "k_percent": 30.0, "percentile_rule": "random"},
            ["--mode", "percentile", "--k-percent", "30", "--percentile-rule", "random"],
        ),
    ]
    for train, flags in cases:
        config = TrainConfig.from_preset("paper", **train)
        args = build_parser().parse_args(["mask", "--scores", "s", "--out", "o", *flags])
        assert config.mask_config() == MaskCommandConfig.from_args(args).mask_config(), train


@pytest.mark.parametrize(
    "command,choices",
    [
        ("train", ["{gt,stm,random,low,percentile}", "{top,random,bottom}", "{lora,dora,full}"]),
        ("mask", ["{high,low,random,percentile}", "{top,random,bottom}", "--share"]),
        ("score", ["{prompt,response_only}", "--hub-dataset", "--no-cache"]),
    ],
)
def test_choices_are_in_help(command, choices, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    out = capsys.readouterr().out
    for text in choices:
        assert text in out, (command, text)


# --------------------------------------------------------------------------- train: compat


def test_an_old_run_config_json_reads_as_before():
    raw = json.loads((OLD_RUN / "config.json").read_text())
    config = TrainConfig.from_json_file(OLD_RUN / "config.json")
    assert (config.method, config.tau, config.target_share, config.mask_seed) == (
        "stm",
        2.5,
        None,
        2,
    )
    assert config.mask_config() == MaskConfig(mode="high", tau=2.5, seed=2)
    # a config.json written now has the same flat mask keys, so every reader of config dicts
    # (RunView, protocol, sweep, estimates, run tables) reads new runs as it reads old ones
    written = config.to_dict()
    for key in ("method", *TRAIN_MASK_FIELDS):
        assert written[key] == raw[key], key
    run = load_run(OLD_RUN)
    assert (run.method, run.config["tau"], run.config["mask_seed"]) == ("stm", 2.5, 2)
    assert run.label.startswith("stm τ=2.5")


def test_existing_train_flags_keep_working():
    parse = build_parser().parse_args
    config = TrainConfig.from_args(parse(["train", "--method", "stm", "--tau", "2.5"]))
    assert (config.method, config.tau) == ("stm", 2.5)
    assert config.mask_config() == MaskConfig(mode="high", tau=2.5)
    config = TrainConfig.from_args(
        parse(["train", "--method", "random", "--target-share", "0.2", "--mask-seed", "3"])
    )
    assert config.mask_config() == MaskConfig(mode="random", tau=None, target_share=0.2, seed=3)
    assert config.tau == DEFAULT_TAU  # kept as before: a share is used instead of tau
    config = TrainConfig.from_args(
        parse(
            ["train", "--method", "percentile", "--k-percent", "10", "--percentile-rule", "bottom"]
        )
    )
    assert config.mask_config() == MaskConfig(
        mode="percentile", k_percent=10, percentile_rule="bottom"
    )
    assert TrainConfig.from_args(parse(shlex.split(config.command())[3:])) == config


def test_bad_train_mask_values_are_one_line_errors(capsys):
    train = ["train", "--task", "mbpp", "--limit", "4", "--max-steps", "1"]
    _one_line_error(capsys, [*train, "--method", "sideways"], "argument --method: invalid choice")
    _one_line_error(capsys, [*train, "--method", "stm", "--tau", "-1"], "tau must be")
    _one_line_error(capsys, [*train, "--method", "stm", "--tau", "x"], "argument --tau")
    _one_line_error(
        capsys, [*train, "--method", "percentile", "--k-percent", "150"], "k_percent must be"
    )
    _one_line_error(capsys, [*train, "--percentile-rule", "middle"], "invalid choice")
    with pytest.raises(LensError, match="Unknown method 'sideways'"):
        TrainConfig.from_dict({"method": "sideways"})


# --------------------------------------------------------------------------- mask: compat


def _scored(ex_id: str, ppls: list[float]) -> ScoredExample:
    n = len(ppls)
    token_ids = [1, 2, 3] + [1000 + i for i in range(n)]
    return ScoredExample(
        id=ex_id,
        prompt=f"prompt {ex_id}",
        response=f"response {ex_id}",
        convention="prompt",
        token_ids=token_ids,
        tokens=[f"t{t}" for t in token_ids],
        response_start=3,
        logprob=[-math.log(p) for p in ppls],
        rank=[1] * n,
        top_ids=[[] for _ in range(n)],
        top_tokens=[[] for _ in range(n)],
        top_logprobs=[[] for _ in range(n)],
    )


@pytest.fixture
def scores(tmp_path) -> Path:
    rows = [
        _scored("a", [1.0, 3.0, 1.2, 8.0]),
        _scored("b", [5.0, 6.0]),
        _scored("c", [1.0, 2.0, 2.5, 4.0, 1.1]),
    ]
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(ex.to_json_row()) + "\n" for ex in rows))
    return path


def _mask(scores: Path, out: Path, *flags: str) -> dict:
    assert main(["mask", "--scores", str(scores), *flags, "--out", str(out)]) == 0
    return load_masked_dataset(out)[1]


def test_existing_mask_commands_keep_working(scores, tmp_path):
    m = _mask(scores, tmp_path / "tau", "--tau", "2.5", "--mode", "high")
    assert (m["mode"], m["tau"], m["n_masked"]) == ("high", 2.5, 5)
    # no --tau and no --share: the dataclass default (once a patch in main())
    assert _mask(scores, tmp_path / "default")["tau"] == DEFAULT_TAU
    share = ["--mode", "random", "--share", "0.5", "--seed", "1"]
    m = _mask(scores, tmp_path / "share", *share)
    assert (m["mode"], m["target_share"]) == ("random", 0.5)
    # --share is the old spelling of --target-share: the same set
    _mask(scores, tmp_path / "again", "--mode", "random", "--target-share", "0.5", "--seed", "1")
    masked = [tmp_path / name / "masked.jsonl" for name in ("share", "again")]
    assert masked[0].read_bytes() == masked[1].read_bytes()
    bottom = ["--mode", "percentile", "--k-percent", "50", "--percentile-rule", "bottom"]
    m = _mask(scores, tmp_path / "pct", *bottom)
    assert (m["tau"], m["k_percent"], m["percentile_rule"]) == (None, 50, "bottom")
    # --mode percentile without --k-percent: MaskConfig's k (once an error)
    m = _mask(scores, tmp_path / "pct20", "--mode", "percentile")
    assert m["k_percent"] == DEFAULT_K_PERCENT
    again = ["mask", "--scores", str(scores), "--out", str(tmp_path / "tau"), "--overwrite"]
    assert main(again) == 0


@pytest.mark.parametrize(
    "flags,reason",
    [
        (["--tau", "2.5", "--share", "0.2"], "not both"),
        (["--mode", "percentile", "--tau", "2"], "do not apply"),
        (["--mode", "percentile", "--share", "0.2"], "do not apply"),
        (["--k-percent", "20"], "only applies"),
        (["--mode", "sideways"], "argument --mode: invalid choice"),
        (["--percentile-rule", "middle"], "argument --percentile-rule: invalid choice"),
        (["--tau", "-1"], "tau must be"),
        (["--tau", "x"], "argument --tau"),
        (["--share", "1.5"], "target share must be between 0 and 1"),
        (["--mode", "percentile", "--k-percent", "101"], "k_percent must be"),
        (["--mode", "random", "--seed", "-1"], "seed must be >= 0"),
    ],
)
def test_bad_mask_values_are_one_line_errors(scores, tmp_path, capsys, flags, reason):
    out = tmp_path / "o"
    _one_line_error(capsys, ["mask", "--scores", str(scores), *flags, "--out", str(out)], reason)
    assert not out.exists()


def test_mask_needs_its_files(capsys, tmp_path):
    _one_line_error(capsys, ["mask", "--out", str(tmp_path / "o")], "--scores")
    with pytest.raises(LensError, match="Give --out"):
        MaskCommandConfig(scores="s.jsonl")


def test_the_studio_mask_command_parses_back_to_its_mask():
    masks = [
        MaskConfig(),
        MaskConfig(mode="low", tau=1.7),
        MaskConfig(mode="random", tau=None, target_share=0.25, seed=5),
        MaskConfig(mode="percentile", percentile_rule="random", k_percent=12.5, seed=2),
        MaskConfig(mode="percentile", percentile_rule="top"),
    ]
    for mask in masks:
        config = MaskCommandConfig.from_mask(mask, scores="scores.jsonl", out="/tmp/my set")
        command = config.command()
        assert "--share" not in shlex.split(command)  # the one vocabulary's flag is written
        args = build_parser().parse_args(shlex.split(command)[3:])
        assert MaskCommandConfig.from_args(args).mask_config() == mask, command
        # the command says where it masks even at the defaults
        assert ("--k-percent" if mask.mode == "percentile" else "--") in command
        if mask.uses_tau and mask.target_share is None:
            assert f"--tau {mask.tau}" in command


# --------------------------------------------------------------------------- score


def test_the_old_page_score_command_parses_to_the_page_config():
    old = "python -m core score --model default --task mbpp --split train --limit 48 --out scores.jsonl"
    config = ScoreConfig.from_args(build_parser().parse_args(shlex.split(old)[3:]))
    page = ScoreConfig(task="mbpp", split="train", limit=48, out="scores.jsonl")
    assert config == page and page.command() == old
    data = ScoreConfig(
        data="/x/my data.jsonl", prompt_col="q", id_col="id", device="cpu", limit=8, out="s.jsonl"
    )
    again = ScoreConfig.from_args(build_parser().parse_args(shlex.split(data.command())[3:]))
    assert again == data
    assert again.source_kwargs()["hub"] is None and again.cache


def test_score_flags_keep_working_and_bad_ones_are_one_line(capsys, tmp_path):
    argv = ["score", "--data", "d.jsonl", "--no-cache", "--top-k", "3", "--out", "o.jsonl"]
    config = ScoreConfig.from_args(build_parser().parse_args(argv))
    assert (config.cache, config.top_k, config.data, config.task) == (False, 3, "d.jsonl", None)
    out = str(tmp_path / "o.jsonl")
    _one_line_error(capsys, ["score", "--out", out], "Give exactly one data source")
    _one_line_error(capsys, ["score", "--task", "mbpp", "--data", "d", "--out", out], "exactly one")
    _one_line_error(capsys, ["score", "--task", "mbpp"], "--out")
    _one_line_error(
        capsys, ["score", "--task", "mbpp", "--convention", "x", "--out", out], "--convention"
    )
    assert not Path(out).exists()
