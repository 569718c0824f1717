"""Test-suite plumbing: one torch thread for the tiny test models, and `--fault-catalog PATH`, which writes
the
reliability page from the collected fault markers."""

import os
from pathlib import Path

import torch
from fault_catalog import AREAS, faults_from_items, render_markdown
from site_build import SITE_BUILD, SITE_SCREENSHOTS, start_site_build


def pytest_configure(config):
    # The tests' matmuls are tiny: on a 2-core machine a second thread only spin-waits (the suite runs
    # markedly faster on one). Benchmarks and multi-process tests run in their own processes.
    torch.set_num_threads(1)
    # The notebooks' kernels, which nbval starts as child processes, inherit this: under nbval on a busy
    # 2-core
    # machine, notebook 05 took 62 s with two threads and 12 s with one.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--fault-catalog",
        metavar="PATH",
        default=None,
        help="write the reliability catalog (docs/reliability.md) generated from the fault markers to PATH",
    )


def is_site_test(item) -> bool:
    return item.nodeid.startswith("tests/test_docs_build.py")


def pytest_collection_modifyitems(config, items):
    # The site's tests run last, so that its background build (see pytest_collection_finish) overlaps the
    # rest of the suite.
    items[:] = [item for item in items if not is_site_test(item)] + [
        item for item in items if is_site_test(item)
    ]
    path = config.getoption("--fault-catalog")
    if path is None:
        return
    faults = faults_from_items(items)
    unknown = sorted({f.area for f in faults} - set(AREAS))
    if unknown:
        raise ValueError(f"fault markers with unknown area(s) {unknown}; use one of {sorted(AREAS)}")
    Path(path).write_text(render_markdown(faults), encoding="utf-8")


def pytest_collection_finish(session):
    # The site's build executes the notebooks: started now, it runs beside the unit tests (see site_build.py).
    if any(is_site_test(item) for item in session.items):
        session.config.stash[SITE_BUILD] = start_site_build(workers=1)


def pytest_sessionfinish(session):
    build = session.config.stash.get(SITE_BUILD, None)
    if build is not None:
        build.remove()


def pytest_terminal_summary(terminalreporter, config):
    screenshots = config.stash.get(SITE_SCREENSHOTS, None)
    if screenshots is not None:
        terminalreporter.write_line(f"screenshots of the site's pages (kept for CI): {screenshots}")
