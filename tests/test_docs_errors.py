"""docs/errors.md against the code: every row's bad input is provoked and must raise the row's
error class with the row's message, where ``{name}`` matches any value.

The Data rows read the dataset as training would (tests/bad_data.py). The Configuration rows run
``python -m lgdlm_ds.train`` (tests/bad_config.py): its main in-process, and a few through a real
process too. Each must exit with status 2 and the one line ``error: message``, stop at the stage
its Raised column names (``deepspeed.initialize`` is never reached), and leave everything under its
folder (the run directory, the recipe, the data) as it was: names, sizes, mtimes and contents."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

import bad_config
from bad_data import CASES
from core_utils import ROOT, SMOKE
from engine_utils import WORLD_KEYS, world_of_one
from lgdlm_ds import cli, train
from lgdlm_ds.config import load_config

ERRORS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
COLUMNS = ["Case", "Bad input", "Message", "Error", "Raised"]


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of every table, as {column: cell}; a cell's code span is unwrapped, ``\\|`` is a pipe."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        cells = [m.group(2) if (m := re.fullmatch(r"(`+)(.*?)\1", c)) else c for c in cells]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):  # not the separator row
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def message_pattern(template: str) -> re.Pattern:
    """The message as a pattern: its text literally, each ``{name}`` as any value."""
    parts = [re.escape(text) + ("" if name is None else "(.*?)")
             for text, name, _, _ in string.Formatter().parse(template)]
    return re.compile("".join(parts), re.S)


ROWS = table_rows(ERRORS.read_text())
CONFIG_ROWS = [row for row in ROWS if row["Case"] in bad_config.CASES]
DATA_ROWS = [row for row in ROWS if row["Case"] not in bad_config.CASES]


def test_the_tables_have_the_columns_and_one_row_per_case():
    assert ROWS and all(list(row) == COLUMNS for row in ROWS)
    cases = [row["Case"] for row in ROWS]
    assert len(cases) == len(set(cases))
    provoked = set(CASES) | set(bad_config.CASES)
    assert not set(CASES) & set(bad_config.CASES)
    assert not provoked - set(cases), f"cases with no row in docs/errors.md: {sorted(provoked - set(cases))}"


def test_message_patterns():
    pattern = message_pattern("{file}: row {row} of [0, {n}) {{literal}}.")
    assert pattern.fullmatch("/a/b.npy: row 3 of [0, 10) {literal}.")
    assert not pattern.fullmatch("/a/b.npy: row 3 of [0, 10) {literal}. And more.")


@pytest.mark.parametrize("row", DATA_ROWS, ids=lambda row: row["Case"])
def test_each_row_is_what_its_input_raises(row, tmp_path):
    assert row["Case"] in CASES, f"no case in tests/bad_data.py provokes the row {row['Case']}"
    with pytest.raises(Exception) as raised:
        CASES[row["Case"]].provoke(tmp_path)
    assert row["Error"] in {c.__name__ for c in type(raised.value).__mro__}
    assert message_pattern(row["Message"]).fullmatch(str(raised.value)), \
        f"docs/errors.md says:\n{row['Message']}\nthe code raised:\n{raised.value}"


# ---------------------------------------------------------------- configuration rows: the command line

# Where a row's error is raised, as the Raised column says, by the last of these the command reached.
STAGES = ("config", "preflight", "start")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: kind, size, mtime and (files) a hash of the contents."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return found


@pytest.fixture
def reached(monkeypatch):
    """The stages a command reached, in order: "preflight" (trainer.preflight called) and "start"
    (deepspeed.init_distributed called: the trainer started). deepspeed.initialize fails the test."""
    import deepspeed
    from lgdlm_ds import trainer
    stages = []

    def entering(stage, function):
        def entered(*args, **kwargs):
            stages.append(stage)
            return function(*args, **kwargs)
        return entered

    def initialize(*args, **kwargs):
        raise AssertionError("deepspeed.initialize was reached")

    monkeypatch.setattr(trainer, "preflight", entering("preflight", trainer.preflight))
    monkeypatch.setattr(deepspeed, "init_distributed", entering("start", deepspeed.init_distributed))
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    return stages


def _as_root_unprivileged(case) -> bool:
    return case.unprivileged and os.geteuid() == 0


# Root may write anywhere: as root, the process test runs the unprivileged rows as another user.
IN_PROCESS_ROWS = [row for row in CONFIG_ROWS if not _as_root_unprivileged(bad_config.CASES[row["Case"]])]


@pytest.mark.parametrize("row", IN_PROCESS_ROWS, ids=lambda row: row["Case"])
def test_each_configuration_row_stops_the_command_before_deepspeed(row, tmp_path, reached, monkeypatch, capsys):
    case = bad_config.CASES[row["Case"]]
    bad_config.earlier_start(tmp_path)
    args = case.args(tmp_path)
    before = snapshot(tmp_path)
    raised = []
    monkeypatch.setattr(cli, "exit_status", lambda e, status=cli.exit_status: raised.append(e) or status(e))
    monkeypatch.chdir(ROOT)  # as the launchers run it: relative paths are the repository's
    with world_of_one():
        status = train.main(args)
    err = capsys.readouterr().err
    message = err.splitlines()[-1].removeprefix("error: ")
    assert status == cli.BAD_INPUT and err.count("error: ") == 1 and err.endswith(f"error: {message}\n")
    assert message_pattern(row["Message"]).fullmatch(message), \
        f"docs/errors.md says:\n{row['Message']}\nthe command said:\n{message}"
    assert message_pattern(case.message(tmp_path)).fullmatch(message), message
    assert row["Error"] in {c.__name__ for c in type(raised[-1]).__mro__}
    assert (reached[-1] if reached else "config") == row["Raised"] and row["Raised"] in STAGES
    assert snapshot(tmp_path) == before


PROCESS_ROWS = [row for row in CONFIG_ROWS
                if bad_config.CASES[row["Case"]].process or _as_root_unprivileged(bad_config.CASES[row["Case"]])]


def _main_as_unprivileged_user(args: list[str]) -> tuple[int, str]:
    """``train.main(args)`` in a forked child that dropped root to an unprivileged user: the exit
    status and stderr. Forked, not started: that user may not read the interpreter and its library
    under /root, so what the command imports is loaded first (the trainer, and the DeepSpeed config
    models that the JSON's check imports when it runs)."""
    from lgdlm_ds.trainer import load_ds_config
    load_ds_config(load_config(SMOKE, bad_config.BASE))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 99
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.setgroups([])
            os.setgid(bad_config.UNPRIVILEGED)
            os.setuid(bad_config.UNPRIVILEGED)
            with world_of_one():
                status = train.main(args)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.mark.parametrize("row", PROCESS_ROWS, ids=lambda row: row["Case"])
def test_configuration_rows_through_a_real_process(row, tmp_path, monkeypatch, reached):
    # ``reached``: a forked child inherits its guard, deepspeed.initialize failing the child.
    case = bad_config.CASES[row["Case"]]
    as_user = _as_root_unprivileged(case)
    # An unprivileged user cannot enter pytest's folders of root: a folder of its own under /tmp.
    tmp = Path(tempfile.mkdtemp()) if as_user else tmp_path
    try:
        tmp.chmod(0o755)
        bad_config.earlier_start(tmp)
        args = case.args(tmp)
        if as_user:  # that user may not read the checkout either: the recipe and its JSON, copied
            recipe = Path(shutil.copy(args[0], tmp / "recipe.yaml"))
            ds_json = shutil.copy(ROOT / load_config(recipe).training.ds_config, tmp / "ds.json")
            args = [str(recipe), *args[1:], f"training.ds_config={ds_json}"]
        before = snapshot(tmp)
        if as_user:
            monkeypatch.chdir(ROOT)
            status, err = _main_as_unprivileged_user(args)
        else:
            env = {k: v for k, v in os.environ.items() if k not in WORLD_KEYS}
            env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, "-m", "lgdlm_ds.train", *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            status, err = proc.returncode, proc.stderr
        message = err.splitlines()[-1].removeprefix("error: ") if err else ""
        assert status == cli.BAD_INPUT and err.count("error: ") == 1, err
        assert message_pattern(row["Message"]).fullmatch(message), err
        assert message_pattern(case.message(tmp)).fullmatch(message), message
        assert snapshot(tmp) == before
    finally:
        if as_user:
            shutil.rmtree(tmp)
