"""docker-compose.yml describes a deployment that can start: no Docker engine runs here, so
its structure is checked instead: services, pinned images, health checks and the conditions
that use them, ipbatch commands the CLI accepts, the GPU reservation, and settings that all
come from .env.example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ipbatch.cli import build_parser
from workers.celery_app import QUEUES

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _defaults(text: str) -> str:
    """${VAR:-default} -> default, ${VAR:?message} -> a placeholder: what compose would pass."""
    text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{[A-Z0-9_]+:\?[^}]*\}", "value", text)


def test_every_service_of_a_deployment_is_there(compose: dict) -> None:
    assert set(compose["services"]) == {
        "postgres",
        "rabbitmq",
        "minio",
        "create-bucket",
        "migrate",
        "producer",
        "embed-worker",
        "generate-worker",
        "train-worker",
        "reaper",
        "flower",
    }


def test_images_are_pinned_or_built_here(compose: dict) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        if "build" in service:
            assert image.startswith("ipbatch:"), name
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin {image}"


def test_dependencies_wait_for_health_or_completion(compose: dict) -> None:
    services = compose["services"]
    one_shot = {name for name, s in services.items() if s.get("restart") in (None, "no")}
    assert {"migrate", "create-bucket"} <= one_shot
    for name in ("postgres", "rabbitmq", "minio"):
        assert services[name]["healthcheck"]["test"], name
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            else:
                assert condition == "service_completed_successfully", (name, condition)
                assert dependency in one_shot, (name, dependency)
    for name in ("producer", "embed-worker", "generate-worker", "reaper"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_ipbatch_commands_exist_in_the_cli(compose: dict) -> None:
    parser = build_parser()
    queues: set[str] = set()
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        argv = [_defaults(str(part)) for part in service["command"]]
        args = parser.parse_args(argv)  # exits (fails the test) on an unknown command
        assert callable(args.func), name
        if argv[0] == "worker":
            queues |= set(args.queues.split(","))
        assert service["volumes"] == ["${MODELS_DIR:-./models}:/models:ro", "ipbatchdata:/data"]
        assert service["environment"]["IPBATCH_MODELS"] == "/models"
    assert queues == set(QUEUES)  # every queue has a worker


def test_generate_worker_reserves_a_gpu(compose: dict) -> None:
    service = compose["services"]["generate-worker"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service["environment"]["IPBATCH_DEVICE"] == "cuda"
    assert "--concurrency" in service["command"]
    assert service["command"][service["command"].index("--concurrency") + 1] == "1"
    assert compose["services"]["embed-worker"]["environment"]["IPBATCH_DEVICE"] == "cpu"


def test_settings_come_from_env_example_and_secrets_are_never_written_in(compose: dict) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    documented = {
        line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")
    }
    used = set(VARIABLE.findall(text))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    for secret in (
        "POSTGRES_PASSWORD",
        "RABBITMQ_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "FLOWER_PASSWORD",
    ):
        assert re.search(rf"\$\{{{secret}:\?", text), f"{secret} must be required, no default"
        assert not re.search(rf"\$\{{{secret}:-", text), f"{secret} has a default"


def test_the_image_installs_the_packages_and_the_pinned_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    [torch_pin] = set(re.findall(r"torch==[0-9.]+", makefile))  # one pin, for every venv
    assert torch_pin in dockerfile
    for package in ("core", "ipbatch", "pipeline", "storage", "workers", "migrations"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert 'ENTRYPOINT ["ipbatch"]' in dockerfile


IPBATCH_SERVICES = (
    "migrate",
    "producer",
    "embed-worker",
    "generate-worker",
    "train-worker",
    "reaper",
)


def test_the_deployment_is_safe_by_default(compose: dict) -> None:
    """The image writes only under a volume its user owns; trained adapters reach the generate
    workers; Flower asks for a password; PostgreSQL's superuser port stays on the host."""
    services = compose["services"]
    for name in IPBATCH_SERVICES:
        env = services[name]["environment"]
        assert env["IPBATCH_HOME"] == "/data", name
        assert "ipbatchdata:/data" in services[name]["volumes"], name
        assert _defaults(env["IPBATCH_ADAPTERS_URI"]).startswith("s3://"), name
    assert "ipbatchdata" in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "chown ipbatch:ipbatch /data" in dockerfile and "ENV IPBATCH_HOME=/data" in dockerfile
    assert dockerfile.index("chown ipbatch:ipbatch /data") < dockerfile.index("USER ipbatch")
    flower = " ".join(services["flower"]["command"])
    assert "--basic-auth=${FLOWER_USER:-ipbatch}:${FLOWER_PASSWORD:?" in flower
    for port in services["postgres"]["ports"]:
        assert port.startswith("127.0.0.1:"), port
    for name in ("embed-worker", "generate-worker"):  # healthy = taking work
        [probe] = [arg for arg in services[name]["healthcheck"]["test"] if "readyz" in arg]
        assert "http://127.0.0.1:9100/readyz" in probe
        assert services[name]["environment"]["IPBATCH_METRICS_PORT"] == "9100"
