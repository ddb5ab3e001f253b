"""Shared fixtures: a tiny randomly initialised llama with the SmolLM2 tokenizer (fast unit
tests), and the real embedded model (integration tests, marked `integration`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.model import loading as models
from tests import leftovers
from tests.factories import (  # noqa: F401 - fixtures for every test module
    fitted_model_dir,
    runs,
    trained_run,
)

# Every process this session starts inherits this id (tests/leftovers.py): how the check below
# finds what a module left running, and nothing of anyone else's.
SESSION = leftovers.new_session_id()
#: Seconds a module's processes get to finish after its last test before they count as left.
LEFTOVER_GRACE_S = 15.0

# Resolved before any test changes PLENS_CACHE_DIR: the dequantized embedded model is shared by
# all tests (it takes ~20 s to build), everything else is cached per test.
SHARED_EMBEDDED_DIR = models.embedded_model_dir()


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The dequantized embedded model folder (created once per machine, then reused)."""
    from core.model.loading import prepare_embedded_model

    return prepare_embedded_model()


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer, 64-wide llama saved as a local model folder with the real tokenizer."""
    from tests.factories import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from core.model.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_lm(embedded_dir):
    from core.model.loading import load_model

    return load_model("default", device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own cache folder, except the embedded model, which is shared."""
    monkeypatch.setenv("PLENS_CACHE_DIR", str(tmp_path / "plens-cache"))
    monkeypatch.setenv("PLENS_EMBEDDED_DIR", str(SHARED_EMBEDDED_DIR))


@pytest.fixture(scope="module", autouse=True)
def _no_process_left_behind(request):
    """Fail the module whose tests (or fixtures: a SLURM cluster, a Ray head, job processes,
    a server) leave a process of this session running once the module is done; the leftovers
    are then stopped, so the next module starts clean."""
    before = set(leftovers.session_processes(SESSION))
    yield
    new = {p: c for p, c in leftovers.session_processes(SESSION).items() if p not in before}
    if not new:
        return
    alive = leftovers.wait_gone(new, LEFTOVER_GRACE_S)
    if not alive:
        return
    left = {p: new[p] or leftovers.command_line(p) for p in sorted(alive)}
    leftovers.stop_processes(alive)
    listed = "; ".join(f"{pid} {cmd[:160]}" for pid, cmd in left.items())
    pytest.fail(
        f"{request.module.__name__} left {len(left)} process(es) running: {listed}",
        pytrace=False,
    )
