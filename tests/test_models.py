"""Model loading: sources, errors a user would hit, device/dtype choice, one-slot eviction."""

import gc
import json
import weakref

import pytest
import torch

from core.errors import ModelLoadError
from core.model.loading import ModelSlot, load_model, resolve_device, resolve_dtype


def test_local_folder_loads_with_fingerprint_and_context(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.fingerprint.startswith("local:")
    assert lm.max_length == 256
    assert lm.dtype == torch.float32
    assert not lm.template_is_fallback and lm.warnings == []


def test_unknown_local_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Unknown model") as err:
        load_model(str(tmp_path / "missing" / "model.bin"))
    assert "\n" not in str(err.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_id_without_network_fails_fast_with_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model("some-org/some-model-that-is-not-cached")


def test_non_causal_model_is_rejected(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_model_without_chat_template_falls_back_with_warning(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    lm = load_model(str(folder), device="cpu")
    assert lm.template_is_fallback
    assert "no chat template" in lm.warnings[0]


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            resolve_device("cuda")


def test_model_slot_evicts_previous_model(tiny_model_dir):
    slot = ModelSlot()
    first = slot.get(str(tiny_model_dir), device="cpu", dtype="float32")
    assert slot.get(str(tiny_model_dir), device="cpu", dtype="float32") is first
    ref = weakref.ref(first.model)
    del first
    second = slot.get(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    gc.collect()
    assert ref() is None, "the previous model must be freed when another is loaded"
    assert second.dtype == torch.bfloat16
    slot.clear()
    assert slot.current is None
