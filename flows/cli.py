"""``lagent``: the command-line interface.

Every subcommand reads the same configuration layers (``params.yaml``, ``--params FILE``,
``--set section.key=value``), shows a progress bar on a terminal, and with ``--json`` ends its
output with one JSON object. User errors are one line on stderr and exit status 2, never a
traceback.

This module only builds the parser from the subcommand modules (``cli_train``, ``cli_pipeline``,
``cli_meta``) and dispatches; what they share is in :mod:`flows.cli_common`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from flows.cli_common import EXIT_INTERRUPTED, EXIT_USAGE, Parser, UsageError
from flows.cli_meta import add_meta_commands
from flows.cli_pipeline import add_pipeline_commands
from flows.cli_train import add_train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lagent", description="Train, evaluate and orchestrate DQN learning agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_train_commands(commands)
    add_pipeline_commands(commands)
    add_meta_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see 'lagent {args.command} --help')")
        level = logging.INFO if args.verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        for handler in logging.getLogger().handlers:  # records that libraries' loggers propagate
            handler.setLevel(level)
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"lagent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lagent: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # user-facing errors from the library: one line, no traceback
        from agent.checkpoint import CheckpointError
        from agent.config import ConfigError
        from agent.tasks import UnsupportedEnvironmentError

        if isinstance(exc, (ConfigError, CheckpointError, UnsupportedEnvironmentError, FileNotFoundError)):
            print(f"lagent: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
