"""What every command shares: its argparse conventions, ``section.key=value`` overrides and one
exit status.

Exit status: 0 done; 1 failed while running; 2 bad input: an argparse error, or an expected error
(a config key or value, data, a checkpoint or run directory that cannot be used) found before the
work; 3 (train only) stopped on a signal after saving a complete checkpoint: the same command
resumes. An expected error ends the command with one line ``error: message`` on stderr and no
traceback; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import check_overrides

DONE, FAILED, BAD_INPUT, STOPPED_AFTER_SAVE = 0, 1, 2, 3

EPILOG = "exit status: 0 done, 1 failed while running, 2 bad input (one line 'error: ...' on stderr)"

# By name, not by class: importing every command's module to know its errors would make each
# command start slowly (prepare loads sentence-transformers, plot matplotlib, train DeepSpeed).
BAD_INPUT_ERRORS = frozenset({
    "lgdlm_ds.config.ConfigError", "lgdlm_ds.corpus.CorpusError", "lgdlm_ds.data.DataError",
    "lgdlm_ds.prepare.PrepareError", "lgdlm_ds.checkpoint.CheckpointError", "lgdlm_ds.loading.LoadError",
    "lgdlm_ds.sample.SampleError", "lgdlm_ds.metrics.LogError",
})
FAILED_ERRORS = frozenset({"lgdlm_ds.trainer.TrainingError", "lgdlm_ds.cli.CommandFailed"})


class CommandFailed(RuntimeError):
    """A command that stopped while running (exit status 1); the message says why."""


def parser(command: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m lgdlm_ds.<command>``: the module doc as description, the shared epilog."""
    return argparse.ArgumentParser(prog=f"python -m lgdlm_ds.{command}", description=doc, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overrides(parser: argparse.ArgumentParser, of: str = "the recipe") -> None:
    """Positional ``section.key=value`` arguments, as ``args.overrides``; ``run`` checks them."""
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help=f"change a config key of {of} (a YAML value; every key is checked before any work)")


def exit_status(error: BaseException) -> int | None:
    """2 or 1 for an expected error (by its class or a base class), None for any other."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(error).__mro__}
    if names & BAD_INPUT_ERRORS:
        return BAD_INPUT
    if names & FAILED_ERRORS:
        return FAILED
    return None


def run(work: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """A command's exit status: its overrides checked, then ``work(args)``: 0 when it returns None
    (else the status it returns), 2 or 1 with one line ``error: message`` on stderr when it raises
    an expected error."""
    try:
        check_overrides(getattr(args, "overrides", ()))
        status = work(args)
    except Exception as e:
        status = exit_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return status
    return DONE if status is None else status
