"""The `blockem` command. Each subcommand lives beside the code it drives and exposes `main(argv)`."""

from __future__ import annotations

import importlib
import sys

from .cpu_allocator import keep_freed_cpu_memory

# subcommand -> module whose `main(argv: list[str]) -> int | None` runs it.
SUBCOMMANDS = {
    "demo": ("hf_blockem.demo", "run BLOCK-EM end to end on the model organism, offline"),
    "organism": ("hf_blockem.organism.cli", "build the synthetic model organism of emergent misalignment"),
    "evaluate": ("hf_blockem.evaluation.cli", "measure emergent misalignment of a model with one or more judges"),
    "select": (
        "hf_blockem.selection.cli",
        "select the latents to block (activation shifts, steering screen, calibration)",
    ),
    "push": ("hf_blockem.hub_cli", "push a finished BLOCK-EM run to the Hugging Face Hub"),
}


def _usage() -> str:
    lines = ["usage: blockem <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `blockem <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"blockem: unknown command {name!r}; expected one of {', '.join(SUBCOMMANDS)}.\n\n{_usage()}",
            file=sys.stderr,
        )
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(f"blockem {name}: not available in this version of hf_blockem.", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def run() -> int:
    """The `blockem` program: [`main`] in a process that keeps freed CPU memory for reuse (see `cpu_allocator`)."""
    keep_freed_cpu_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
