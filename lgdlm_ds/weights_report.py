"""How saved weights fit a model, tensor by tensor, before any of them is loaded.

``match(saved, model, fresh)`` sorts every name into loaded, missing (the model has it, the source
does not), unexpected (the other way round) and mismatched (both, in other shapes). Missing and
mismatched weights named by a ``fresh`` glob pattern keep their initial values; unexpected ones
named by a pattern, and the older trainer's text noise schedule buffers, are dropped. Whatever else
does not fit is a problem: strict loading (evaluate, sample, export) accepts none, a warm start
(``model.init_from``) none beyond its ``model.init_fresh_keys``.

Checkpoints written under mmdit 0.2.x build the residual streams with hyper-connections'
``HyperConnections``; mmdit 0.3.0 (pinned here) builds ``ManifoldConstrainedHyperConnections``,
which mixes the streams differently under partly the same names. When the two layouts meet, none of
the residual-stream tensors is used, also those whose names and shapes agree.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

from torch import Tensor, nn

from .model import UPSTREAM_EXTRA_PREFIX, scalars_to_1d

# The residual-stream modules of each block, and the parameter names only one layout has.
RESIDUAL_STREAM = re.compile(r"^mmdit\.blocks\.\d+\.(attn|ff)_residual_fns\.\d+\.")
LAYOUTS = {"HyperConnections (mmdit 0.2.x)": {"dynamic_alpha_scale", "dynamic_beta_scale"},
           "ManifoldConstrainedHyperConnections (mmdit 0.3.0)": {"pre_branch_scale", "residual_scale", "h_post_scale"}}
RESIDUAL_FRESH_PATTERN = "mmdit.blocks.*_residual_fns.*"


def residual_layout(names: Sequence[str]) -> str | None:
    """The residual-stream layout that parameter names show, or None (no hyper-connections)."""
    leaves = {n.rsplit(".", 1)[-1] for n in names if RESIDUAL_STREAM.match(n)}
    return next((layout for layout, only in LAYOUTS.items() if leaves & only), None)


@dataclass
class SavedWeights:
    """Weights as a source holds them, before they are matched to a model."""
    state: dict[str, Tensor]
    """fp32 (floating point) tensors under the bare model's names."""
    source: str
    """The file or folder read."""
    kind: str
    """What kind of source it is, in words."""
    ignored: list[str] = field(default_factory=list)
    """What the source holds besides weights, not used."""


@dataclass
class WeightsReport:
    """What of a source's weights a model takes. Names are the bare model's."""
    source: str
    """The file or folder read."""
    kind: str
    """What kind of source it is."""
    ignored: list[str] = field(default_factory=list)
    """What the source holds besides weights, not used (optimizer state, the older training state...)."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """Model weights the source lacks."""
    unexpected: list[str] = field(default_factory=list)
    """Source weights the model lacks."""
    mismatched: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """Name -> {"source": shape, "model": shape}, for weights both have in other shapes or layouts."""
    fresh: list[str] = field(default_factory=list)
    """Missing or mismatched weights that keep their initial values (named by a fresh pattern)."""
    dropped: list[str] = field(default_factory=list)
    """Unexpected weights left out: the text noise schedule buffers, or named by a fresh pattern."""
    residual_layout: dict[str, str] | None = None
    """{"source": layout, "model": layout} when the residual streams are of different layouts."""
    idle_patterns: list[str] = field(default_factory=list)
    """Fresh patterns that name no weight of the model or the source (a typo?)."""

    def problems(self) -> list[str]:
        """What does not fit, in words; empty when the model can take the source."""
        layout = self.residual_layout

        def stream(name: str) -> bool:  # a residual-stream tensor of a layout the other side cannot use
            return layout is not None and RESIDUAL_STREAM.match(name) is not None

        missing = [n for n in self.missing if n not in self.fresh]
        mismatched = [n for n in self.mismatched if n not in self.fresh]
        unexpected = [n for n in self.unexpected if n not in self.dropped]
        out = [f"{len(names)} {what}: {describe(names)}" for what, names in
               (("missing", [n for n in missing if not stream(n)]),
                ("unexpected", [n for n in unexpected if not stream(n)])) if names]
        shapes: dict[tuple, list[str]] = {}
        for n in mismatched:
            if not stream(n):
                pair = tuple(self.mismatched[n]["source"]), tuple(self.mismatched[n]["model"])
                shapes.setdefault(pair, []).append(n)
        if shapes:
            out.append(f"{sum(map(len, shapes.values()))} wrong shape: " + ", ".join(
                f"{describe(names)} {src} (model {dst})" for (src, dst), names in shapes.items()))
        if any(map(stream, missing + mismatched + unexpected)):
            source = [n for n in self.unexpected + list(self.mismatched) if stream(n)]
            model = [n for n in self.missing + list(self.mismatched) if stream(n)]
            out.append(f"the residual streams are {layout['source']} in the source and {layout['model']} "
                       f"here, so none of the source's {len(source)} residual-stream tensors can be used "
                       f"({describe(source)}) and the model's {len(model)} ({describe(model)}) get no values; "
                       f"model.init_fresh_keys: ['{RESIDUAL_FRESH_PATTERN}'] lets them start fresh")
        return out

    def summary(self) -> str:
        """One paragraph for the log."""
        parts = [f"{len(self.loaded)} weights loaded from {self.source} ({self.kind})"]
        if self.fresh:
            parts.append(f"{len(self.fresh)} start fresh: {describe(self.fresh)}")
        if self.dropped:
            parts.append(f"{len(self.dropped)} left out: {describe(self.dropped)}")
        parts += [f"ignored: {item}" for item in self.ignored]
        parts += [f"model.init_fresh_keys pattern '{p}' names no weight" for p in self.idle_patterns]
        return "; ".join(parts + self.problems()) + "."

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def match(saved: SavedWeights, model: nn.Module, fresh: Sequence[str] = ()) -> WeightsReport:
    """How ``saved`` fits ``model``; ``fresh``: glob patterns of the names allowed to start fresh
    (missing or mismatched) or to be dropped (unexpected)."""
    own = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    state = _model_shaped(saved.state, model)
    layouts = residual_layout(list(state)), residual_layout(list(own))
    other_layout = None not in layouts and layouts[0] != layouts[1]
    report = WeightsReport(saved.source, saved.kind, list(saved.ignored))
    if other_layout:
        report.residual_layout = {"source": layouts[0], "model": layouts[1]}
    for name, shape in own.items():
        if name not in state:
            report.missing.append(name)
        elif tuple(state[name].shape) != shape or (other_layout and RESIDUAL_STREAM.match(name)):
            report.mismatched[name] = {"source": list(state[name].shape), "model": list(shape)}
        else:
            report.loaded.append(name)
    report.unexpected = [n for n in state if n not in own]
    report.fresh = [n for n in report.missing + list(report.mismatched) if _named(n, fresh)]
    report.dropped = [n for n in report.unexpected if n.startswith(UPSTREAM_EXTRA_PREFIX) or _named(n, fresh)]
    report.idle_patterns = [p for p in fresh if not any(_named(n, [p]) for n in {*own, *state})]
    return report


def _named(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def loaded_state(saved: SavedWeights, report: WeightsReport, model: nn.Module) -> dict[str, Tensor]:
    """The weights ``report`` says ``model`` takes from ``saved``, in the model's shapes."""
    state = _model_shaped(saved.state, model)
    return {n: state[n] for n in report.loaded}


def _model_shaped(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The older model's files hold the hyper-connection scalars with shape (), this model (1,)."""
    return scalars_to_1d(state, getattr(model, "scalar_param_names", ()))


def describe(names: Sequence[str]) -> str:
    """Names in few words. Names that differ only in their numbers, and that are all combinations of
    those numbers, are written once with each varying number as its values
    ("mmdit.blocks.{0..23}.ff_residual_fns.{0,1}.static_beta"); others one by one."""
    groups: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        groups.setdefault(tuple(_NUMBER.split(name)), []).append(tuple(int(d) for d in _NUMBER.findall(name)))
    out = []
    for texts, numbers in groups.items():
        values = [sorted({n[i] for n in numbers}) for i in range(len(numbers[0]))]
        if len(set(numbers)) == math.prod(map(len, values)):
            out.append(_join(texts, map(_values, values)))
        else:
            out += [_join(texts, map(str, n)) for n in numbers]
    return ", ".join(out)


def _join(texts: tuple[str, ...], numbers) -> str:
    return "".join(t + n for t, n in zip(texts, [*numbers, ""]))


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _values(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"
