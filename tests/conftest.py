"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small inputs gain nothing from a second thread, and on a shared, loaded CPU its barrier waits cost 10x
    or more: a module that asks for it (``pytestmark = pytest.mark.usefixtures("one_thread")``) runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
