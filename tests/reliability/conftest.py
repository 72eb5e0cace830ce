"""The reliability group: faults injected as a user's cluster would meet them (docs/reliability.md)."""

import pytest


def pytest_collection_modifyitems(items):
  for item in items:
    if "tests/reliability/" in str(item.fspath).replace("\\", "/"):
      item.add_marker(pytest.mark.reliability)
      item.add_marker(pytest.mark.slow)
