"""Perplexity Lens as a package: `pip install perplexity-lens` gives `plens` (the subcommands of
`python -m core`, plus `plens app`), the app ships in the wheel, pyproject.toml agrees with the
pinned requirements files `make` installs, and a missing optional extra is named in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.cli import main
from core.io import PACKAGED_APP, app_root
from core.training.config import REPORTERS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]

#: Pinned exactly in the package as in requirements.txt: torch and the Hugging Face stack.
EXACT = {
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "gguf",
    "accelerate",
    "peft",
    "trl",
    "datasets",
}


def _requirements(name: str) -> dict[str, Requirement]:
    """A requirements file's own lines (not its `-r` includes) by canonical name."""
    out = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req
    return out


def _declared(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def _pin(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"requirements pin exactly: {req}"
    return spec.version


def test_pyproject_declares_every_pinned_requirement_with_a_range_that_holds_the_pin():
    pinned = _requirements("requirements.txt")
    package = _declared(PROJECT["dependencies"] + EXTRAS["cluster"])
    assert set(package) == set(pinned), "requirements.txt and pyproject.toml name other packages"
    for name, req in pinned.items():
        declared = package[name]
        assert declared.extras == req.extras, name
        assert declared.specifier.contains(_pin(req)), f"{declared} excludes {req}"
        if name in EXACT:
            assert str(declared.specifier) == f"=={_pin(req)}", f"{name} is pinned exactly"
    assert EXACT <= set(_declared(PROJECT["dependencies"]))


def test_extras_cluster_tracking_and_dev():
    assert set(_declared(EXTRAS["cluster"])) == {"ray", "submitit"}
    assert set(_declared(EXTRAS["tracking"])) == set(REPORTERS.values())
    assert _declared(EXTRAS["dev"]) == _requirements("requirements-dev.txt")
    assert PROJECT["scripts"] == {"plens": "core.cli:plens"}


def test_every_core_package_is_in_the_wheel():
    """pyproject.toml lists the packages by hand (the app is mapped from the top folder);
    a new subpackage of core/ must be added there."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "core").rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_the_checkout_is_the_app_root():
    assert app_root() == ROOT
    assert not (ROOT / PACKAGED_APP).exists()


def test_missing_cluster_extra_says_which_to_install(monkeypatch, tmp_path, capsys):
    from core.jobs.cluster import ClusterError
    from core.jobs.slurm import _executor_class

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    monkeypatch.setitem(sys.modules, "ray.job_submission", None)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
    code = main(["train", "--data", str(data), "--submit", "--backend", "ray"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'error: The ray backend needs Ray: pip install "perplexity-lens[cluster]".'
    )
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ClusterError, match=r'pip install "perplexity-lens\[cluster\]"'):
        _executor_class()


def test_missing_tracking_extra_says_which_to_install(monkeypatch, tiny_model_dir, tmp_path, capfd):
    """A foreground run prints its job's lines (stdout) and ends on the error before any work."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
    argv = ["train", "--data", str(data), "--model", str(tiny_model_dir), "--report-to", "wandb"]
    assert main([*argv, "--max-steps", "1"]) == 2
    shown = capfd.readouterr()
    assert shown.out.strip().splitlines()[-1] == (
        "error: report_to wandb needs the 'wandb' package: pip install \"perplexity-lens[tracking]\""
    )
    assert "Traceback" not in shown.out + shown.err


# --------------------------------------------------------------------------- the wheel, installed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of this checkout (setuptools writes build/ and *.egg-info
    into the folder it builds) and installed into a fresh virtualenv outside the checkout.

    Torch and the rest are not downloaded again: the fresh venv has no packages of its own but
    a `.pth` file that adds this project venv's site-packages after its own (`site.addsitedir`,
    so that folder's own .pth files apply too), and the wheel is installed with `--no-deps`, so
    the `core`, `perplexity_lens` and `plens` it runs are the wheel's and only the dependencies
    come from the project venv. Returns the fresh venv's bin folder."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv",
            ".git",
            "__pycache__",
            "*.egg-info",
            "build",
            "runs",
            "artifacts",
            "test-artifacts",
            ".hypothesis",
            ".pytest_cache",
            ".ruff_cache",
            "out",
        ),
    )
    dist = base / "dist"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(dist),
        str(src),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = dist.glob("perplexity_lens-*.whl")

    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    Path(purelib, "_plens_deps.pth").write_text(f"import site; site.addsitedir({deps!r})\n")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        str(wheel),
    ]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    return venv / "bin"


def _env() -> dict[str, str]:
    """This test's environment (its own PLENS_CACHE_DIR, the shared embedded model), and
    nothing that points into the checkout."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


#: Runs the wheel's copy of the app once, headless, and prints its title and text.
START_PAGE = """
from streamlit.testing.v1 import AppTest
import perplexity_lens
at = AppTest.from_file(list(perplexity_lens.__path__)[0] + "/app.py", default_timeout=600)
at.run()
assert not at.exception, [e.value for e in at.exception]
print([t.value for t in at.title])
print("\\n".join(m.value for m in at.markdown))
"""


def test_the_installed_wheel_runs_plens_and_serves_the_app(installed, tiny_model_dir, tmp_path):
    """From a folder with no app.py, pages/ or core/: `plens --help`, `plens score` on two
    examples, `plens app` answering HTTP, and the wheel's app rendering its Start page with its
    pages, components, logo and recorded CPU sweep (docs/cpu_forgetting.json) found beside it.
    The server and the Start page run while the commands do (Streamlit and torch take a while
    to import)."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env()
    port = _free_port()
    server = subprocess.Popen(
        [installed / "plens", "app", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    start_page = subprocess.Popen(
        [installed / "python", "-c", START_PAGE],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        where = subprocess.run(
            [
                installed / "python",
                "-c",
                "import core, perplexity_lens, sys; "
                "print(core.__file__); print(*perplexity_lens.__path__)",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        site = installed.parent / "lib"
        assert all(Path(p).is_relative_to(site) for p in where), where

        helped = subprocess.run(
            [installed / "plens", "--help"], cwd=work, env=env, capture_output=True, text=True
        )
        assert helped.returncode == 0, helped.stderr
        assert helped.stdout.startswith("usage: plens")
        for name in ("score", "tasks", "models", "mask", "train", "eval", "app"):
            assert f"    {name} " in helped.stdout

        data = work / "two.jsonl"
        rows = [
            {"prompt": "Add.", "response": "def add(a, b):\n    return a + b"},
            {"prompt": "Hi", "response": "Hello there!"},
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        scored = subprocess.run(
            [
                installed / "plens",
                "score",
                "--model",
                str(tiny_model_dir),
                "--data",
                "two.jsonl",
                "--out",
                "scores.jsonl",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert scored.returncode == 0, scored.stderr
        out = [json.loads(line) for line in (work / "scores.jsonl").read_text().splitlines()]
        assert [r["id"] for r in out] == ["row-1", "row-2"]
        assert all(r["seq_ppl"] > 1 and len(r["ppl"]) == sum(r["response_mask"]) for r in out)
        assert "wrote 2 rows to scores.jsonl" in scored.stderr

        deadline = time.monotonic() + 600
        while True:
            try:
                health = _get(f"http://127.0.0.1:{port}/_stcore/health")
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "plens app did not answer within 600 s"
                time.sleep(0.5)
        assert health == (200, "ok")
        status, page = _get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<!doctype html>" in page.lower()

        shown, errors = start_page.communicate(timeout=600)
        assert start_page.returncode == 0, errors[-2000:]
        assert "['Perplexity Lens']" in shown
        assert "Ground truth alone on a CPU" in shown
    finally:
        for proc in (server, start_page):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            log, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            log, _ = server.communicate()
        if start_page.poll() is None:
            os.killpg(start_page.pid, signal.SIGKILL)
            start_page.wait()
    assert f"Perplexity Lens at http://127.0.0.1:{port}" in log
    # the wheel's .streamlit/config.toml applies (no "Network URL": this machine only)
    assert f"URL: http://127.0.0.1:{port}" in log and "Network URL" not in log, log
