"""The fault tests' shared run: packed once per session (see launching.py)."""
from pathlib import Path

import pytest

from launching import write_tiny_config


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_config(tmp_path_factory.mktemp("faults"))
