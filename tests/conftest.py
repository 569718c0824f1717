"""Test-suite plumbing: `--fault-catalog PATH` writes the reliability page from the collected fault markers;
the `one_torch_thread` fixture for modules of tiny models."""

from pathlib import Path

import pytest
import torch
from fault_catalog import AREAS, faults_from_items, render_markdown


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a busy 2-core machine spend their time spin-waiting between threads: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--fault-catalog", metavar="PATH", default=None,
        help="write the reliability catalog (docs/reliability.md) generated from the fault markers to PATH",
    )


def pytest_collection_modifyitems(config, items):
    path = config.getoption("--fault-catalog")
    if path is None:
        return
    faults = faults_from_items(items)
    unknown = sorted({f.area for f in faults} - set(AREAS))
    if unknown:
        raise ValueError(f"fault markers with unknown area(s) {unknown}; use one of {sorted(AREAS)}")
    Path(path).write_text(render_markdown(faults), encoding="utf-8")
