"""The docs quote only keys the code has. In README.md, ds_configs/README.md and every
recipes/**/README.md, each inline-code identifier that is built like a log key is one that a
training log line or ``lgdlm_ds.evaluate`` can write, and each ``section.key`` is a config field.
In those and docs/*.md, each ``python -m lgdlm_ds...`` command of a fenced block uses only options
that its command's --help lists and overrides of config fields.

The log keys are not listed here: they are collected by running the code (a tiny TrainStep of
every loss mode, lgdlm_ds.evaluate's ``evaluate()``), plus the trainer's line keys and the
``eval_`` version of every objective metric. An identifier is taken for a log key when it has an
underscore and every one of its words is a word of some log key (``eval_l2t_token_accuracy``);
other identifiers (``cycle_vs_naive_time``, ``normalized_mse``) are not log keys and are left alone.
A bare config field (``eval_every``) and the name of a family of keys (``cycle_text``, ``eval_*``)
are not claims of a log key either.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import fnmatch
import importlib
import io
import re

import pytest

from lgdlm_ds.__main__ import COMMANDS
from lgdlm_ds.config import MODES, Config
from lgdlm_ds.evaluate import evaluate
from lgdlm_ds.metrics import LINE_KEYS
from core_utils import ROOT, tiny_batch, tiny_config, tiny_step

DOCS = [ROOT / "README.md", ROOT / "ds_configs" / "README.md", *sorted((ROOT / "recipes").glob("**/README.md"))]
SECTIONS = {f.name: {g.name for g in dataclasses.fields(getattr(Config(), f.name))} for f in dataclasses.fields(Config)}
CONFIG_FIELDS = set().union(*SECTIONS.values())

# A lower-case identifier with at least one underscore (``*`` for a family: ``eval_*``), standing
# alone: not part of a dotted name, a path, an option or a call.
LOG_KEY = re.compile(r"(?<![\w.*/$-])[a-z][a-z0-9]*(?:_(?:[a-z0-9]+|\*))+(?![\w.*/(-])")
# section.key, with the README's shorthand for siblings: loss.cycle_text_weight|_warmup_steps.
CONFIG_KEY = re.compile(rf"(?<![\w./-])({'|'.join(SECTIONS)})\.([a-z_][a-z0-9_]*)((?:\|_[a-z0-9_]+)*)(?![\w.(])")


def _inline_code(text: str) -> list[str]:
    """Inline code spans, outside fenced blocks (those hold commands, checked by running them)."""
    return re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def _code_strings() -> set[str]:
    """Every string literal of the package (file names such as ``model.safetensors``)."""
    return {node.value for path in (ROOT / "lgdlm_ds").rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


@pytest.fixture(scope="module")
def log_keys() -> set[str]:
    metrics = set()
    for mode in MODES:
        cfg = tiny_config(f"loss.loss_type={mode}")
        for step in (0, 10**6):  # cycle terms before and after their warm-up
            metrics |= tiny_step(cfg)(tiny_batch(cfg), step)[1].keys()
    cfg = tiny_config("loss.cycle_every=2", "loss.latent_prior_weight=1")  # the keys of options off by default
    metrics |= tiny_step(cfg)(tiny_batch(cfg), 0)[1].keys()
    cfg = tiny_config()
    evaluated = evaluate(tiny_step(cfg).model, cfg, [tiny_batch(cfg)], t2l_steps=1, decode_steps=1, elbo_samples=1)
    objective = {"loss", *metrics}
    return {*LINE_KEYS, *objective, *(f"eval_{k}" for k in objective), *evaluated}


def unknown_log_keys(text: str, known: set[str]) -> list[str]:
    """Identifiers in ``text``'s inline code that are built like a log key but are none."""
    words = {w for k in known for w in k.split("_")}
    bad = []
    for span in _inline_code(text):
        for key in LOG_KEY.findall(span):
            if not set(key.split("_")) - {"*"} <= words:
                continue  # a word no log key has: not a log key (a file, a ratio, a config value)
            if (key in known or key in CONFIG_FIELDS or any(fnmatch.fnmatchcase(k, key) for k in known)
                    or any(k.startswith(key + "_") for k in known)):
                continue
            close = difflib.get_close_matches(key, known, n=2)
            bad.append(f"`{key}`" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return bad


def unknown_config_keys(text: str, code_strings: set[str]) -> list[str]:
    bad = []
    for span in _inline_code(text):
        for section, key, siblings in CONFIG_KEY.findall(span):
            stem = key.rsplit("_", 1)[0]
            for name in [key] + [stem + s for s in siblings.split("|") if s]:
                if name not in SECTIONS[section] and f"{section}.{name}" not in code_strings:
                    close = difflib.get_close_matches(name, SECTIONS[section], n=1)
                    bad.append(f"`{section}.{name}`" + (f" (did you mean {section}.{close[0]}?)" if close else ""))
    return bad


def test_the_rules_catch_a_wrong_key_and_leave_other_identifiers_alone(log_keys):
    text = ("Watch `eval_l2t_token_accuracy` and `skipped_steps: 0`; `eval_*`, `cycle_text`, `eval_every`, "
            "`cycle_vs_naive_time`, `normalized_mse`, `test_core_*`, `model.safetensors`; set "
            "`loss.cycle_text_weight|_warmup_steps|_rmp_steps` and `training.lrate`.")
    assert [k.split(" ")[0] for k in unknown_log_keys(text, log_keys)] == ["`eval_l2t_token_accuracy`"]
    assert [k.split(" ")[0] for k in unknown_config_keys(text, _code_strings())] == [
        "`loss.cycle_text_rmp_steps`", "`training.lrate`"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_quote_only_log_keys_the_code_writes(doc, log_keys):
    bad = unknown_log_keys(doc.read_text(), log_keys)
    assert not bad, f"{doc.relative_to(ROOT)} quotes log keys that no code writes: {', '.join(bad)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_quote_only_config_keys_that_exist(doc):
    bad = unknown_config_keys(doc.read_text(), _code_strings())
    assert not bad, f"{doc.relative_to(ROOT)} quotes config keys that lgdlm_ds.config does not have: {', '.join(bad)}"


def fenced_commands(text: str) -> list[list[str]]:
    """The words of each ``python -m lgdlm_ds...`` command in ``text``'s fenced blocks: continuation
    lines joined, a trailing comment and anything after a pipe or a redirection left out."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#|\s[|>]|&&", line)[0]
            if (start := line.find("python -m lgdlm_ds")) >= 0:
                words = line[start:].split()
                if (words + [""])[3 if words[2] == "lgdlm_ds" else 2].islower():  # not a placeholder: COMMAND
                    commands.append(words)
    return commands


def _help(words: list[str]) -> str:
    module = COMMANDS[words[3]][0] if words[2] == "lgdlm_ds" else words[2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return out.getvalue()


def unknown_command_words(text: str) -> list[str]:
    bad = []
    for words in fenced_commands(text):
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _help(words)))
        for word in words:
            option = word.split("=", 1)[0]
            if word.startswith("--") and option not in options:
                bad.append(f"{' '.join(words[:3])} {option}")
            if (m := re.fullmatch(r"([a-z]+)\.([a-z_0-9]+)=.*", word)) and m[1] in SECTIONS and m[2] not in SECTIONS[m[1]]:
                bad.append(f"{' '.join(words[:3])} {m[1]}.{m[2]}")
    return bad


def test_the_command_rule_catches_a_wrong_option_and_key():
    text = ("```bash\npython -m lgdlm_ds.evaluate runs/x --batches 2 --t2l-step 1 \\\n  model.hidden_sise=3  # --nothing\n"
            "python -m lgdlm_ds sample runs/x l2t --split validation --num 4 > out.txt\n```\n")
    assert unknown_command_words(text) == ["python -m lgdlm_ds.evaluate --t2l-step",
                                           "python -m lgdlm_ds.evaluate model.hidden_sise"]


@pytest.mark.parametrize("doc", DOCS + sorted((ROOT / "docs").glob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_commands_use_options_and_keys_that_exist(doc):
    bad = unknown_command_words(doc.read_text())
    assert not bad, f"{doc.relative_to(ROOT)} quotes commands with options or keys they do not have: {', '.join(bad)}"
