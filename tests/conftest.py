"""Fixtures every test may use: tiny models and reference images. The fixtures that need
services (PostgreSQL, RabbitMQ, Redis, an S3 server) are in integration/conftest.py, so a
test outside tests/integration cannot ask for them; every test there is marked `integration`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture()
def clock() -> Any:
    """A ManualClock: the ledger's time, moved by the test (leases are tested, not raced)."""
    from helpers.clock import ManualClock

    return ManualClock()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import write_tiny_models
    from workers.context import quiet_model_libraries

    quiet_model_libraries()
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture()
def reference_images(tmp_path: Path) -> dict[str, Path]:
    """Three distinct small reference images on disk."""
    from PIL import Image, ImageDraw

    paths = {}
    for name, colour in (("red", (200, 30, 40)), ("blue", (30, 60, 170)), ("green", (40, 150, 70))):
        image = Image.new("RGB", (96, 80), (240, 240, 235))
        ImageDraw.Draw(image).ellipse((10, 10, 80, 70), fill=colour)
        path = tmp_path / "refs" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        paths[name] = path
    return paths
