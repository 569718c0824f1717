"""mkdocs hooks: the site shows what the notebooks compute, and reads offline.

- The notebooks are committed without outputs. `on_config` runs each one (nbclient, a fresh kernel of the
  running interpreter; one at a time, or VERALAB_DOCS_WORKERS) into a temporary folder, and `on_files`
  points the notebook pages at the executed copies, so every figure and printed table appears on its page.
  A failing cell fails the build. `VERALAB_DOCS_EXECUTE=false` renders the notebooks as committed, for a
  quick look at prose edits.
- A widget needs a running kernel, and nbclient now and then stalls for good on ipywidgets' messages (a
  known nbclient problem; nbval, which runs the same cells in CI, does not). So cells tagged `widget`, those
  that build or move a control, are not run here: the one that displays the control shows a note instead,
  next to the static figure at the default values that each widget of the notebooks has. A widget shown by
  an untagged cell fails the build, naming the cell.
- Notebook pages link to each other as `NN_topic.ipynb` and to the site's pages as `../docs/page.md`,
  which work in Jupyter; on the site the links are rewritten to the pages, and a link to a notebook or
  page that does not exist fails the build.
- No page loads anything from the network: mkdocs-jupyter's CDN scripts (MathJax 2, mermaid) are dropped,
  and MathJax 3 is served from the site itself, copied from the `django-static-mathjax` package (plain
  MathJax files; Django is neither needed nor imported).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import re
import tempfile
import time
from pathlib import Path

import ipykernel.kernelspec
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
from traitlets import default

log = logging.getLogger("mkdocs.hooks.notebooks")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
MATHJAX_SITE_PATH = "assets/mathjax/tex-svg.js"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_TAG = "widget"
# transformers' progress bars (loading weights) and every other tqdm bar, off in the site's kernels.
KERNEL_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
WIDGET_NOTE = (
    "<p><em>An interactive control is here when the notebook runs in Jupyter; the figure above shows "
    "its default values.</em></p>"
)
# A cell may compute for a while (notebook 06 fine-tunes a small model); a hanging cell still ends.
CELL_TIMEOUT_S = 600
# One notebook at a time unless asked (beside the test suite, one core is the build's).
WORKERS = int(os.environ.get("VERALAB_DOCS_WORKERS", "1"))

_executed: dict[str, Path] = {}
_scratch: tempfile.TemporaryDirectory | None = None


def _execute_enabled() -> bool:
    return os.environ.get("VERALAB_DOCS_EXECUTE", "true").lower() not in ("0", "false", "no")


class ThisInterpreterKernels(KernelSpecManager):
    """Kernel specs that start this interpreter's ipykernel, whatever kernel name a notebook asks for.

    The site must show what the veralab of this environment computes, not whatever `python3` kernel
    Jupyter happens to find on the machine (nbval's `--nbval-current-env` makes the same choice).
    """

    def get_kernel_spec(self, kernel_name):
        return self.kernel_spec_class(
            resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
        )


class ThisInterpreterKernelManager(AsyncKernelManager):
    @default("kernel_spec_manager")
    def _kernel_spec_manager_default(self):
        return ThisInterpreterKernels()


def note_skipped_widgets(notebook: nbformat.NotebookNode, name: str) -> None:
    """Give the skipped cell that displays a control the note in its place; refuse a widget shown by a cell
    that ran (it is missing its tag, and would show as a dead control)."""
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if WIDGET_TAG in cell.metadata.get("tags", []):
            if "display(" in cell.source:
                note = {"text/html": WIDGET_NOTE, "text/plain": "interactive control"}
                cell.outputs = [nbformat.v4.new_output("display_data", data=note)]
        elif any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", [])):
            raise PluginError(
                f"notebooks/{name}: code cell {index} shows a widget but is not tagged {WIDGET_TAG!r}; "
                f'tag it (# %% tags=["{WIDGET_TAG}"] in the .py, then jupytext --sync) with every cell '
                "that moves its controls"
            )
    notebook.metadata.pop("widgets", None)


def execute_notebook(source: Path, target: Path) -> float:
    """Run `source` top to bottom in its own folder and write the executed copy to `target`.

    Args:
        source: a notebook of notebooks/.
        target: where the executed copy goes.

    Returns:
        The seconds it took.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    start = time.perf_counter()
    notebook = nbformat.read(source, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_manager_class=ThisInterpreterKernelManager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(source.parent)}},
        skip_cells_with_tag=WIDGET_TAG,
    )
    try:
        client.execute()
    except CellExecutionError as error:
        raise PluginError(f"notebooks/{source.name} failed while the site was built:\n{error}") from error
    note_skipped_widgets(notebook, source.name)
    nbformat.write(notebook, target)
    return time.perf_counter() - start


def _execute_in_child(source: Path, target: Path, results) -> None:
    # Progress bars are widgets too in a kernel (tqdm.auto): they are left out of the site's run, the
    # kernel inheriting this process's environment.
    os.environ.update(KERNEL_ENVIRONMENT)
    try:
        results.put((source.name, execute_notebook(source, target), None))
    except Exception as error:  # reported to the parent, which fails the build with it
        results.put((source.name, None, f"{type(error).__name__}: {error}"))


def run_in_processes(sources: list[Path], targets: list[Path], workers: int) -> dict[str, float]:
    """Execute each source into its target, `workers` at a time, each in a forked process.

    Processes, not threads: each notebook gets its own event loop and ZeroMQ sockets (nbclient in threads
    of one process can wait forever for a reply that came). Forked, so the children need nothing pickled
    but the results.

    Returns:
        {notebook file name: seconds it took}.
    """
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    pending = list(zip(sources, targets, strict=True))
    running: dict[str, multiprocessing.Process] = {}
    seconds: dict[str, float] = {}
    while pending or running:
        while pending and len(running) < workers:
            source, target = pending.pop(0)
            running[source.name] = context.Process(target=_execute_in_child, args=(source, target, results))
            running[source.name].start()
        try:
            name, took, error = results.get(timeout=5)
        except queue.Empty:
            ended = [(name, p.exitcode) for name, p in running.items() if p.exitcode is not None]
            if ended:  # ended without a result: killed, or crashed
                raise PluginError(
                    f"executing notebooks/{ended[0][0]} ended with exit code {ended[0][1]}"
                ) from None
            continue
        running.pop(name).join()
        if error is not None:
            for process in running.values():
                process.terminate()
            raise PluginError(error)
        seconds[name] = took
    return seconds


def on_config(config):
    global _scratch
    _executed.clear()
    if not _execute_enabled():
        log.info("VERALAB_DOCS_EXECUTE=false: notebooks are rendered as committed, without outputs")
        return config
    _scratch = tempfile.TemporaryDirectory(prefix="veralab-docs-notebooks-")
    sources = sorted(NOTEBOOKS.glob("*.ipynb"))
    # Under a folder named notebooks/: mkdocs-jupyter's include pattern matches the executed copies too.
    (Path(_scratch.name) / "notebooks").mkdir()
    targets = [Path(_scratch.name) / "notebooks" / source.name for source in sources]
    start = time.perf_counter()
    seconds = run_in_processes(sources, targets, WORKERS)
    for source, target in zip(sources, targets, strict=True):
        took = seconds[source.name]
        _executed[source.name] = target
        log.info("executed notebooks/%s in %.1f s", source.name, took)
    log.info("executed %d notebooks in %.1f s", len(sources), time.perf_counter() - start)
    return config


def on_files(files, config):
    for file in files:
        if file.src_uri.startswith("notebooks/") and file.src_uri.endswith(".ipynb"):
            executed = _executed.get(Path(file.src_uri).name)
            if executed is not None:
                file.abs_src_path = str(executed)
    mathjax = Path(__import__("mathjax").__file__).parent / "static" / "mathjax" / "es5" / "tex-svg.js"
    files.append(File.generated(config, MATHJAX_SITE_PATH, abs_src_path=str(mathjax)))
    return files


_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>", re.IGNORECASE)
_INLINE_CDN_SCRIPT = re.compile(
    r"<script\b[^>]*>(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>", re.S
)
_MATHJAX2_CONFIG = re.compile(r"<script type=\"text/x-mathjax-config\">.*?</script>", re.S)
_NOTEBOOK_LINK = re.compile(r"href=\"(\d\d_[A-Za-z0-9_]+)\.ipynb(#[^\"]*)?\"")
# A notebook links to a page of the site as ../docs/page.md, which works from notebooks/ in Jupyter.
_DOCS_LINK = re.compile(r"href=\"\.\./docs/([A-Za-z0-9_/-]+)\.md(#[^\"]*)?\"")


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    html = _MATHJAX2_CONFIG.sub("", html)
    html = _CDN_SCRIPT.sub("", html)
    html = _INLINE_CDN_SCRIPT.sub("", html)

    def to_page(match: re.Match) -> str:
        stem, anchor = match.group(1), match.group(2) or ""
        if not (NOTEBOOKS / f"{stem}.ipynb").is_file():
            raise PluginError(f"{page.file.src_uri} links to {stem}.ipynb, which is not in notebooks/")
        return f'href="../{stem}/{anchor}"'

    def to_site_page(match: re.Match) -> str:
        page_path, anchor = match.group(1), match.group(2) or ""
        if not (Path(config["docs_dir"]) / f"{page_path}.md").is_file():
            raise PluginError(f"{page.file.src_uri} links to ../docs/{page_path}.md, which does not exist")
        url = "" if page_path == "index" else f"{page_path.removesuffix('/index')}/"
        return f'href="../../{url}{anchor}"'

    return _DOCS_LINK.sub(to_site_page, _NOTEBOOK_LINK.sub(to_page, html))


def on_post_build(config):
    global _scratch
    if _scratch is not None:
        _scratch.cleanup()
        _scratch = None
