"""Training data and trainer (tiny model, a handful of examples): labels come from the mask,
masked positions add nothing to the loss, nothing is dropped silently, configs round-trip
through the CLI command the Train page shows."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.cli import build_parser
from core.data.sources import load_source
from core.errors import LensError
from core.jobs.runfiles import read_metrics
from core.masking.export import export_masked_dataset
from core.masking.rules import compute_masks
from core.model.encoding import encode_pair
from core.model.loading import load_model
from core.scoring.score import score_examples
from core.training.config import TrainConfig
from core.training.data import IGNORE_INDEX, build_training_data
from core.training.trainer import build_trainer, last_complete_checkpoint, run_training
from tests.factories import TRAIN_ROWS as ROWS
from tests.factories import tiny_config


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def lm(tiny_model_dir):
    """A fresh tiny model per test (training changes weights)."""
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


def test_gt_labels_are_the_response_ids_and_prompt_is_ignored(lm, tiny_model_dir, data_file):
    data = build_training_data(tiny_config(tiny_model_dir, data_file), lm)
    assert [r["id"] for r in data.rows] == [r["id"] for r in ROWS]
    for row, src in zip(data.rows, ROWS, strict=True):
        enc = encode_pair(lm.tokenizer, src["prompt"], src["response"], max_length=64)
        assert row["input_ids"] == enc.input_ids
        assert row["labels"][: enc.response_start] == [IGNORE_INDEX] * enc.response_start
        assert row["labels"][enc.response_start :] == enc.input_ids[enc.response_start :]
    assert data.n_trainable_tokens == data.n_response_tokens > 0
    assert data.n_fully_masked == 0


def test_stm_labels_follow_the_mask_of_the_original_model(lm, tiny_model_dir, data_file):
    config = tiny_config(tiny_model_dir, data_file, method="stm", tau=None, target_share=0.5)
    data = build_training_data(config, lm)
    examples = load_source(data=str(data_file), id_col="id").examples
    run = score_examples(lm, examples)  # same model, untouched weights
    scored = run.examples
    masks = compute_masks(run.scores, config.mask_config()).masks
    n_masked = 0
    for row, rec, mask in zip(data.rows, scored, masks, strict=True):
        response = np.asarray(row["labels"][rec.response_start :])
        assert (response == IGNORE_INDEX).tolist() == mask.tolist()
        assert row["labels"][: rec.response_start] == [IGNORE_INDEX] * rec.response_start
        n_masked += int(mask.sum())
    assert 0 < n_masked < data.n_response_tokens
    assert data.n_trainable_tokens == data.n_response_tokens - n_masked
    assert abs(data.masked_share - 0.5) < 0.1


def test_labels_sha256_names_the_rows_and_their_mask(lm, tiny_model_dir, data_file):
    config = tiny_config(tiny_model_dir, data_file, method="stm", tau=None, target_share=0.5)
    stm = build_training_data(config, lm)
    again = build_training_data(config, lm)
    gt = build_training_data(replace(config, method="gt"), lm)
    assert [r["input_ids"] for r in stm.rows] == [r["input_ids"] for r in gt.rows]
    assert stm.labels_sha256 == again.labels_sha256 == stm.summary()["labels_sha256"]
    assert len(stm.labels_sha256) == 64 and stm.labels_sha256 != gt.labels_sha256
    row = next(r for r in stm.rows if any(t != IGNORE_INDEX for t in r["labels"]))
    k = next(i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX)
    row["labels"][k] = IGNORE_INDEX  # one more masked token: another digest
    assert stm.labels_sha256 != again.labels_sha256


def test_fully_masked_examples_are_counted_and_kept(lm, tiny_model_dir, data_file, tmp_path):
    # A random tiny model finds every token surprising: tau = 2.5 masks everything.
    config = tiny_config(tiny_model_dir, data_file, method="stm", tau=2.5)
    trainer, data = build_trainer(config, tmp_path / "run", lm=lm)
    assert data.n_fully_masked == len(ROWS)
    assert sorted(data.fully_masked_ids) == sorted(r["id"] for r in ROWS)
    assert len(trainer.train_dataset) == len(ROWS)  # not dropped by TRL either
    assert "6 examples have no trainable token" in data.describe()


def _manual_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the positions whose label is not -100."""
    keep = labels[:, 1:] != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return -(picked[keep]).mean().item()


def test_masked_positions_contribute_nothing_to_the_loss(lm, tiny_model_dir, data_file, tmp_path):
    config = tiny_config(tiny_model_dir, data_file, method="stm", tau=None, target_share=0.4)
    trainer, data = build_trainer(config, tmp_path / "run", lm=lm)
    batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")} for r in data.rows])
    model = trainer.model
    model.eval()
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert trainer_loss == pytest.approx(_manual_loss(logits, batch["labels"]), rel=1e-5)
    # The same sequences with every response token trained give another loss, so the
    # comparison above would catch masked tokens leaking into the loss.
    gt = build_training_data(replace(config, method="gt"), lm)
    assert [r["input_ids"] for r in gt.rows] == [r["input_ids"] for r in data.rows]
    gt_batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "labels")} for r in gt.rows])
    assert abs(_manual_loss(logits, gt_batch["labels"]) - trainer_loss) > 1e-3


def test_cli_command_reproduces_the_config():
    config = TrainConfig.from_preset(
        "cpu-quick",
        method="random",
        tau=3.0,
        finetune="dora",
        report_to=["tensorboard"],
        save_every=5,
        gradient_checkpointing=True,
        data="/tmp/my data.jsonl",
        task=None,
    )
    command = config.command()
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "core", "train"]
    args = build_parser().parse_args(argv[3:])
    assert TrainConfig.from_args(args) == config
    # only what differs from the preset is spelled out
    assert "--learning-rate" not in command and "--preset cpu-quick" in command


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "cpu-quick", "method": "stm", "tau": 3.0}))
    args = build_parser().parse_args(["train", "--config", str(path), "--tau", "2.0"])
    config = TrainConfig.from_args(args)
    assert (config.preset, config.method, config.tau) == ("cpu-quick", "stm", 2.0)
    assert config.limit == TrainConfig.from_preset("cpu-quick").limit


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "magic"}, "Unknown method"),
        ({"tau": -1.0, "method": "stm"}, "tau must be"),
        ({"data": "x.jsonl"}, "exactly one training data source"),
        ({"learning_rate": 0}, "learning_rate must be"),
        ({"report_to": ["neptune"]}, "Unknown report_to"),
    ],
)
def test_bad_settings_give_one_line_errors(overrides, message):
    with pytest.raises(LensError, match=message):
        TrainConfig.from_preset("paper", **overrides)
    with pytest.raises(LensError, match="Unknown training setting"):
        TrainConfig.from_dict({"learning_rte": 1e-4})


def test_last_complete_checkpoint_skips_a_half_written_one(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_masked_export_and_generated_set_are_training_sources(
    lm, tiny_model_dir, data_file, tmp_path
):
    examples = load_source(data=str(data_file), id_col="id").examples
    run = score_examples(lm, examples, max_length=64)
    scored = run.examples
    result = compute_masks(run.scores, TrainConfig(task=None, data="x", method="stm").mask_config())
    export = export_masked_dataset(run.scores, result, tmp_path / "export")
    data = build_training_data(tiny_config(tiny_model_dir, export), lm)
    assert [r["labels"] for r in data.rows] == [
        [IGNORE_INDEX] * s.response_start + np.where(m, IGNORE_INDEX, s.response_token_ids).tolist()
        for s, m in zip(scored, result.masks, strict=True)
    ]
    with pytest.raises(LensError, match="masked export"):
        build_training_data(tiny_config(tiny_model_dir, export, method="stm"), lm)

    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "manifest.json").write_text(json.dumps({"kind": "self_output", "examples": "ex.jsonl"}))
    (gen / "ex.jsonl").write_text(json.dumps({"id": "a", "prompt": "Hi", "response": "Hello."}))
    data = build_training_data(tiny_config(tiny_model_dir, gen), lm)
    assert [r["id"] for r in data.rows] == ["a"]


def test_run_training_writes_the_run_folder_and_calls_extra_callbacks(
    tiny_model_dir, data_file, tmp_path
):
    from transformers import TrainerCallback

    steps = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    run = tmp_path / "run"
    config = tiny_config(tiny_model_dir, data_file, max_steps=2, save_every=1)
    summary = run_training(config, run, callbacks=[Recorder()])
    assert steps == [1, 2]
    assert summary["final_step"] == 2 and summary["data"]["n_examples"] == len(ROWS)
    assert json.loads((run / "summary.json").read_text())["final_step"] == 2
    assert (run / "adapter" / "adapter_config.json").is_file()
    kinds = [r["kind"] for r in read_metrics(run)]
    assert kinds[0] == "data" and kinds[1] == "start" and kinds[-1] == "done"
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["loss"] > 0 and "lr" in r and "epoch" in r for r in train)
    with pytest.raises(LensError, match="different config"):
        run_training(tiny_config(tiny_model_dir, data_file, max_steps=3), run)
