"""`python -m core migrate`: the project's own older files, written here as the older code wrote
them, are converted in place (the old file kept as <name>.migrated), read back the same through
the current readers, and a second run finds nothing to do; `--dry-run` changes nothing; until
then the current readers do not read them, and say so."""

from __future__ import annotations

import gc
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from core.cli import main
from core.data.sources import load_source
from core.errors import LensError
from core.eval.legacy import migrate_run_folder
from core.io import cache_dir
from core.jobs.registry import JobRegistry
from core.jobs.runfiles import eval_round_path
from core.migrate import NOTHING, migrate
from core.model.loading import LoadedModel
from core.scoring.cache import ScoreCache
from core.scoring.legacy import LegacyScoreCache, legacy_score_note, score_key
from core.scoring.score import score_examples, score_setting
from core.scoring.tokens import TokenScores
from core.study.runs import load_run
from tests.eval_runs import BASE, later, make_eval_run


@pytest.fixture(scope="module")
def mbpp():
    return load_source(task="mbpp", split="train", limit=8).examples


@pytest.fixture
def count_batches(monkeypatch):
    """Counts the examples the model scores (`LoadedModel.score_pairs`)."""
    calls = {"examples": 0}
    real = LoadedModel.score_pairs

    def counting(lm, encs, top_k):
        calls["examples"] += len(encs)
        return real(lm, encs, top_k)

    monkeypatch.setattr(LoadedModel, "score_pairs", counting)
    return calls


def _dicts(records):
    return [r.to_dict() for r in records]


def _old_rows(path: Path) -> dict:
    with closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as db:
        return dict(db.execute("SELECT key, value FROM scores"))


def _write_old_cache(lm, records) -> Path:
    """`records` in scores.sqlite, as the cache before the store wrote them (its class, its
    encoding, its keys, its default path) and left them once its process ended (connections
    closed: the journal folded into the file)."""
    s = score_setting(lm)
    old = LegacyScoreCache()
    assert old.path == cache_dir() / "scores.sqlite"
    old.put_many(
        {
            score_key(s.model_key, s.template_fp, s.convention, s.max_length, s.top_k, r): r
            for r in records
        }
    )
    del old
    gc.collect()  # its connections close: the last one folds the journal in
    assert not Path(f"{cache_dir() / 'scores.sqlite'}-wal").exists()
    return cache_dir() / "scores.sqlite"


def _tree(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` with its bytes."""
    return {
        str(p): p.read_bytes()
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if p.is_file()
    }


def _run(argv: list[str], capsys) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


# --------------------------------------------------------------------------- score cache


def test_old_scores_of_a_setting_the_store_knows_are_copied_once(
    tiny_lm, mbpp, count_batches, capsys
):
    reference = score_examples(tiny_lm, mbpp[:6]).examples  # no cache
    old = _write_old_cache(tiny_lm, reference)
    before = _old_rows(old)
    setting = score_setting(tiny_lm)
    # the store knows the setting (one example scored since): the old keys are found under it
    ScoreCache().put(setting, TokenScores.from_examples(reference[:1], top_k=setting.top_k))
    assert legacy_score_note() is not None and "python -m core migrate" in legacy_score_note()

    [line] = _run(["migrate"], capsys)
    assert "copied 5 scored examples (1 scoring setting) into the score store" in line
    assert "1 already there" in line and "scores.sqlite.migrated" in line
    assert not old.exists() and legacy_score_note() is None
    assert _old_rows(cache_dir() / "scores.sqlite.migrated") == before  # the old data, whole
    count_batches["examples"] = 0
    run = score_examples(tiny_lm, mbpp[:8], cache=ScoreCache())
    assert (run.n_cached, run.n_scored, count_batches["examples"]) == (6, 2, 2)
    assert _dicts(run.examples[:6]) == _dicts(reference)  # the scores read back as scored

    assert _run(["migrate"], capsys) == [NOTHING]  # a second run finds nothing to do


def test_scores_of_a_model_named_with_model_are_copied_from_the_kept_file(
    tiny_lm, tiny_model_dir, mbpp, count_batches, capsys
):
    reference = score_examples(tiny_lm, mbpp[:4]).examples
    _write_old_cache(tiny_lm, reference)
    [line] = _run(["migrate"], capsys)  # an empty store knows no setting: nothing placed
    assert "copied 0 scored examples" in line
    assert "left in scores.sqlite.migrated: 4 records of a model not known here" in line
    assert "--model NAME" in line
    setting = score_setting(tiny_lm)
    assert ScoreCache().lookup(setting, mbpp[:4]).keys == []

    [line] = _run(["migrate", "--model", str(tiny_model_dir)], capsys)
    assert line.startswith(f"{cache_dir() / 'scores.sqlite.migrated'}: copied 4 scored examples")
    count_batches["examples"] = 0
    run = score_examples(tiny_lm, mbpp[:4], cache=ScoreCache())
    assert (run.n_cached, count_batches["examples"]) == (4, 0)
    assert _dicts(run.examples) == _dicts(reference)
    lines = _run(["migrate", "--model", str(tiny_model_dir)], capsys)
    assert lines[0] == NOTHING and "copied 0 scored examples" in lines[1]
    assert "4 already there" in lines[1]


def test_unreadable_old_records_stay_in_the_kept_file(tiny_lm, mbpp, capsys):
    reference = score_examples(tiny_lm, mbpp[:2]).examples
    old = _write_old_cache(tiny_lm, reference)
    s = score_setting(tiny_lm)
    key = score_key(s.model_key, s.template_fp, s.convention, s.max_length, s.top_k, reference[0])
    with closing(sqlite3.connect(old)) as db, db:
        db.execute("UPDATE scores SET value = ? WHERE key = ?", (b"not zlib", key))
    ScoreCache().put(s, TokenScores.from_examples(reference[1:], top_k=s.top_k))
    [line] = _run(["migrate"], capsys)
    assert "left in scores.sqlite.migrated: 1 unreadable" in line
    assert len(_old_rows(cache_dir() / "scores.sqlite.migrated")) == 2


def test_a_journal_left_beside_the_old_cache_is_read_too(tiny_lm, mbpp, count_batches, capsys):
    """A process of the old code that died left rows in scores.sqlite-wal only."""
    path = cache_dir() / "scores.sqlite"
    LegacyScoreCache()
    held = sqlite3.connect(path)  # open throughout: the journal is not folded in at close
    held.execute("SELECT COUNT(*) FROM scores").fetchone()
    try:
        reference = score_examples(tiny_lm, mbpp[:2]).examples
        s = score_setting(tiny_lm)
        LegacyScoreCache().put_many(
            {
                score_key(s.model_key, s.template_fp, s.convention, s.max_length, s.top_k, r): r
                for r in reference
            }
        )
        gc.collect()
        assert Path(f"{path}-wal").stat().st_size > 0
        ScoreCache().put(s, TokenScores.from_examples(reference[:1], top_k=s.top_k))
        before = _tree(cache_dir())
        [line] = _run(["migrate", "--dry-run"], capsys)
        assert "would copy 1 scored example" in line and "1 already there" in line
        assert _tree(cache_dir()) == before
        [line] = _run(["migrate"], capsys)
        assert "copied 1 scored example" in line and "1 already there" in line
        count_batches["examples"] = 0
        run = score_examples(tiny_lm, mbpp[:2], cache=ScoreCache())
        assert (run.n_cached, count_batches["examples"]) == (2, 0)
        assert _dicts(run.examples) == _dicts(reference)
    finally:
        held.close()


def test_score_says_an_old_cache_waits_and_does_not_read_it(
    tiny_lm, tiny_model_dir, mbpp, tmp_path, capsys
):
    reference = score_examples(tiny_lm, mbpp[:2]).examples
    _write_old_cache(tiny_lm, reference)
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--model", str(tiny_model_dir), "--task", "mbpp", "--split", "train"]
    assert main([*argv, "--limit", "2", "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    [note] = [line for line in err.splitlines() if line.startswith("note:")]
    assert "scores.sqlite" in note and "python -m core migrate" in note
    assert "2 scored (0 from cache, 2 computed)" in err  # the old file is not read through


# --------------------------------------------------------------------------- job registry

#: The job table as the first release made it (before backend, engine_address, engine_id).
FIRST_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL, device TEXT NOT NULL, status TEXT NOT NULL, run_dir TEXT NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, pid INTEGER, pid_start REAL,
    own_group INTEGER NOT NULL DEFAULT 1, exit_code INTEGER, message TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""


def test_an_old_job_registry_is_refused_until_migrated(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(runs))
    (runs / "j1").mkdir(parents=True)
    with closing(sqlite3.connect(runs / "jobs.sqlite")) as db, db:
        db.execute(FIRST_SCHEMA)
        db.execute(
            "INSERT INTO jobs (id, kind, label, config, device, status, run_dir, created, "
            "exit_code) VALUES ('j1', 'train', 'gt', '{}', 'cpu', 'succeeded', ?, 1.0, 0)",
            (str(runs / "j1"),),
        )
    old = (runs / "jobs.sqlite").read_bytes()
    with pytest.raises(LensError, match="python -m core migrate"):
        JobRegistry()
    assert main(["jobs", "list"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: The job registry") and "python -m core migrate" in err

    assert _run(["migrate", "--dry-run"], capsys) == [
        f"{runs / 'jobs.sqlite'}: would add the columns backend, engine_address, engine_id, "
        "keeping the old file as jobs.sqlite.migrated"
    ]
    assert (runs / "jobs.sqlite").read_bytes() == old
    [line] = _run(["migrate"], capsys)
    assert "added the columns backend, engine_address, engine_id" in line
    [job] = JobRegistry().list()
    assert (job.id, job.status, job.backend, job.where) == ("j1", "succeeded", "local", "local")
    with closing(sqlite3.connect(runs / "jobs.sqlite.migrated")) as db:
        assert [r[1] for r in db.execute("PRAGMA table_info(jobs)")][-1] == "attempts"
        assert db.execute("SELECT id, status FROM jobs").fetchall() == [("j1", "succeeded")]
    assert _run(["migrate"], capsys) == [NOTHING]


#: The pages that open the job registry.
REGISTRY_PAGES = ("home", "train", "generate", "runs", "compare", "protocol")


def test_every_page_says_an_old_job_registry_needs_migrating_in_one_line(tmp_path, monkeypatch):
    """No traceback: each page that opens the registry shows the one line naming migrate."""
    from streamlit.testing.v1 import AppTest

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("PLENS_RUNS_DIR", str(runs))
    with closing(sqlite3.connect(runs / "jobs.sqlite")) as db, db:
        db.execute(FIRST_SCHEMA)
    root = Path(__file__).resolve().parents[1]
    for page in REGISTRY_PAGES:
        at = AppTest.from_file(str(root / "pages" / f"{page}.py"), default_timeout=120).run()
        assert not at.exception, (page, [e.message for e in at.exception])
        assert any("python -m core migrate" in e.value for e in at.error), page


# --------------------------------------------------------------------------- run folders


def _make_old(folder: Path) -> None:
    """Rewrite a run folder as versions before the honest target metric saved it: reference-NLL
    tasks name the easy-token NLL their score, and their records list it first."""
    for path in sorted((folder / "eval").glob("step-*.json")):
        data = json.loads(path.read_text())
        for task in data["tasks"]:
            if task["scorer"] == "ref_ppl":
                task["primary"] = "nll_easy"
        path.write_text(json.dumps(data))
    lines = (folder / "metrics.jsonl").read_text().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    for i, rec in enumerate(records):
        if rec.get("kind") == "eval" and rec["metric"] == "nll":
            j = next(
                k
                for k, r in enumerate(records)
                if r.get("kind") == "eval"
                and r["metric"] == "nll_easy"
                and (r["step"], r["task"]) == (rec["step"], rec["task"])
            )
            if j > i:
                lines[i], lines[j] = lines[j], lines[i]
                records[i], records[j] = records[j], records[i]
    (folder / "metrics.jsonl").write_text("".join(lines))


def test_old_evaluation_results_read_as_saved_until_migrated(tmp_path, capsys):
    runs = tmp_path / "runs"
    folder = make_eval_run(runs, "old", {0: BASE, 2: later(2)})
    new = {p: p.read_bytes() for p in [eval_round_path(folder, 0), folder / "metrics.jsonl"]}
    _make_old(folder)
    old = _tree(folder)
    run = load_run(folder)
    assert run.old_format and run.target_task() == ("mbpp_ppl", "nll_easy")

    report = migrate(cache_dir(), runs=runs, dry_run=True)
    assert [s.text.split(":")[0] for s in report.converted] == [
        str(folder.resolve() / "eval"),
        str(folder.resolve() / "metrics.jsonl"),
    ]
    assert all("would" in line for line in report.lines())
    assert _tree(folder) == old  # a dry run changes nothing

    lines = [s.text for s in migrate(cache_dir(), runs=runs).steps]
    assert "named the full-token NLL the reference-NLL score in 2 evaluation rounds" in lines[0]
    assert (
        "put the full-token NLL record before the easy-token one for 4 reference-NLL task"
        in lines[1]
    )
    run = load_run(folder)
    assert not run.old_format and run.target_task() == ("mbpp_ppl", "nll")
    assert set(run.changes()["metric"]) == {"nll", "acc"}
    for path, data in new.items():  # as the current writer writes them, the old files kept
        assert path.read_bytes() == data
        assert path.with_name(path.name + ".migrated").read_bytes() == old[str(path)]
    assert migrate(cache_dir(), runs=runs).lines() == [NOTHING]


def test_a_run_without_rounds_reads_its_records_after_migration(tmp_path):
    runs = tmp_path / "runs"
    folder = make_eval_run(runs, "records", {0: BASE, 2: later(2)})
    _make_old(folder)
    for path in (folder / "eval").iterdir():
        path.unlink()
    (folder / "eval").rmdir()
    run = load_run(folder)
    assert run.old_format and run.target_task() == ("mbpp_ppl", "nll_easy")
    migrate(cache_dir(), runs=runs)
    run = load_run(folder)
    assert not run.old_format and run.target_task() == ("mbpp_ppl", "nll")


def test_the_folder_of_a_running_job_is_left_alone(tmp_path):
    folder = make_eval_run(tmp_path, "live", {0: BASE, 2: later(2)})
    _make_old(folder)
    old = _tree(folder)
    [step] = migrate_run_folder(folder, job_status="running")
    assert not step.converted and "left as it is while its job is running" in step.text
    assert _tree(folder) == old


def test_dry_run_changes_nothing_anywhere(tiny_lm, mbpp, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(runs))
    reference = score_examples(tiny_lm, mbpp[:2]).examples
    _write_old_cache(tiny_lm, reference)
    s = score_setting(tiny_lm)
    ScoreCache().put(s, TokenScores.from_examples(reference[:1], top_k=s.top_k))
    _make_old(make_eval_run(runs, "old", {0: BASE, 2: later(2)}))
    before = _tree(cache_dir(), runs)
    lines = _run(["migrate", "--dry-run"], capsys)
    assert len(lines) == 3 and all("would" in line for line in lines)
    assert "would copy 1 scored example (1 scoring setting)" in lines[0]
    assert _tree(cache_dir(), runs) == before


def test_runs_and_compare_name_the_runs_whose_results_are_old(tmp_path, monkeypatch):
    """Until migrated, the pages that show a run's target score say which runs read as saved."""
    from streamlit.testing.v1 import AppTest

    runs = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(runs))
    _make_old(make_eval_run(runs, "old1", {0: BASE, 2: later(2)}))
    make_eval_run(runs, "new1", {0: BASE, 2: later(1)}, method="gt")
    root = Path(__file__).resolve().parents[1]
    for page, key in (("compare", "cmp"), ("runs", "runs")):
        at = AppTest.from_file(str(root / "pages" / f"{page}.py"), default_timeout=120)
        at.query_params[key] = "old1,new1"
        at.run()
        assert not at.exception, (page, [e.message for e in at.exception])
        notes = [i.value for i in at.info if "python -m core migrate" in i.value]
        assert len(notes) == 1 and notes[0].startswith("old1:"), (page, notes)
