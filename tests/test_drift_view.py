"""The "Where it forgot" computations (core/study/drift.py) and builders (core/viz/drift.py):
the on-demand top-k against the saved round and a naive reference, items and aggregates on
hand-made details, the weights a round evaluated, the training data's high-perplexity share,
and the token view's HTML and charts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.data.records import Example
from core.errors import LensError
from core.eval.drift import score_drift
from core.eval.probes import Probe, load_probe
from core.eval.scorers import SuiteResult, TaskResult
from core.jobs.runfiles import append_metric, eval_round_path
from core.model.encoding import encode_prompt
from core.study import drift as sd
from core.study import drift_tokens as sdt
from core.study.runs import load_run
from core.viz import drift as vd
from tests import eval_runs
from tests.factories import (
    DRIFT_PROMPTS,
    drift_task_result,
    hand_details,
    lora,
    make_drift_run,
    save_round,
)

# --------------------------------------------------------------------------- top-k


def test_token_alternatives_agree_with_the_round_and_a_naive_reference(tiny_lm):
    tuned = lora(tiny_lm, trained=True)
    probe = Probe("t", tuple(Example(f"p/{i}", p, "") for i, p in enumerate(DRIFT_PROMPTS)))
    _, details, _ = score_drift(tuned, probe, max_new_tokens=10, is_base=False)
    for prompt, detail in zip(DRIFT_PROMPTS, details, strict=True):
        prefix = encode_prompt(tuned.tokenizer, prompt)
        alt = sdt.token_alternatives(tuned, prefix, detail["ids"], k=5)
        # the same KL as the saved round, and the probability ratio its Δ log-prob gives
        np.testing.assert_allclose(alt.kl, detail["token_kl"], atol=1e-5)
        np.testing.assert_allclose(np.log(alt.tuned_p / alt.base_p), detail["token_dlp"], atol=1e-5)
        # the answer is the base's greedy answer: its top-1 at every position
        assert (alt.base_ids[:, 0] == np.asarray(detail["ids"])).all()
        # top-k against the full distributions, computed naively
        ids = torch.tensor([prefix + detail["ids"]])
        with torch.no_grad():
            t_logits = tuned.model(input_ids=ids).logits[0, len(prefix) - 1 : -1].double()
            with tuned.model.disable_adapter():
                b_logits = tuned.model(input_ids=ids).logits[0, len(prefix) - 1 : -1].double()
        for logits, top_ids, top_p in (
            (b_logits, alt.base_ids, alt.base_probs),
            (t_logits, alt.tuned_ids, alt.tuned_probs),
        ):
            probs = torch.softmax(logits, -1)
            ref = probs.topk(5, -1)
            assert (top_ids == ref.indices.numpy()).all()
            np.testing.assert_allclose(top_p, ref.values.numpy(), rtol=1e-9)
            assert (np.diff(top_p, axis=1) <= 0).all()
        assert alt.k == 5 and alt.base_ids.shape == (len(detail["ids"]), 5)


def test_token_alternatives_of_the_base_itself_and_bad_input(tiny_lm):
    prefix = encode_prompt(tiny_lm.tokenizer, DRIFT_PROMPTS[0])
    same = sdt.token_alternatives(tiny_lm, prefix, [42, 43, 44], is_base=True)
    assert (same.kl == 0).all() and (same.base_ids == same.tuned_ids).all()
    with pytest.raises(LensError, match="no answer tokens"):
        sdt.token_alternatives(tiny_lm, prefix, [], is_base=True)
    with pytest.raises(LensError, match="at least one token"):
        sdt.token_alternatives(tiny_lm, [], [1, 2], is_base=True)
    with pytest.raises(LensError, match="context"):
        sdt.token_alternatives(tiny_lm, prefix, [5] * tiny_lm.max_length, is_base=True)
    with pytest.raises(LensError, match="no adapter to disable"):  # a full fine-tune, no base
        sdt.token_alternatives(tiny_lm, prefix, [42])


def test_the_text_probe_prefix_is_the_one_the_rounds_teacher_force(tiny_lm):
    from core.eval.drift import _text_sequences
    from core.eval.probes import PROBE_TEXT

    probe = load_probe(PROBE_TEXT, n=3)
    seqs, _ = _text_sequences(tiny_lm, probe)
    for seq in seqs:
        ex = probe.items[seq.item]
        answer = seq.enc.input_ids[seq.enc.response_start :]
        assert (
            sdt.prefix_ids(tiny_lm.tokenizer, ex, True, answer)
            == seq.enc.input_ids[: seq.enc.response_start]
        )
    with pytest.raises(LensError, match="tokenizes differently"):
        sdt.prefix_ids(tiny_lm.tokenizer, probe.items[0], True, [1, 2, 3])


def test_item_alternatives_finds_the_rounds_adapter_and_agrees_with_it(tiny_model_dir, tmp_path):
    run = make_drift_run(tmp_path, tiny_model_dir)
    result = sd.load_round(run, 3)
    [task] = sd.drift_tasks(result)
    items, notes = sd.drift_items(task)
    assert notes == [] and len(items) == len(DRIFT_PROMPTS)
    early = []
    sdt.TUNED_SLOT.clear()
    out = sdt.item_alternatives(
        run,
        str(tiny_model_dir),
        3,
        "drift:probe",
        items[1].id,
        device="cpu",
        on_prompt=early.append,
    )
    assert out.prompt == DRIFT_PROMPTS[1] and not out.plain_text
    assert early and early[0].prompt == DRIFT_PROMPTS[1] and early[0].alternatives is None
    assert out.weights == "the final adapter (step 3)"
    assert out.note == ""  # the recomputed KL is the round's
    np.testing.assert_allclose(out.alternatives.kl, items[1].kl, atol=1e-5)
    hovers = out.hovers()
    assert len(hovers) == items[1].tokens and len(hovers[0].base_top) == sd.TOP_K
    assert hovers[0].base_top[0][0] == out.base_texts[0][0]
    # step 0 is the base model: both sides the same, no adapter needed
    base = sdt.item_alternatives(
        run, str(tiny_model_dir), 0, "drift:probe", items[1].id, device="cpu"
    )
    assert base.weights == "the base model (step 0)" and (base.alternatives.kl == 0).all()
    # the alternatives of a round whose weights are not kept: the reason, no top-k
    save_round(run, 2, result.tasks)
    missing = sdt.item_alternatives(run, str(tiny_model_dir), 2, "drift:probe", items[1].id)
    assert missing.alternatives is None and missing.hovers() is None
    assert (
        "keeps no weights of step 2" in missing.note and "final adapter of step 3" in missing.note
    )
    with pytest.raises(LensError, match="no drift task 'nope'"):
        sdt.item_alternatives(run, str(tiny_model_dir), 3, "nope", items[1].id)
    with pytest.raises(LensError, match="no usable item 'x'"):
        sdt.item_alternatives(run, str(tiny_model_dir), 3, "drift:probe", "x")
    sdt.TUNED_SLOT.clear()


def test_round_weights_checkpoint_final_adapter_eval_job_or_why(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-4" / "adapter_config.json").write_text("{}")
    (run / "checkpoints" / "checkpoint-6").mkdir()
    (run / "checkpoints" / "checkpoint-6" / "config.json").write_text("{}")  # a full fine-tune
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"final_step": 8}))
    assert sdt.round_weights(run, 0).kind == "base"
    w4 = sdt.round_weights(run, 4)
    assert (w4.kind, w4.path.name) == ("adapter", "checkpoint-4")
    assert sdt.round_weights(run, 6).kind == "full"
    w8 = sdt.round_weights(run, 8)
    assert (w8.kind, w8.path.name, w8.describe) == (
        "adapter",
        "adapter",
        "the final adapter (step 8)",
    )
    w5 = sdt.round_weights(run, 5)
    assert w5.kind == "" and "checkpoints of step 4, 6" in w5.reason and "step 8" in w5.reason
    job = SuiteResult("s", "fp", "m", str(run / "adapter"), [], 1.0)
    assert sdt.round_weights(tmp_path / "eval-run", 1, job).path == run / "adapter"
    gone = SuiteResult("s", "fp", "m", str(tmp_path / "gone"), [], 1.0)
    assert "is gone" in sdt.round_weights(tmp_path / "eval-run", 1, gone).reason


# --------------------------------------------------------------------------- items, aggregates

#: token id -> text for the hand-made details: a number, a word, a symbol, whitespace
TEXTS = {10: " 42", 11: " the", 12: " +", 13: "\n"}


def texts(ids):
    return [TEXTS[int(i)] for i in ids]


def test_items_table_is_sorted_by_mean_kl_with_agreement_and_dnll():
    task = drift_task_result("ood_drift", "probe:ood", hand_details())
    items, notes = sd.drift_items(task)
    assert notes == []
    table = sd.item_table(items)
    assert table["id"].tolist() == ["a", "c", "b"]  # mean KL 0.4, 0.3, 0.1
    a = table.iloc[0]
    assert a["kl"] == pytest.approx(0.4) and a["tokens"] == 5 and a["kl_max"] == 1.0
    assert a["top1"] == pytest.approx(3 / 5)  # KL < 0.5 "agrees" in the hand-made stats
    assert a["dnll"] == pytest.approx(3 / 5)  # Δ log p -3 in all: Δ NLL +3 over 5 tokens
    assert table.iloc[2]["dnll"] == pytest.approx(-0.1)


def test_aggregates_by_category_position_and_domain_match_hand_counts():
    items, _ = sd.drift_items(drift_task_result("ood_drift", "probe:ood", hand_details()))
    frame = sd.token_frame(items, texts)
    assert len(frame) == 13 and set(frame["category"]) == {"number", "word", "symbol", "whitespace"}
    cats = sd.by_category(frame).set_index("category")
    total = 1.0 + 0.2 + 0.8 + 0.2 + 1.8
    # number: ' 42' in a (KL 1.0) and six in c (0.3 each)
    assert cats.loc["number", "tokens"] == 7
    assert cats.loc["number", "kl"] == pytest.approx(2.8 / 7)
    assert cats.loc["number", "kl_share"] == pytest.approx(2.8 / total)
    assert cats.loc["word", "kl"] == pytest.approx((0.2 + 0.8 + 0.2) / 4)
    assert cats.loc["whitespace", "kl"] == pytest.approx(0.0)
    assert cats["kl_share"].sum() == pytest.approx(1.0)
    assert cats["token_share"].sum() == pytest.approx(1.0)
    for row in cats.itertuples():  # every interval brackets its estimate
        assert row.kl_low <= row.kl + 1e-12 and row.kl <= row.kl_high + 1e-12
        assert row.kl_share_low <= row.kl_share + 1e-12 <= row.kl_share_high + 2e-12
    pos = sd.by_position(frame)
    assert pos["bucket"].tolist() == ["1–4", "5–8"]
    assert pos.iloc[0]["kl"] == pytest.approx((1.0 + 0.2 + 0.0 + 0.0 + 0.2 + 4 * 0.3) / 10)
    assert pos.iloc[1]["kl"] == pytest.approx((0.8 + 0.3 + 0.3) / 3)
    assert pos.iloc[1]["items"] == 2
    dom = sd.by_domain(items).set_index("domain")
    assert dom.loc["arc_easy", "kl"] == pytest.approx(2.2 / 7) and dom.loc["arc_easy", "items"] == 2
    assert dom.loc["gsm8k", "kl"] == pytest.approx(0.3)
    assert pd.isna(dom.loc["gsm8k", "kl_low"])  # one item: no interval, and the reason says so
    assert "too few" in dom.loc["gsm8k", "reason"]
    assert sd.probe_kl(items).estimate == pytest.approx(total / 13)
    assert sd.bucket_label(128, None) == "129+"


def test_bad_items_are_left_out_with_a_note_and_none_usable_is_one_line():
    details = hand_details()
    details[1]["token_kl"] = details[1]["token_kl"][:1]  # does not line up with its ids
    details.append({"id": "d", "ids": [1, 2], "token_kl": [0.1, float("nan")], "token_dlp": [0, 0]})
    details.append("garbage")
    items, notes = sd.drift_items(drift_task_result("ood_drift", "probe:ood", details))
    assert [it.id for it in items] == ["a", "c"]
    assert notes == [
        "3 item(s) of 'ood_drift' left out: their per-token lists are missing or do "
        "not line up (b, d, #4)."
    ]
    old = [
        {k: v for k, v in d.items() if k not in ("token_kl", "token_dlp")} for d in hand_details()
    ]
    with pytest.raises(LensError, match="saved before the per-token view"):
        sd.drift_items(drift_task_result("ood_drift", "probe:ood", old))


def test_rounds_with_drift_and_unreadable_rounds(tmp_path):
    run = tmp_path / "r"
    save_round(run, 0, [drift_task_result("ood_drift", "probe:ood", hand_details())])
    save_round(run, 5, [TaskResult("mbpp", "mbpp", "code_exec", "target", "pass@1", {}, 0, 0.1)])
    eval_round_path(run, 9).write_text("{not json")
    assert sd.drift_steps(run) == [0]
    with pytest.raises(LensError, match="not readable JSON"):
        sd.load_round(run, 9)
    with pytest.raises(LensError, match="no saved evaluation round at step 7"):
        sd.load_round(run, 7)
    assert sd.drift_steps(tmp_path / "nothing") == []


def test_token_texts_and_a_foreign_round(tiny_lm):
    assert sdt.token_texts(tiny_lm.tokenizer, [28, 28]) == tiny_lm.token_texts([28, 28])
    with pytest.raises(LensError, match="outside this tokenizer"):
        sdt.token_texts(tiny_lm.tokenizer, [10**7])
    with pytest.raises(LensError, match="cannot be loaded"):
        sdt.load_tokenizer("/no/such/model-folder-here")


# --------------------------------------------------------------------------- high-ppl share


def _run_with_data(root: Path, run_id: str, method: str, data: dict, model: str = "default"):
    folder = eval_runs.make_eval_run(
        root,
        run_id,
        {0: eval_runs.BASE_DRIFT, 4: eval_runs.later_drift(4)},
        method=method,
        tasks=eval_runs.DRIFT_TASKS,
    )
    append_metric(folder, {"kind": "data", "time": 2.0, "method": method, **data})
    return load_run(folder)


SAME = {"source": "mbpp/train: 50 examples", "n_examples": 50, "n_response_tokens": 4000}


def test_high_ppl_share_from_the_mask_a_twin_run_or_why_not(tmp_path):
    stm = _run_with_data(
        tmp_path, "stm", "stm", {"tau": 2.5, "mask": "high, tau=2.5", "masked_share": 0.21, **SAME}
    )
    rnd = _run_with_data(
        tmp_path,
        "rnd",
        "random",
        {"tau": 2.5, "mask": "random, tau=2.5", "masked_share": 0.21, **SAME},
    )
    gt = _run_with_data(
        tmp_path, "gt", "gt", {"tau": None, "mask": "none", "masked_share": 0.0, **SAME}
    )
    other = _run_with_data(tmp_path, "gt2", "gt", {"mask": "none", **SAME, "n_examples": 60})
    low = _run_with_data(
        tmp_path, "low", "low", {"tau": 2.5, "mask": "low, tau=2.5", "masked_share": 0.5, **SAME}
    )
    explicit = _run_with_data(tmp_path, "x", "gt", {"mask": "none", "high_ppl_share": 0.3})
    runs = [stm, rnd, gt, other, low, explicit]
    s = sd.high_ppl_share(stm, runs)
    assert (s.tau, s.data, s.trained) == (2.5, 0.21, 0.0) and "STM mask" in s.source
    r = sd.high_ppl_share(rnd, runs)
    assert (r.data, r.trained) == (0.21, None)
    g = sd.high_ppl_share(gt, runs)  # borrowed from the STM run on the same data
    assert (g.tau, g.data, g.trained) == (2.5, 0.21, 0.21) and g.source.startswith("run stm")
    o = sd.high_ppl_share(other, runs)  # other data: not borrowed
    assert o.data is None and "does not score its data" in o.reason
    lo = sd.high_ppl_share(low, runs)  # the same data: the same share, whatever it masked
    assert (lo.data, lo.trained) == (0.21, None)
    alone = sd.high_ppl_share(low, [low])
    assert alone.data is None and "records the share it masked" in alone.reason
    e = sd.high_ppl_share(explicit, runs)
    assert (e.data, e.trained) == (0.3, 0.3)  # ground truth trains on every token


def test_the_cross_run_table_reads_the_last_drift_round(tmp_path):
    stm = _run_with_data(
        tmp_path, "stm", "stm", {"tau": 2.5, "mask": "high, tau=2.5", "masked_share": 0.21, **SAME}
    )
    gt = _run_with_data(tmp_path, "gt", "gt", {"mask": "none", **SAME})
    only_base = eval_runs.make_eval_run(
        tmp_path, "base-only", {0: eval_runs.BASE_DRIFT}, tasks=eval_runs.DRIFT_TASKS
    )
    old = eval_runs.make_eval_run(tmp_path, "old", {0: eval_runs.BASE, 4: eval_runs.later(4)})
    runs = [stm, gt, load_run(only_base), load_run(old)]
    table, notes = sd.drift_share_table(runs)
    assert table["run"].tolist() == ["stm", "gt"]
    row = table.set_index("run").loc["gt"]
    expected = np.mean([0.01 * 4 * (1 + i % 4) for i in range(eval_runs.N)])
    assert row["kl"] == pytest.approx(expected) and row["step"] == 4
    assert row["kl_low"] < row["kl"] < row["kl_high"] and row["n"] == eval_runs.N
    assert row["data_share"] == 0.21 and row["trained_share"] == 0.21
    assert any("base-only: only step 0 evaluated" in n for n in notes)
    assert any("old: no drift round" in n for n in notes)
    fig = vd.share_scatter(table, "data", current="stm")
    assert [t.name for t in fig.data] == ["stm", "gt"]
    assert (
        fig.layout.yaxis.range[0] == 0 and fig.layout.xaxis.range[0] < 0 < fig.layout.xaxis.range[1]
    )
    assert "training data" in fig.layout.xaxis.title.text
    trained = vd.share_scatter(table, "trained")
    assert [list(t.x) for t in trained.data] == [[0.0], [21.0]]


# --------------------------------------------------------------------------- the view


def test_the_token_view_colours_tokens_and_hovers_the_top_five():
    tokens, kl, dlp = [" the", "<b>", "\n", " end"], [0.0, 0.5, 2.0, 0.001], [0.0, -1.0, -3.0, 0.2]
    pending = vd.render_drift_tokens(
        tokens,
        kl,
        dlp,
        pending="top-5: computing…",
        facts=[("", "item-1"), ("mean KL", "0.6")],
        prompt="Q?",
    )
    assert len(re.findall(r'class="pl-t[ "]', pending)) == 4 and 'data-kl="2"' in pending
    assert "&lt;b&gt;</span>" in pending  # token text is escaped
    assert "top-5: computing…" in pending and "token KL(base ‖ tuned)" in pending
    assert "prompt · 2 characters" in pending
    # KL 0 is white, the largest is the darkest
    assert "background:#ffffff" in pending
    hover = vd.TokenHover(0.7, 0.2, [(" the", 0.7), (" a", 0.1)], [(" a", 0.5), (" the", 0.2)])
    done = vd.render_drift_tokens(tokens, kl, dlp, hovers=[hover] * 4, mode=vd.DLP)
    assert "base top-2" in done and "tuned top-2" in done and "computing" not in done
    assert "p of this token: base 0.700 → tuned 0.200" in done
    assert "lost" in done and "gained" in done  # the diverging legend
    assert vd.dlp_color(-2.0) == vd.delta_color(2.0, vd.DLP_LIMIT)  # lost confidence: red
    with pytest.raises(ValueError):
        vd.render_drift_tokens(tokens, kl[:2], dlp)
    with pytest.raises(ValueError):
        vd.render_drift_tokens(tokens, kl, dlp, mode="nope")
    assert vd.kl_scale_top([0.01]) == vd.KL_MIN_TOP and vd.kl_scale_top([0.31]) == 0.5
    assert vd.nice_ceiling(3.0) == 5.0 and vd.nice_ceiling(0.2) == 0.2


def test_the_aggregate_charts_have_axis_titles_and_start_at_zero():
    items, _ = sd.drift_items(drift_task_result("ood_drift", "probe:ood", hand_details()))
    frame = sd.token_frame(items, texts)
    figs = [
        vd.category_chart(sd.by_category(frame)),
        vd.category_share_chart(sd.by_category(frame)),
        vd.position_chart(sd.by_position(frame)),
        vd.domain_chart(sd.by_domain(items)),
    ]
    for fig in figs:
        assert fig.layout.yaxis.range[0] == 0
        assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
        assert all(t.error_y.array is not None for t in fig.data if t.name != "share of tokens")
    assert "% of KL" in figs[0].data[0].x[0]
    one = vd.domain_chart(sd.by_domain(items[:1]))
    assert one.layout.meta["notes"] == ["This probe has one domain."]
    empty = sd.token_frame([], texts)
    assert vd.position_chart(sd.by_position(empty)).layout.annotations


def test_an_empty_drift_chart_says_why_and_draws_no_zero_line(tmp_path):
    """The cross-run scatter with no run that has a share: its message, and neither tick labels
    nor a zero line (a vertical line at 0 on the empty chart pointed at nothing)."""
    other = _run_with_data(tmp_path, "gt2", "gt", {"mask": "none", **SAME, "n_examples": 60})
    table, _ = sd.drift_share_table([other])
    fig = vd.share_scatter(table, "trained")
    assert [a.text for a in fig.layout.annotations][-1].startswith("No run has both")
    assert fig.layout.xaxis.zeroline is False and fig.layout.yaxis.zeroline is False
    assert fig.layout.xaxis.showticklabels is False and not fig.layout.shapes
