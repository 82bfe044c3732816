"""Shared fixtures: a private cache directory and tiny models built from a config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep test caches (converted SmolLM2, statistics, templates) out of the user's cache."""
    old = os.environ.get("ROME_WORKBENCH_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["ROME_WORKBENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ROME_WORKBENCH_CACHE", None)
    else:
        os.environ["ROME_WORKBENCH_CACHE"] = old


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request: pytest.FixtureRequest):
    """A freshly built tiny model of each architecture (``LoadedModel``)."""
    from rome import load_model

    return load_model(f"tiny-{request.param}")


@pytest.fixture
def tiny_gpt2():
    from rome import load_model

    return load_model("tiny-gpt2")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh store file's path (the store's test modules)."""
    return tmp_path / "wb.db"


@pytest.fixture
def store(db_path: Path):
    """An open store on ``db_path``, closed after the test."""
    from workbench.store import Store

    with Store.open(db_path) as s:
        yield s
