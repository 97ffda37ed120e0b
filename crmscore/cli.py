"""The ``crmscore`` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args, settings) -> int``; modules are imported only when their command
runs, so ``crmscore --help`` stays fast. Flags that override a setting are added
with :func:`add_setting_flags`, which names the ``CRMSCORE_*`` variable behind
each one in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from crmscore import logs
from crmscore.settings import Settings, SettingsError, describe, env_var

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("crmscore.demo", "run everything locally: broker, Redis, flow, server, traffic"),
    "flow": ("flows.main", "run the scoring dataflow (Kafka -> state -> Redis)"),
    "serve": ("serving.main", "run the gRPC scoring API"),
    "score": ("serving.card", "print a customer's score card (or watch it live)"),
    "keys": ("serving.keys", "create API keys"),
    "generate": ("crmscore.generator", "write a synthetic transaction stream with ground truth"),
    "replay": ("crmscore.replay", "publish a JSONL/CSV file to the transactions topic"),
    "topics": ("crmscore.topics", "create the service's Kafka topics"),
    "models": ("crmscore.registry", "show the served model bundle and the candidate, or "
               "promote the candidate (frozen model updates)"),
    "report": ("crmscore.report", "print the alert report: treated vs holdout uplift per rule"),
    "bench": ("crmscore.bench", "measure flow throughput beside a trivial bytewax flow"),
}


def add_setting_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--kafka-bootstrap``-style flags that override the named settings."""
    for name in names:
        help_text, default = describe(name)
        shown = ("'on'" if default else "'off'") if isinstance(default, bool) else repr(default)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{help_text} [env: {env_var(name)}, default: {shown}]",
        )


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command (flags added on demand)."""
    parser = argparse.ArgumentParser(
        prog="crmscore",
        description="Real-time customer scoring for CRM. Settings come from CRMSCORE_* "
        "environment variables; flags override them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        name: sub.add_parser(name, help=help_text, description=help_text)
        for name, (_, help_text) in COMMANDS.items()
    }
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    # Let the chosen command's module add its own flags before the full parse.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command][0])
        module.configure(commands[command])
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}
    try:
        settings = Settings.from_env(os.environ, **overrides)
    except SettingsError as exc:
        parser.error(str(exc))
    try:
        logs.configure(settings.log_format, verbose=args.verbose)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return int(module.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
