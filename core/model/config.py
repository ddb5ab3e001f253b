"""`ModelsConfig`: the settings of ``python -m core models`` (prepare the embedded model, or
describe one), whose model, device and dtype fields `ScoreConfig` takes too. Imports no torch, so
the command line's `--help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from core.config import JobConfig, help_meta

#: `models prepare`: make the embedded model ready offline; `models info`: describe a model.
MODEL_ACTIONS = ("prepare", "info")


@dataclass
class ModelsConfig(JobConfig):
    """Prepare the embedded model cache, or load a model and print what it is (JSON)."""

    COMMAND: ClassVar[str] = "models"
    LABEL: ClassVar[str] = "models"

    action: str = field(
        default="info",
        metadata=help_meta(
            "prepare: make the embedded model ready offline; info: load --model and print it "
            "as JSON",
            positional=True,
            required=True,
            choices=MODEL_ACTIONS,
        ),
    )
    model: str = field(
        default="default",
        metadata=help_meta(
            "'default' (embedded SmolLM2-135M-Instruct), a Hugging Face id, a local folder or "
            "a .gguf file",
            metavar="MODEL",
        ),
    )
    device: str = field(
        default="auto",
        metadata=help_meta("auto (CUDA > MPS > CPU), cpu, cuda, mps", metavar="DEVICE"),
    )
    dtype: str = field(
        default="auto",
        metadata=help_meta(
            "auto (bf16 on CUDA, else fp32), float32, bfloat16, float16", metavar="DTYPE"
        ),
    )
