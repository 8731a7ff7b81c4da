"""Shared pytest fixtures."""

from pathlib import Path

import pytest

from whisper_ptq.results import environment


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared sample data folder next to the repository (see docs/ARCHITECTURE.md); never copied."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared sample data not found at {root}")
    return root


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whisper-ptq cache dir shared by the test session, so each packaged model is converted only once."""
    return tmp_path_factory.mktemp("whisper-ptq-cache")


@pytest.fixture
def no_isa_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that give CPU flags themselves: the caps of the environment would lower what they state."""
    for variable in environment.isa_variables():
        monkeypatch.delenv(variable, raising=False)
