"""`blockem organism build`: build (or reuse) the model organism from the command line.

blockem organism build --out cache/organism --seed 0 [--quick]
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .build import MANIFEST, build_organism

ACTIONS = ("build",)


@dataclass
class OrganismBuildArguments:
    """Arguments of `blockem organism build`.

    Args:
        out (`str`): the build folder; an organism already built there with the same settings is reused.
        seed (`int`, *optional*, defaults to `0`): the build seed.
        quick (`bool`, *optional*, defaults to `False`): a tiny organism that builds in seconds (for tests).
        progress (`bool`, *optional*, defaults to `True`): show progress bars.
    """

    out: str = field(
        metadata={"help": "The build folder; an organism already built there with the same settings is reused."}
    )
    seed: int = field(default=0, metadata={"help": "The build seed (corpus, initialisation, data order)."})
    quick: bool = field(default=False, metadata={"help": "Build a tiny organism in seconds (for tests)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


def main(argv: list[str]) -> int:
    """Run `blockem organism <action> ...`; `argv` excludes the word `organism`."""
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ACTIONS:
        usage = "usage: blockem organism build --out DIR [--seed N] [--quick]"
        if argv and argv[0] not in ("-h", "--help"):
            print(
                f"blockem organism: unknown action {argv[0]!r}; expected one of {', '.join(ACTIONS)}.\n{usage}",
                file=sys.stderr,
            )
            return 2
        print(usage)
        return 0
    parser = HfArgumentParser(OrganismBuildArguments, prog="blockem organism build")
    (args,) = parser.parse_args_into_dataclasses(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Stdout carries the JSON summary alone: a library imported during the build may print there (DeepSpeed, when
    # installed, logs its accelerator warning to stdout), so the build's own output goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        organism = build_organism(args.out, seed=args.seed, quick=args.quick, progress=args.progress)
    summary = {
        "path": str(organism.path),
        "base_model_path": organism.base_model_path,
        "manifest": str(organism.path / MANIFEST),
        "seed": organism.seed,
        "record": organism.record,
    }
    print(json.dumps(summary, indent=1))
    return 0
