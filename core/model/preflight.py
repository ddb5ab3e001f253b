"""Checks of a model setting that cost no weights: run before a job exists, so a typo in a
model name, a device this machine lacks or an unknown dtype is one line at once instead of a
registered job that fails after its data is built.

`check_model_setting` reads at most a config.json (and, for a hub id not in the local cache,
opens one socket to see whether the hub can be reached); `core.model.loading.load_model` still
makes every check again when the job loads the model.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import ModelLoadError
from core.model import loading


def check_model_source(name: str) -> None:
    """A one-line `ModelLoadError` when `name` cannot be a model: the embedded model is not
    installed, a folder without config.json or whose config is not a causal LM, a path that
    does not exist, or a hub id that is neither cached nor reachable."""
    if name == loading.DEFAULT_MODEL:
        if not loading.embedded_model_dir().joinpath("config.json").is_file():
            loading.embedded_gguf_path()  # raises when the package is missing
        return
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return  # its header is read when it loads (a broken file is one line there)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"'{name}' is a folder but has no config.json: not a model folder."
            )
        from transformers import AutoConfig

        with loading._unreadable_as(f"Could not read the model folder '{name}'"):
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        loading._check_causal_lm(name, config)
        return
    if path.exists() or not loading._looks_like_hub_id(name):
        raise ModelLoadError(
            f"Unknown model '{name}': not 'default', a local model folder, a .gguf file, "
            "or a Hugging Face id like 'org/name'."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        if not loading._hub_reachable():
            raise ModelLoadError(
                f"'{name}' is not in the local Hugging Face cache and the hub cannot be reached "
                "(no network?). Use 'default' or a local folder."
            ) from None
        return  # fetched when the job loads it (a hub error is one line there)
    loading._check_causal_lm(name, config)


def check_model_setting(name: str, device: str = "auto", dtype: str = "auto") -> None:
    """`check_model_source`, then the device (present on this machine) and the dtype."""
    check_model_source(name)
    resolved = loading.resolve_device(device)
    loading.resolve_dtype(dtype, resolved)
