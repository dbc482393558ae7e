"""Entry-script conventions shared by every launcher script.

Stage scripts (``clean``, ``build_tokenizer``, ``shard``, ``prepare_data``, ``pretrain``,
``finetune``, ``lr_find``) take ``--config PATH`` plus dotted ``section.key=value``
overrides; tool scripts (``generate``, ``export_hf``, ``predict``, ``report``) take plain
flags. Both accept the ``--local_rank`` the deepspeed launcher passes, and both turn a
:class:`~crucible.errors.UserError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from crucible.config import Section, config_help, dump_config, load_config
from crucible.errors import UserError
from crucible.runtime import env_rank

EXIT_USER_ERROR = 2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None,
        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used otherwise",
    )


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run ``fn``; a user error becomes one line on stderr and exit status 2."""
    try:
        result = fn()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


def stage_parser(root_cls: type[Section], prog: str, description: str) -> argparse.ArgumentParser:
    epilog = "configuration fields (override any with section.key=value):\n" + "\n".join(
        config_help(root_cls)
    )
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (see configs/); defaults apply when omitted")
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved configuration as YAML and exit",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="dotted overrides applied on top of the YAML recipe",
    )
    _add_common(parser)
    return parser


def stage_main(
    root_cls: type[Section],
    run: Callable[[Any, argparse.Namespace], Any],
    prog: str,
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse ``--config`` + overrides into ``root_cls`` and call ``run(cfg, args)``."""
    parser = stage_parser(root_cls, prog, description)
    if add_arguments is not None:
        add_arguments(parser)
    # options may stand between overrides (deepspeed appends --local_rank after them)
    args = parser.parse_intermixed_args(argv)

    def _go() -> Any:
        cfg = load_config(root_cls, args.config, args.overrides)
        if args.print_config:
            if env_rank() == 0:
                print(dump_config(cfg), end="")
            return 0
        return run(cfg, args)

    return run_guarded(_go)


def tool_main(
    build_parser: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], Any],
    prog: str,
    description: str,
    argv: list[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    build_parser(parser)
    _add_common(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run(args))
