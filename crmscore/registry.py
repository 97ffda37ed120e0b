"""``crmscore models show|promote``: the served model bundle and the frozen-mode candidate.

With ``CRMSCORE_MODEL_UPDATES=frozen`` the flow scores with the bundle that was served
when it started and keeps learning a candidate beside it (flows/model_registry.py).
``show`` prints both; ``promote`` makes the candidate the served bundle, atomically and
only if it is newer. Frozen flow processes take it at their next start; live ones at
their next refresh.
"""

from __future__ import annotations

import argparse

from crmscore.clients import RedisClient, redis_client
from crmscore.layout import RedisLayout
from crmscore.settings import Settings
from flows.model_registry import load_published

# KEYS: candidate, served. Copies the candidate over the served bundle if it is newer.
PROMOTE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
local served = redis.call('HGET', KEYS[2], 'v')
if served and tonumber(served) >= tonumber(v) then return 0 end
redis.call('HSET', KEYS[2], 'v', v, 'doc', redis.call('HGET', KEYS[1], 'doc'))
return 1
"""


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    parser.add_argument("action", choices=["show", "promote"],
                        help="show the served bundle and the candidate, or promote the candidate")
    add_setting_flags(parser, "redis_url", "redis_prefix", "redis_cluster")


def describe(client: RedisClient, key: str) -> str:
    bundle = load_published(client, key)
    if bundle is None:
        return "none"
    return f"version {bundle.version}, {bundle.model_version} (champion: {bundle.champion})"


def run(args: argparse.Namespace, settings: Settings) -> int:
    client = redis_client(settings)
    layout = RedisLayout(settings.redis_prefix)
    served, candidate = layout.model_bundle(), layout.model_candidate()
    if args.action == "promote":
        outcome = int(client.eval(PROMOTE, 2, candidate, served))
        if outcome < 0:
            print(f"no candidate at {candidate}: is a flow running with "
                  "CRMSCORE_MODEL_UPDATES=frozen against this Redis and prefix?")
            return 1
        print("promoted the candidate" if outcome else
              "not promoted: the served bundle is as new as the candidate")
    print(f"served    ({served}): {describe(client, served)}")
    print(f"candidate ({candidate}): {describe(client, candidate)}")
    return 0
