"""Token losses (issue #21) on the tiny model: every loss's per-token terms and gradient equal a
naive implementation from full logits, dft is TRL's own loss_type="dft", the KL is 0 at a fresh
LoRA adapter, weights of 1 reproduce nll bit for bit, bad settings are one line each (config and
CLI), old run configs still load as nll, and a short run with each loss logs its weights."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from trl import SFTConfig, SFTTrainer

from core.cli import build_parser, main
from core.errors import LensError
from core.jobs.metrics import TrainRecord, of_kind
from core.jobs.runfiles import read_records
from core.model.loading import load_model
from core.training import losses as L
from core.training import trainer as trainer_module
from core.training.config import LOSSES, TrainConfig
from core.training.trainer import build_trainer, frozen_base_copy, run_training
from tests.factories import loss_config, loss_trainer, write_train_rows

ROOT = Path(__file__).resolve().parents[1]
OLD_RUN = ROOT / "tests" / "data" / "runs" / "old-stm-run"
TOL = 1e-5


@pytest.fixture
def data_file(tmp_path):
    return write_train_rows(tmp_path / "train.jsonl")


tiny_config = loss_config
setup = loss_trainer


# --------------------------------------------------------------------------- naive reference


def naive_per_token(trainer, batch, spec: L.TokenLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, label mask) from the model's full logits, written out directly, in
    float64 (float32's log-softmax over 49k logits is itself off by ~5e-5; TRL's fused kernel
    is within 1e-6 of the float64 value)."""
    model = trainer.model
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    target = labels[:, 1:]
    mask = target != -100
    index = target.clamp(min=0).unsqueeze(-1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].double()
    log_p = torch.log_softmax(logits, dim=-1)
    lp = log_p.gather(-1, index).squeeze(-1)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].double()
    model.train()
    log_b = torch.log_softmax(base_logits, dim=-1)
    blp = log_b.gather(-1, index).squeeze(-1)
    nll = -lp
    if spec.name == "nll":
        per = nll
    elif spec.name == "soft_stm":
        per = torch.exp(blp / spec.temperature) * nll
    elif spec.name in ("dft", "asft"):
        per = lp.detach().exp() * nll
    elif spec.name == "eaft":
        top = logits.detach().topk(spec.eaft_k, dim=-1).values
        q = torch.softmax(top, dim=-1)
        entropy = -(q * torch.log(q)).sum(-1)
        per = (entropy / math.log(spec.eaft_k)) ** spec.eaft_alpha * nll
    else:
        per = nll
    if spec.has_kl:
        if spec.kl_estimator == "full":
            kl = (log_b.exp() * (log_b - log_p)).sum(-1)
        else:
            r = blp - lp
            kl = torch.exp(r) - 1 - r
        per = per + spec.kl_coef * kl
    return per.masked_fill(~mask, 0.0), mask


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Within 1e-5, and within 1e-4 of the reference's own size (tiny gradients too)."""
    diff = (a.double() - b.double()).abs().max().item()
    scale = b.abs().max().item()
    assert diff <= TOL, f"{what}: differs by {diff:.3g}"
    assert diff <= 1e-4 * scale + 1e-9, f"{what}: differs by {diff:.3g} of {scale:.3g}"


CASES = {
    "nll": {},
    "soft_stm": {"loss_temperature": 2.0},
    "dft": {},
    "eaft": {"eaft_alpha": 1.5, "eaft_k": 20},
    "kl": {"kl_beta": 0.5},
    "kl-k3": {"kl_beta": 0.5, "kl_estimator": "k3"},
    "asft": {"asft_alpha": 0.5},
    "stm+kl": {"method": "stm", "tau": None, "target_share": 0.3, "kl_beta": 0.5},
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_token_loss_and_gradient_equal_a_naive_implementation(
    case, tmp_path, fitted_model_dir, data_file
):
    loss = case.split("-")[0].split("+")[-1]
    trainer, batch = setup(tmp_path, fitted_model_dir, data_file, loss=loss, **CASES[case])
    spec = trainer.token_loss
    model = trainer.model
    naive, mask = naive_per_token(trainer, batch, spec)
    if case == "stm+kl":
        assert 0 < mask.sum() < (batch["attention_mask"][:, 1:] > 0).sum()  # the mask is in
    if spec.in_trl:  # TRL computes the loss; its per-token log-probs are what it sums
        with trainer_module._caught_output(model) as caught:
            loss_value = trainer.compute_loss(model, dict(batch))
        out = caught["output"]
        weights = L.dft_weights(out.log_probs) if loss == "dft" else 1.0
        assert_close(weights * -out.log_probs, naive, f"{case} per-token loss")
    else:
        terms = trainer.token_terms(model, dict(batch))
        assert torch.equal(terms.mask, mask)
        assert_close(terms.per_token, naive, f"{case} per-token loss")
        loss_value = trainer.compute_loss(model, dict(batch))
    n = mask.sum()
    assert_close(loss_value.detach(), naive.sum().detach() / n, f"{case} loss")
    model.zero_grad()
    loss_value.backward()
    ours = grads(model)
    model.zero_grad()
    (naive.sum() / n).backward()
    reference = grads(model)
    assert ours.keys() == reference.keys() and ours
    for name in reference:
        assert_close(ours[name], reference[name], f"{case} gradient of {name}")
    if loss in ("dft", "asft", "eaft", "soft_stm"):  # the fitted model spreads the weights
        w = trainer.weight_log.take()
        assert 0.05 < w["weight_mean"] < 0.95 and sum(c > 0 for c in w["weight_hist"]) >= 3, w


def test_dft_is_trls_own_loss_type_dft(tmp_path, fitted_model_dir, data_file):
    trainer, batch = setup(tmp_path, fitted_model_dir, data_file, loss="dft")
    assert trainer.args.loss_type == "dft"
    ours = trainer.compute_loss(trainer.model, dict(batch))
    plain = SFTTrainer(
        model=trainer.model,
        args=SFTConfig(
            output_dir=str(tmp_path / "plain"),
            loss_type="dft",
            use_cpu=True,
            report_to="none",
            max_length=None,
            gradient_checkpointing=None,
            activation_checkpointing=False,
            dataset_kwargs={"skip_prepare_dataset": True},
        ),
        train_dataset=trainer.train_dataset,
        processing_class=trainer.processing_class,
    )
    theirs = plain.compute_loss(plain.model, {k: v for k, v in batch.items() if k != "n_response"})
    assert torch.equal(ours, theirs)
    # ASFT's DFT part is computed here, not by TRL: with alpha 0 it is TRL's dft too
    trainer.token_loss = L.TokenLoss(name="asft", asft_alpha=0.0)
    asft = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.allclose(asft, theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ["full", "k3"])
def test_kl_is_zero_at_a_fresh_lora_adapter(estimator, tmp_path, fitted_model_dir, data_file):
    trainer, batch = setup(
        tmp_path, fitted_model_dir, data_file, perturb=False, loss="kl", kl_estimator=estimator
    )
    terms = trainer.token_terms(trainer.model, dict(batch))
    assert terms.kl is not None and terms.mask.sum() > 0
    assert terms.kl.abs().max().item() < 1e-6


def test_weights_of_one_reproduce_nll_exactly(tmp_path, fitted_model_dir, data_file):
    trainer, batch = setup(tmp_path, fitted_model_dir, data_file, loss="nll")
    nll = trainer.compute_loss(trainer.model, dict(batch))
    for spec in (
        L.TokenLoss(name="eaft", eaft_alpha=0.0),  # (H / ln K)^0 = 1
        L.TokenLoss(name="kl", kl_beta=0.0),
        L.TokenLoss(name="kl", kl_beta=0.0, kl_estimator="k3"),
    ):
        trainer.token_loss = spec
        terms = trainer.token_terms(trainer.model, dict(batch))
        assert torch.equal(terms.weights[terms.mask], torch.ones(int(terms.mask.sum())))
        assert torch.equal(trainer.compute_loss(trainer.model, dict(batch)), nll), spec


# --------------------------------------------------------------------------- pure functions


def test_pure_functions_match_their_formulas_and_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 40, generator=gen) * 3).requires_grad_(True)
    base = torch.randn(9, 40, generator=gen) * 3
    target = torch.randint(0, 40, (9,), generator=gen)
    log_p = torch.log_softmax(logits, -1)
    lp = log_p.gather(-1, target[:, None]).squeeze(-1)
    blp = torch.log_softmax(base, -1).gather(-1, target[:, None]).squeeze(-1)
    p_b = torch.softmax(base, -1)
    naive_kl = (p_b * (torch.log(p_b) - log_p)).sum(-1)
    assert_close(L.kl_full(logits, base), naive_kl, "full KL")
    (g1,) = torch.autograd.grad(L.kl_full(logits, base).sum(), logits)
    (g2,) = torch.autograd.grad(naive_kl.sum(), logits)
    assert_close(g1, g2, "full KL gradient")
    r = blp - lp
    assert_close(L.kl_k3(lp, blp), torch.exp(r) - 1 - r, "k3")
    assert (L.kl_k3(lp, blp) >= 0).all() and L.kl_k3(blp, blp).abs().max() == 0
    assert_close(L.soft_stm_weights(blp, 2.0), blp.exp() ** 0.5, "soft STM weight")
    assert_close(L.dft_weights(lp), lp.detach().exp(), "DFT weight")
    top = torch.softmax(logits.detach().topk(5, -1).values, -1)
    h = -(top * top.log()).sum(-1)
    assert_close(L.eaft_weights(logits, 5, 2.0), (h / math.log(5)) ** 2, "EAFT weight")
    assert L.eaft_weights(torch.zeros(3, 40), 5, 1.0).allclose(torch.ones(3))  # uniform top-K
    assert not L.eaft_weights(logits, 5, 1.0).requires_grad
    hidden = torch.randn(9, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)
    assert_close(
        L.topk_entropy_from_hidden(hidden, weight, None, 5, softcap=30.0),
        L.topk_entropy(30.0 * torch.tanh((hidden @ weight.t()) / 30.0), 5),
        "top-K entropy from hidden states",
    )
    terms = L.token_terms(lp, torch.full_like(lp, 0.5), naive_kl, 0.25)
    assert_close(terms, 0.5 * -lp + 0.25 * naive_kl, "terms")
    assert torch.equal(L.token_terms(lp, torch.ones_like(lp)), -lp)


def test_weight_log_pools_a_window_and_counts_masked_tokens_as_weight_zero():
    log = L.WeightLog()
    log.add(torch.tensor([1.0, 0.5, 0.05]), n_response=torch.tensor(6))
    log.add(torch.tensor([1.0]), n_response=2, kl=torch.tensor([0.2]))
    out = log.take()
    assert out["weight_mean"] == pytest.approx(2.55 / 4)
    assert out["weight_share"] == pytest.approx(2.55 / 8)
    assert out["weight_hist"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert out["kl"] == pytest.approx(0.2)
    assert log.take() is None  # the next window starts empty


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"loss": "foo"}, "Unknown loss 'foo' (use nll, soft_stm, dft, eaft, kl, asft)"),
        ({"loss": "soft_stm", "loss_temperature": 0.0}, "loss_temperature"),
        ({"loss": "soft_stm", "loss_temperature": -1.0}, "must be > 0"),
        ({"loss": "eaft", "eaft_alpha": -0.5}, "eaft_alpha must be >= 0"),
        ({"loss": "eaft", "eaft_k": 1}, "eaft_k"),
        ({"loss": "kl", "kl_beta": -1e-5}, "kl_beta must be >= 0"),
        ({"loss": "asft", "asft_alpha": -0.1}, "asft_alpha must be >= 0"),
        ({"loss": "kl", "kl_estimator": "k2"}, "Unknown kl_estimator 'k2'"),
        ({"loss": "dft", "lora_target": "q_proj,lm_head"}, "refuses an adapter there"),
    ],
)
def test_bad_loss_settings_are_one_line_errors(overrides, words):
    with pytest.raises(LensError) as err:
        TrainConfig.from_preset("paper", **overrides)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_bad_loss_flags_are_one_line_cli_errors(capsys):
    for argv, words in (
        (["train", "--loss", "soft_stm", "--loss-temperature", "0"], "loss_temperature"),
        (["train", "--loss", "kl", "--kl-beta", "-1"], "kl_beta must be >= 0"),
        (["train", "--kl-estimator", "exact"], "--kl-estimator"),
    ):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    done = subprocess.run(
        [sys.executable, "-m", "core", "train", "--loss", "foo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "--loss" in lines[0] and "'foo'" in lines[0]


def test_a_kl_loss_on_a_full_fine_tune_whose_base_cannot_be_kept(
    tmp_path, tiny_model_dir, data_file, monkeypatch
):
    monkeypatch.setattr(trainer_module, "free_bytes", lambda device: 1024)
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    for loss in ("kl", "asft", "soft_stm"):
        config = tiny_config(tiny_model_dir, data_file, finetune="full", loss=loss)
        with pytest.raises(LensError) as err:
            build_trainer(config, tmp_path / loss, lm=lm)
        text = str(err.value)
        assert "\n" not in text and f"Loss {loss} needs the base model" in text
        assert "MiB free" in text and "--finetune lora" in text
    # losses without the base need no copy; LoRA needs none either
    assert (
        frozen_base_copy(tiny_config(tiny_model_dir, data_file, finetune="full"), lm.model) is None
    )
    assert frozen_base_copy(tiny_config(tiny_model_dir, data_file, loss="kl"), lm.model) is None


def test_what_trl_refuses_with_dft_is_one_line(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """TRL 1.16 refuses loss_type='dft' with a compute_loss_func and under DeepSpeed sequence
    parallelism (neither is a setting here, but an accelerate config can bring the second):
    its ValueError becomes one line naming the loss."""
    message = (
        "`loss_type='dft'`, `compute_loss_func` and `label_smoothing_factor` are not supported "
        "with DeepSpeed sequence parallelism (Ulysses/ALST): the loss is the model's own "
        "negative log-likelihood, reduced across ranks by `Trainer`."
    )

    def refuse(self, *args, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr(SFTTrainer, "__init__", refuse)
    lm = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    config = tiny_config(tiny_model_dir, data_file, loss="dft")
    with pytest.raises(LensError) as err:
        build_trainer(config, tmp_path / "run", lm=lm)
    text = str(err.value)
    assert text.startswith("TRL refuses loss dft in this setting:") and "\n" not in text
    assert "DeepSpeed sequence parallelism" in text


# --------------------------------------------------------------------------- config and CLI


def test_choices_and_formulas_are_in_the_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{nll,soft_stm,dft,eaft,kl,asft}" in text and "{full,k3}" in text
    for paper in ("2508.05629", "2601.02151", "2509.23753", "2501.14315", "2502.02797"):
        assert paper in text
    assert "p_base(y_t)^(1/T)" in text and "KL(p_base ‖ p)" in text


def test_an_old_run_config_loads_as_nll_with_its_method():
    config = TrainConfig.from_json_file(OLD_RUN / "config.json")
    assert "loss" not in json.loads((OLD_RUN / "config.json").read_text())
    assert (config.method, config.loss, config.tau) == ("stm", "nll", 2.5)
    assert config.describe() == "stm τ=2.5 · lora · mbpp/train[:64] · default"
    assert TrainConfig.from_dict(config.to_dict()) == config
    args = build_parser().parse_args(["train", "--config", str(OLD_RUN / "config.json")])
    assert TrainConfig.from_args(args) == config
    assert "--loss" not in config.command()


def test_the_config_states_what_is_combined():
    config = TrainConfig.from_preset("paper", method="stm", loss="kl", kl_estimator="k3")
    assert config.training_label() == "stm τ=2.5 + kl β=0.1 (k3 KL)"
    assert config.describe().startswith("stm τ=2.5 + kl β=0.1 (k3 KL) · lora")
    assert config.needs_base_model()
    cmd = config.command()
    assert "--loss kl" in cmd and "--kl-estimator k3" in cmd
    again = TrainConfig.from_args(build_parser().parse_args(shlex.split(cmd)[3:]))
    assert again == config
    assert set(LOSSES) == {"nll", "soft_stm", "dft", "eaft", "kl", "asft"}


# --------------------------------------------------------------------------- short runs


RUNS = {
    "nll": {},
    "soft_stm": {"loss_temperature": 2.0},
    "dft": {},
    "eaft": {},
    "kl": {},
    "asft": {},
    "stm+nll": {"method": "stm", "tau": None, "target_share": 0.4},
    "full+kl-k3": {"finetune": "full", "kl_estimator": "k3"},
}


@pytest.mark.parametrize("case", list(RUNS))
def test_a_short_run_with_each_loss_logs_its_weights(case, tmp_path, tiny_model_dir, data_file):
    loss = case.split("-")[0].split("+")[-1]
    config = tiny_config(
        tiny_model_dir, data_file, loss=loss, batch_size=3, max_steps=2, **RUNS[case]
    )
    summary = run_training(config, tmp_path / "run")
    assert summary["final_step"] == 2
    records = of_kind(read_records(tmp_path / "run"), TrainRecord)
    assert [r.step for r in records] == [1, 2]
    for record in records:
        assert record.weight_hist is not None and len(record.weight_hist) == L.WEIGHT_BINS
        assert sum(record.weight_hist) > 0
        assert 0.0 <= record.weight_share <= record.weight_mean <= 1.0
        assert (record.kl is not None) == (loss in ("kl", "asft"))
    if loss == "nll" and config.method == "gt":
        assert all(r.weight_mean == 1.0 == r.weight_share for r in records)
    if case == "stm+nll":  # the hard mask: weight 1 in the loss, 0 on masked response tokens
        assert all(r.weight_mean == 1.0 > r.weight_share for r in records)
    if loss in ("kl", "asft"):
        assert records[0].kl == pytest.approx(0.0, abs=1e-6)  # step 1: the base itself
    log = (tmp_path / "run" / "summary.json").read_text()
    assert json.loads(log)["config"]["loss"] == loss


# --------------------------------------------------------------------------- the Train page


def test_the_train_page_shows_a_losss_parameters_only_when_relevant(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    data = str(ROOT / "tests" / "data" / "sample.jsonl")
    at.query_params.update(
        model=str(tiny_model_dir), device="cpu", kind="file", data=data, limit="4"
    )
    at.run()
    at.switch_page("pages/train.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]

    def command() -> str:
        [code] = [c.value for c in at.code if c.value.startswith("python -m core train")]
        return code

    def labels() -> set[str]:
        return {w.label for w in [*at.number_input, *at.selectbox]}

    box = at.selectbox(key="train_loss")
    assert box.value == "nll" and "--loss" not in command()
    assert "p_base(y_t)^(1/T)" in box.help and "arXiv 2508.05629" in box.help
    assert not labels() & {"T", "β", "α", "K", "KL estimator"}
    box.set_value("kl").run()
    assert {"β", "KL estimator"} <= labels() and "T" not in labels()
    at.number_input(key="train_kl_beta").set_value(0.5).run()
    config = TrainConfig.from_args(build_parser().parse_args(shlex.split(command())[3:]))
    assert (config.loss, config.kl_beta, config.kl_estimator) == ("kl", 0.5, "full")
    at.selectbox(key="train_loss").set_value("soft_stm").run()
    assert "T" in labels() and "β" not in labels()
    at.number_input(key="train_loss_temperature").set_value(0.0).run()
    assert any("loss_temperature" in e.value for e in at.error)


def test_the_done_line_compares_the_first_and_last_steps_without_overlap():
    """ "loss a -> b" in the job's done line and on the Train page: the mean of the first and of
    the last (up to 3) logged steps, never the same steps on both sides (a 2-step run read
    "1.53 -> 1.53" while its steps went 1.40 -> 1.66)."""
    _loss_summary = trainer_module._loss_summary

    def records(*losses: float) -> list[dict]:
        return [{"kind": "train", "step": i + 1, "loss": x} for i, x in enumerate(losses)]

    two = _loss_summary(records(1.4, 1.66))
    assert (two["train_loss_first"], two["train_loss_last"]) == (1.4, 1.66)
    eight = _loss_summary(records(8, 7, 6, 5, 4, 3, 2, 1))
    assert (eight["train_loss_first"], eight["train_loss_last"]) == (7, 2)
    one = _loss_summary(records(1.5))
    assert one["train_loss_first"] == one["train_loss_last"] == 1.5
