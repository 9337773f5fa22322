"""Every command of lgdlm_ds: ``python -m lgdlm_ds COMMAND [ARGS ...]``.

``python -m lgdlm_ds.COMMAND ARGS`` runs the same command (the launchers use that form);
``python -m lgdlm_ds COMMAND -h`` shows its arguments.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import cli

# Command -> (module with ``main(argv) -> int``, what it does). A module is imported only when its
# command runs: some load DeepSpeed, sentence-transformers or matplotlib.
COMMANDS = {
    "train": ("lgdlm_ds.train", "train a recipe: one process, or each rank under the deepspeed launcher"),
    "prepare": ("lgdlm_ds.prepare", "a text corpus, or the older per-sample layout, into a packed dataset"),
    "evaluate": ("lgdlm_ds.evaluate", "held-out metrics of a run or an exported model"),
    "sample": ("lgdlm_ds.sample", "text from latents (l2t) or latents from text (t2l)"),
    "export": ("lgdlm_ds.export", "a run's weights, for use without DeepSpeed"),
    "ablate": ("lgdlm_ds.ablate", "the ablation matrix over one recipe: each run trained, evaluated, one table"),
    "model": ("lgdlm_ds.model", "parameter count of a recipe's model"),
    "plot": ("lgdlm_ds.tools.plot", "figures of a run's training log"),
    "memory": ("lgdlm_ds.tools.memory", "per-GPU memory of a recipe for each ZeRO stage: will it fit?"),
    "bench": ("lgdlm_ds.tools.bench", "time, FLOPs and memory of a cycle_vae step against references"),
}


def main(argv: list[str] | None = None) -> int:
    listing = "\n".join(f"  {name:<10}{summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(prog="python -m lgdlm_ds", description=f"{__doc__}\ncommands:\n{listing}",
                                     epilog=cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands above")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).main(args.args)


if __name__ == "__main__":
    sys.exit(main())
