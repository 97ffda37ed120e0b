"""``crmscore topics``: create the service's topics ahead of time."""

from __future__ import annotations

import argparse

from crmscore.clients import ensure_topics
from crmscore.settings import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    from crmscore.cli import add_setting_flags

    add_setting_flags(
        parser, "kafka_bootstrap", "transactions_topic", "dlq_topic", "alerts_topic",
        "timers_topic",
        "topic_partitions",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    topics = [settings.transactions_topic, settings.dlq_topic, settings.alerts_topic,
              settings.timers_topic]
    ensure_topics(settings, topics)
    print("topics ready:", ", ".join(topics))
    return 0
