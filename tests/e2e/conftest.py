"""The e2e tier's shared fixture: the shapes data and a tiny model, once per test module."""

from __future__ import annotations

import pytest
from shapes_runs import make_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_setup(tmp_path_factory.mktemp("shapes"))
