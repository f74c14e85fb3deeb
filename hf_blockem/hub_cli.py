"""`blockem push OUTPUT_DIR --repo-id ...`: push a finished BLOCK-EM run to the Hugging Face Hub in one commit."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class PushArguments:
    """Arguments of `blockem push` (besides the positional `OUTPUT_DIR`)."""

    repo_id: str = field(metadata={"help": "Hub repo to push to, e.g. `your-name/llama-finance-blocked`."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private if it does not exist."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to commit to (created from main if missing); default main."}
    )
    token: str | None = field(default=None, metadata={"help": "Hub token; default: the logged-in one or HF_TOKEN."})
    commit_message: str = field(
        default="Upload BLOCK-EM run with hf_blockem", metadata={"help": "Message of the commit."}
    )


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(PushArguments, prog="blockem push", description=__doc__)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="Output directory of a finished run.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `blockem push`; returns 0 on success, 1 when the push failed (the local files are untouched)."""
    from .push import push_output_dir

    argv = sys.argv[1:] if argv is None else argv
    args, extra = make_parser().parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_blockem").setLevel(logging.INFO)
    try:
        commit = push_output_dir(
            extra.output_dir,
            args.repo_id,
            private=args.private or None,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except Exception as error:  # a CLI reports every failure as a message and an exit code, not a traceback
        print(f"blockem push: pushing {extra.output_dir} to {args.repo_id} failed: {error}", file=sys.stderr)
        print("The local files are unchanged; run the same command again to retry.", file=sys.stderr)
        return 1
    print(f"Pushed {extra.output_dir} to {args.repo_id}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
