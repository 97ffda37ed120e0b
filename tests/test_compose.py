"""docker-compose.yml and the Dockerfile: the real deployment on a user's machine.

No Docker engine runs here, so validating the file with ``docker-compose config``
(Debian's 1.29 rejects unknown keys offline; ``scripts/test`` installs it) is the
test. A missing ``docker-compose`` fails the tests rather than skipping them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

CRMSCORE_SERVICES = {"topics": "topics", "flow": "flow", "serve": "serve"}


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    reason = os.environ.get("COMPOSE_INSTALL_ERROR", "")
    pytest.fail(
        "docker-compose is needed to validate docker-compose.yml and was not found"
        + (f" ({reason})" if reason else "")
        + ": run the suite with scripts/test (it installs Debian's docker-compose as root) "
        "or install it: apt-get install docker-compose",
        pytrace=False,
    )


def compose(*args: str) -> str:
    result = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    """Service name -> its block of the normalised ``docker-compose config`` output."""
    return service_blocks(compose("config"))


def service_blocks(config: str) -> dict[str, str]:
    """Split the normalised config (block YAML, two-space indent) into service blocks."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_services = False
    for line in config.splitlines():
        if not line.startswith(" "):
            in_services = line.rstrip() == "services:"
            current = None
            continue
        match = re.fullmatch(r"  ([\w.-]+):", line.rstrip())
        if in_services and match:
            current = blocks.setdefault(match.group(1), [])
        elif in_services and current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in blocks.items()}


def environment(block: str) -> dict[str, str]:
    """``environment:`` of one service block (compose normalises it to a mapping)."""
    env: dict[str, str] = {}
    inside = False
    for line in block.splitlines():
        if line.startswith("    ") and not line.startswith("     "):
            inside = line.strip() == "environment:"
            continue
        match = re.fullmatch(r"      ([A-Z0-9_]+): ?(.*)", line) if inside else None
        if match:
            env[match.group(1)] = match.group(2).strip("'\"")
    return env


def image(block: str) -> str:
    match = re.search(r"^    image: (\S+)$", block, re.MULTILINE)
    assert match, f"no image in:\n{block}"
    return match.group(1)


def test_compose_file_validates_and_lists_the_services() -> None:
    listed = set(compose("config", "--services").split())
    assert listed == {"kafka", "redis", *CRMSCORE_SERVICES}


def test_kafka_runs_apache_kafka_in_kraft_mode(services: dict[str, str]) -> None:
    kafka = services["kafka"]
    assert image(kafka).startswith("apache/kafka:")
    env = environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    # In-network clients reach the advertised listener at kafka:PORT.
    bootstrap = environment(services["flow"])["CRMSCORE_KAFKA_BOOTSTRAP"]
    assert f"PLAINTEXT://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck:" in kafka


def test_redis_is_redis_7_with_a_healthcheck(services: dict[str, str]) -> None:
    assert image(services["redis"]).startswith("redis:7")
    assert "healthcheck:" in services["redis"]


@pytest.mark.parametrize("service, command", sorted(CRMSCORE_SERVICES.items()))
def test_crmscore_services_build_the_image_and_run_their_command(
    services: dict[str, str], service: str, command: str
) -> None:
    block = services[service]
    assert "build:" in block and "context:" in block, f"{service} is not built from the Dockerfile"
    assert image(block) == "crmscore:latest"
    assert re.search(rf"^    command:\n    - crmscore\n    - {command}$", block, re.MULTILINE)
    env = environment(block)
    assert {"CRMSCORE_KAFKA_BOOTSTRAP", "CRMSCORE_REDIS_URL", "CRMSCORE_TRANSACTIONS_TOPIC",
            "CRMSCORE_DLQ_TOPIC"} <= set(env)
    assert all(name.startswith("CRMSCORE_") for name in env)
    assert env["CRMSCORE_REDIS_URL"].startswith("redis://redis:")


def test_start_order_follows_health(services: dict[str, str]) -> None:
    assert re.search(r"kafka:\n\s+condition: service_healthy", services["topics"])
    for name in ("flow", "serve"):
        block = services[name]
        assert re.search(r"topics:\n\s+condition: service_completed_successfully", block)
        assert re.search(r"redis:\n\s+condition: service_healthy", block)


def test_flow_keeps_recovery_on_a_named_volume(services: dict[str, str]) -> None:
    recovery = environment(services["flow"])["CRMSCORE_RECOVERY_DIR"]
    mounts = re.findall(r"^    - ([\w-]+):(/\S+?)(?::rw)?$", services["flow"], re.MULTILINE)
    assert any(recovery.startswith(target) for _, target in mounts), mounts
    assert set(compose("config", "--volumes").split()) >= {name for name, _ in mounts}


def test_flow_publishes_its_metrics(services: dict[str, str]) -> None:
    metrics = environment(services["flow"])["CRMSCORE_FLOW_METRICS_PORT"]
    assert re.search(rf"published: {metrics}\n\s+target: {metrics}", services["flow"])


def test_server_publishes_grpc_and_checks_health(services: dict[str, str]) -> None:
    serve = services["serve"]
    assert environment(serve)["CRMSCORE_GRPC_ADDRESS"] == "0.0.0.0:50051"
    assert re.search(r"published: 50051\n\s+target: 50051", serve) or "50051:50051" in serve
    assert "healthcheck:" in serve and "grpc_health" in serve
    metrics = environment(serve)["CRMSCORE_METRICS_PORT"]
    assert re.search(rf"published: {metrics}\n\s+target: {metrics}", serve), "metrics port"


def test_dockerfile_installs_the_package_as_a_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert re.search(r"^RUN pip install \.(\s|$)", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    # Everything pip install . needs is copied into the image.
    copied = set(re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE))
    sources = {src for line in copied for src in line.split()}
    for needed in ("pyproject.toml", "crmscore", "flows", "models", "serving", "schemas"):
        assert needed in sources, f"the Dockerfile does not copy {needed}"
    missing = sorted(src for src in sources if not (ROOT / src).exists())
    assert not missing, f"the Dockerfile copies files that do not exist: {missing}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
