"""One command line: every command of ``python -m lgdlm_ds`` is registered, answers -h, refuses a bad
override with status 2 naming the key, and is the one the README lists; the shared exit status."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lgdlm_ds import cli
from lgdlm_ds.__main__ import COMMANDS
from lgdlm_ds.__main__ import main as dispatch
from lgdlm_ds.config import ConfigError
from core_utils import SMOKE

ROOT = Path(__file__).resolve().parents[1]
BAD = "model.hiden_size=3"
# Each command that takes overrides, with its other required arguments and a bad override: refused
# before the path, the recipe's data or anything else is looked at.
BAD_OVERRIDE_ARGV = {
    "train": [SMOKE, BAD],
    "evaluate": ["nowhere", BAD],
    "sample": ["nowhere", "l2t", BAD, "--sentences", "A sentence."],
    "export": ["nowhere", BAD, "--out", "nowhere_else"],
    "ablate": [BAD],
    "model": [SMOKE, BAD],
    "memory": [SMOKE, BAD, "--gpus", "1", "--gpu-mem", "80"],
}


def _main(command: str):
    return importlib.import_module(COMMANDS[command][0]).main


def _help(main) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(["-h"])
    assert exit_.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_main_and_answers_help(command):
    text = _help(_main(command))
    assert text.startswith(f"usage: python -m lgdlm_ds.{command} ") and cli.EPILOG in text
    assert ("section.key=value" in text) == (command in BAD_OVERRIDE_ARGV), \
        "commands taking overrides are those of BAD_OVERRIDE_ARGV"


def test_the_dispatcher_lists_every_command():
    text = _help(dispatch)
    assert all(re.search(rf"^  {name} +{re.escape(summary)}$", text, re.M) for name, (_, summary) in COMMANDS.items())


@pytest.mark.parametrize("command", BAD_OVERRIDE_ARGV)
def test_a_bad_override_is_refused_naming_the_key(command, capsys):
    assert _main(command)([str(a) for a in BAD_OVERRIDE_ARGV[command]]) == cli.BAD_INPUT
    err = capsys.readouterr().err
    assert err == "error: unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'?\n"


def test_both_command_lines_run_a_tool():
    by_name, by_module = (subprocess.run([sys.executable, "-m", *argv, "-h"], cwd=ROOT, capture_output=True, text=True)
                          for argv in (["lgdlm_ds", "plot"], ["lgdlm_ds.plot"]))
    assert by_name.returncode == by_module.returncode == 0, by_name.stderr + by_module.stderr
    assert by_name.stdout == by_module.stdout and "python -m lgdlm_ds.plot" in by_name.stdout


def test_the_readme_lists_the_registered_commands():
    section = re.search(r"^## Commands\n(.*?)^## ", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    rows = dict(re.findall(r"^\| `(\w+)` \| `([\w.]+)` \|", section, re.M))
    assert rows == {name: module for name, (module, _) in COMMANDS.items()}


def test_exit_status_and_one_line_errors(capsys):
    for name in cli.BAD_INPUT_ERRORS | cli.FAILED_ERRORS:  # every class named there exists
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name

    def raising(error):
        def work(args):
            raise error
        return work

    args = cli.parser("x", "").parse_args([])
    assert cli.run(lambda a: None, args) == cli.DONE
    assert cli.run(raising(ConfigError("bad key")), args) == cli.BAD_INPUT
    assert cli.run(raising(cli.CommandFailed("stopped")), args) == cli.FAILED
    assert capsys.readouterr().err == "error: bad key\nerror: stopped\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(raising(KeyError("x")), args)
