"""The one place that builds templated ids and the response mask."""

import pytest

from core.errors import LensError
from core.model.encoding import encode_pair, render_generation_prompt
from core.model.loading import FALLBACK_CHAT_TEMPLATE


def test_response_tokens_are_exactly_the_response_plus_end_of_turn(smol_tokenizer):
    enc = encode_pair(smol_tokenizer, "Add two numbers.", "def add(a, b):\n\treturn a + b")
    response_text = smol_tokenizer.decode(enc.input_ids[enc.response_start :])
    assert response_text == "def add(a, b):\n\treturn a + b<|im_end|>"
    prompt_text = smol_tokenizer.decode(enc.input_ids[: enc.response_start])
    assert prompt_text == render_generation_prompt(smol_tokenizer, "Add two numbers.")
    assert enc.response_mask == [0] * enc.response_start + [1] * enc.n_response
    assert not enc.truncated


def test_prompt_ids_match_the_generation_prompt_so_training_and_generation_agree(smol_tokenizer):
    enc = encode_pair(smol_tokenizer, "Say hi", "hi")
    gen_ids = smol_tokenizer(
        render_generation_prompt(smol_tokenizer, "Say hi"), add_special_tokens=False
    )["input_ids"]
    assert enc.input_ids[: enc.response_start] == list(gen_ids)


def test_response_only_convention_drops_the_instruction_but_keeps_response_ids(smol_tokenizer):
    with_prompt = encode_pair(smol_tokenizer, "A long instruction here", "The answer is 4.")
    without = encode_pair(
        smol_tokenizer, "A long instruction here", "The answer is 4.", convention="response_only"
    )
    assert without.response_start < with_prompt.response_start
    assert "instruction" not in smol_tokenizer.decode(without.input_ids)
    assert (
        with_prompt.input_ids[with_prompt.response_start :]
        == without.input_ids[without.response_start :]
    )


def test_overlong_response_is_truncated_and_flagged(smol_tokenizer):
    enc = encode_pair(smol_tokenizer, "Count.", " ".join(str(i) for i in range(500)), max_length=64)
    assert enc.truncated
    assert len(enc.input_ids) == 64
    assert enc.n_response >= 1


def test_overlong_prompt_is_cut_from_the_left_leaving_room_for_the_response(smol_tokenizer):
    enc = encode_pair(smol_tokenizer, "word " * 400, "short answer", max_length=64)
    assert enc.truncated and len(enc.input_ids) <= 64
    assert smol_tokenizer.decode(enc.input_ids[enc.response_start :]).startswith("short answer")


def test_fallback_template_keeps_prompt_a_prefix(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = FALLBACK_CHAT_TEMPLATE
    enc = encode_pair(tok, "What is 2+2?", "4")
    assert tok.decode(enc.input_ids[enc.response_start :]).startswith("4")
    assert "User:" in tok.decode(enc.input_ids[: enc.response_start])


def test_unknown_convention_is_a_clear_error(smol_tokenizer):
    with pytest.raises(LensError, match="convention"):
        encode_pair(smol_tokenizer, "p", "r", convention="bogus")
