"""``crmscore keys new --role reader``: a fresh API key and its CRMSCORE_API_KEYS entry.

The key is printed once, here; the server stores only its SHA-256 (the entry).
"""

from __future__ import annotations

import argparse

from crmscore.settings import Settings
from serving.auth import RANK, entry, new_key


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = sub.add_parser("new", help="create a key", description="create an API key")
    new.add_argument("--role", choices=list(RANK), default="reader",
                     help="reader: scores, watch, segments; admin: also status and model "
                     "reports (default: reader)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    key = new_key()
    config = entry(args.role, key)
    print(f"API key ({args.role}), shown only now; give it to the client:\n  {key}\n")
    print("Add this entry to the server's CRMSCORE_API_KEYS (comma-separated):")
    print(f"  {config}\n")
    print("Clients send it as metadata:  authorization: Bearer <key>")
    return 0
