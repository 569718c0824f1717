"""Atomic adapter directories: a save killed (SIGKILL) at any instant leaves the whole old adapter or the
whole new one, a reader concurrent with a writer sees one of them, and no staging debris survives the next
save or load.

The savers are processes killed for real. `save_pretrained` is `veralab.atomic.update_files(directory,
adapter_files(model, name))`: the bytes are built first, and every filesystem operation of the save is in
`update_files`. So the killed savers run `update_files` with the very bytes `save_pretrained` writes, in a
small helper process (it imports `veralab.atomic` only, no torch) that forks one saver per kill: a fork of
the test process itself, with torch loaded, would cost tens of milliseconds a kill. A saver is killed just
before each filesystem operation in turn (a Python audit hook sends SIGKILL to its own process), or at
staggered delays while it saves two versions in turn, or keeps saving while this process loads.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import randomize_lambdas
from torch import nn

from veralab import VeraConfig
from veralab.app.outputs import retired_by_merge
from veralab.atomic import COMMIT_MARKER, STAGING_NAME, update_files
from veralab.fast import VeraModel, get_model
from veralab.fast.layout import CONFIG_NAME, WEIGHTS_NAME
from veralab.fast.saving import adapter_files, adapter_tensors

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked savers (POSIX only)"),
    pytest.mark.filterwarnings("ignore:save_projection=False:UserWarning"),
]
REPO = Path(__file__).resolve().parents[1]

# The helper: reads one JSON request a line, answers one JSON line. Requests:
#   {"op": "save", "directory", "files": {name: path of its bytes}, "retire": [names] | null,
#    "kill_before": k | null}  -> fork a saver (killed just before its k-th filesystem operation), wait
#   {"op": "save_for_ever", "directory", "versions": [files, files]} -> fork a saver alternating them
#   {"op": "reap", "pid"} -> wait for a saver the test killed
HELPER = r"""
import json, os, signal, sys
from veralab.atomic import update_files

FILESYSTEM_EVENTS = ("open", "os.", "fcntl.", "shutil.")

def read(files):
    return {name: open(path, "rb").read() for name, path in files.items()}

def die_before(k):
    seen = [0]
    def hook(event, args):
        if event.startswith(FILESYSTEM_EVENTS):
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
    sys.addaudithook(hook)

def fork(body):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid

def ended(pid):
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "save":
        files, retire = read(request["files"]), request["retire"]
        def save():
            if request["kill_before"] is not None:
                die_before(request["kill_before"])
            update_files(request["directory"], files, None if retire is None else set(retire).__contains__)
        answer = {"ended": ended(fork(save))}
    elif request["op"] == "save_for_ever":
        versions = [read(files) for files in request["versions"]]
        def save_for_ever():
            while True:
                for files in versions:
                    update_files(request["directory"], files)
        answer = {"pid": fork(save_for_ever)}
    else:
        answer = {"ended": ended(request["pid"])}
    print(json.dumps(answer), flush=True)
"""


class Savers:
    """The helper process, and the requests the tests send it."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", HELPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def stored(self, label: str, files: dict[str, bytes]) -> dict[str, str]:
        """Put each file's bytes where the helper reads them."""
        paths = {}
        for name, data in files.items():
            path = self.scratch / f"{label}-{name}"
            path.write_bytes(data)
            paths[name] = str(path)
        return paths

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def save(self, directory: Path, files: dict[str, str], kill_before: int | None, retire=None) -> int:
        return self.request(
            op="save", directory=str(directory), files=files, retire=retire, kill_before=kill_before
        )["ended"]

    def save_for_ever(self, directory: Path, versions: list[dict[str, str]]) -> int:
        return self.request(op="save_for_ever", directory=str(directory), versions=versions)["pid"]

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.request(op="reap", pid=pid)["ended"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture
def savers(tmp_path):
    scratch = tmp_path / "bytes"
    scratch.mkdir()
    helper = Savers(scratch)
    yield helper
    helper.close()


def tiny_base() -> nn.Module:
    return nn.Sequential(OrderedDict(q_proj=nn.Linear(8, 8), k_proj=nn.Linear(8, 6), v_proj=nn.Linear(8, 6)))


def adapter(targets: list[str], seed: int) -> VeraModel:
    model = get_model(tiny_base(), VeraConfig(r=4, target_modules=targets, save_projection=False))
    randomize_lambdas(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def versions() -> dict[str, VeraModel]:
    """The old and the new adapter; with other targets too, so a mix of their two files cannot load."""
    return {
        "old": adapter(["q_proj", "v_proj"], seed=1),
        "new": adapter(["q_proj", "k_proj", "v_proj"], seed=2),
    }


EXTRA_FILES = {"README.md": b"the user's notes\n", "other/adapter_config.json": b"{}\n"}


def prepare(directory: Path, versions: dict[str, VeraModel]) -> None:
    """The old adapter in a root that also holds another adapter's directory and a README."""
    for name, data in EXTRA_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    versions["old"].save_pretrained(directory)


def contents(files: dict[str, bytes]) -> dict[str, object]:
    """What an adapter's files hold, exactly: the config's bytes, and the safetensors header (parsed: the
    writer orders its metadata entries differently from one call to the next) with the tensor bytes."""
    (length,) = struct.unpack("<Q", files[WEIGHTS_NAME][:8])
    header = json.loads(files[WEIGHTS_NAME][8 : 8 + length])
    return {CONFIG_NAME: files[CONFIG_NAME], "header": header, "data": files[WEIGHTS_NAME][8 + length :]}


def loaded_version(directory: Path, versions: dict[str, VeraModel]) -> str:
    """Load the directory and name the version whose lambdas came back, all of them; fails on a mix."""
    loaded = adapter_tensors(VeraModel.from_pretrained(tiny_base(), directory), "default")
    for name, model in versions.items():
        expected = adapter_tensors(model, "default")
        if loaded.keys() == expected.keys():
            assert all(torch.equal(loaded[k], expected[k]) for k in loaded), f"{name}: lambdas mixed"
            return name
    raise AssertionError(f"{directory} loaded neither version: {sorted(loaded)}")


def which_version(directory: Path, versions: dict[str, VeraModel]) -> str:
    """Load the directory (which completes or discards an interrupted save) and name the version it holds,
    whole: its two files exactly, and the loaded lambdas. Fails on a mix, debris, or a changed file."""
    name = loaded_version(directory, versions)
    assert not os.path.lexists(directory / STAGING_NAME), "staging debris survived a load"
    for extra, data in EXTRA_FILES.items():
        assert (directory / extra).read_bytes() == data, extra
    on_disk = {file: (directory / file).read_bytes() for file in (CONFIG_NAME, WEIGHTS_NAME)}
    assert contents(on_disk) == contents(adapter_files(versions[name], "default")), f"not {name} whole"
    return name


@pytest.mark.fault(
    "file",
    "SIGKILL of an adapter save just before each of its filesystem operations in turn (the adapter in a root "
    "that also holds another adapter and a README)",
    "the next load gets the whole old adapter or the whole new one, never a mix (old before the commit "
    "marker, new after it); no staging debris survives it; the other files are untouched",
)
def test_a_save_killed_before_any_of_its_steps_leaves_the_old_or_the_new_adapter_whole(
    tmp_path, versions, savers
):
    new = savers.stored("new", adapter_files(versions["new"], "default"))
    seen: dict[str, list[int]] = {"old": [], "new": []}
    for k in range(1, 200):
        directory = tmp_path / f"kill-{k}"
        prepare(directory, versions)
        ended = savers.save(directory, new, kill_before=k)
        assert ended in (-signal.SIGKILL, 0)
        seen[which_version(directory, versions)].append(k)
        if ended == 0:  # the save got past its last operation: it has been cut before every one
            break
    assert ended == 0 and len(seen["old"]) >= 10 and len(seen["new"]) >= 5, seen
    assert max(seen["old"]) < min(seen["new"]), (
        seen
    )  # once committed, a killed save completes on the next load


@pytest.mark.fault(
    "file",
    "SIGKILL of a process saving two adapter versions in turn, at 60 staggered instants",
    "every load after a kill gets one version whole; no staging debris survives it",
)
def test_saves_killed_at_staggered_instants_leave_one_version_whole(tmp_path, versions, savers):
    directory = tmp_path / "adapter"
    prepare(directory, versions)
    files = {name: adapter_files(model, "default") for name, model in versions.items()}
    start = time.perf_counter()
    for _ in range(10):
        update_files(directory, files["new"])
    one_save = (time.perf_counter() - start) / 10
    stored = [savers.stored(name, files[name]) for name in ("new", "old")]
    seen = set()
    for i in range(60):
        pid = savers.save_for_ever(directory, stored)
        time.sleep(4 * one_save * i / 60)  # from before the first save to the third
        assert savers.kill(pid) == -signal.SIGKILL
        seen.add(which_version(directory, versions))
    assert seen == {"old", "new"}


@pytest.mark.fault(
    "file",
    "loading while another process saves the same adapter directory over and over",
    "each load sees one version whole (the load holds a shared lock; a save holds it exclusively)",
)
def test_a_reader_concurrent_with_a_writer_sees_one_version_whole(tmp_path, versions, savers):
    directory = tmp_path / "adapter"
    prepare(directory, versions)
    stored = [savers.stored(name, adapter_files(versions[name], "default")) for name in ("new", "old")]
    pid = savers.save_for_ever(directory, stored)
    try:
        seen = [loaded_version(directory, versions) for _ in range(40)]
    finally:
        savers.kill(pid)
    assert set(seen) == {"old", "new"}, seen


def model_files(shards: int, seed: int) -> dict[str, bytes]:
    """A transformers model directory's files: the weights in `shards` files (with an index), a config."""
    generator = torch.Generator().manual_seed(seed)
    weights = {f"w{i}": torch.randn(64, generator=generator) for i in range(shards)}
    files = {"config.json": json.dumps({"veralab_merged_from": {"seed": seed}}).encode()}
    if shards == 1:
        files["model.safetensors"] = safetensors.torch.save(weights)
        return files
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for name, (key, tensor) in zip(names, weights.items(), strict=True):
        files[name] = safetensors.torch.save({key: tensor})
    files["model.safetensors.index.json"] = json.dumps(
        {"weight_map": dict(zip(weights, names, strict=True))}
    ).encode()
    return files


@pytest.mark.fault(
    "cli",
    "SIGKILL of `veralab merge` writing over an earlier, sharded merge, before each filesystem operation in "
    "turn",
    "the directory holds exactly the earlier merge's files or exactly the new ones (its stale shards retired "
    "with the commit), the user's other files kept; no staging debris after the next write",
)
def test_a_merge_output_killed_at_any_step_is_the_old_or_the_new_model_exactly(tmp_path, savers):
    old, new = model_files(shards=3, seed=1), model_files(shards=1, seed=2)
    notes = {"NOTES.txt": b"kept\n"}
    stored = savers.stored("new", new)
    retire = sorted(name for name in old if retired_by_merge(name))
    assert len(retire) == 4  # three shards and their index
    outcomes = []
    for k in range(1, 200):
        directory = tmp_path / f"merged-{k}"
        update_files(directory, {**old, **notes})
        ended = savers.save(directory, stored, kill_before=k, retire=retire)
        if os.path.lexists(directory / STAGING_NAME):
            outcomes.append(
                "committed" if (directory / STAGING_NAME / COMMIT_MARKER).exists() else "discarded"
            )
            update_files(directory, {})  # the next write (one with nothing to write) recovers first
        assert not os.path.lexists(directory / STAGING_NAME)
        found = {p.name: p.read_bytes() for p in directory.iterdir()}
        assert found in ({**old, **notes}, {**new, **notes}), sorted(found)
        if ended == 0:
            break
    assert ended == 0 and {"committed", "discarded"} <= set(outcomes), outcomes
