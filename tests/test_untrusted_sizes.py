"""Sizes read from an adapter's files are untrusted: every one is compared with the others and with the
model before anything is allocated, so a small file cannot make loading allocate gigabytes.

Each load runs in a fresh process whose address space is capped (RLIMIT_AS) at what it already uses plus
`HEADROOM`: an allocation of the size a hostile file asks for would fail there with a MemoryError or a
RuntimeError instead of the AdapterLoadError the contract promises. The process also reports how much its
peak resident memory grew during the refused loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADROOM = 256 * 2**20
# Below what the hostile sizes would take (the smallest, r = 3,000,000 over these 8-wide layers, 96 MB for
# vera_A alone; loading them all before the sizes were checked grew the peak by 244 MB); far above the few
# kilobytes a refused load of these files needs, allowing for the allocator's granularity.
PEAK_GROWTH_LIMIT = 32 * 2**20

# Runs in the capped process: saves a small adapter (save_projection False: the projections are regenerated
# from the sizes in the files), makes each hostile variant, caps memory, loads each, prints the outcomes.
SCRIPT = r"""
import json, resource, struct, sys, warnings
from pathlib import Path
import torch
from torch import nn
from veralab import VeraConfig
from veralab.fast import VeraModel, get_model
from veralab.fast.errors import AdapterLoadError

warnings.simplefilter("ignore")
root, headroom = Path(sys.argv[1]), int(sys.argv[2])

def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))

def header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]

def write_header(path, head, rest):
    encoded = json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + rest)

def variant(name, edit_config=None, edit_header=None):
    directory = root / name
    model = get_model(base(), VeraConfig(r=4, target_modules=["0", "1"], save_projection=False))
    model.save_pretrained(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if edit_config:
        config = json.loads(config_path.read_text())
        edit_config(config)
        config_path.write_text(json.dumps(config))
    if edit_header:
        head, rest = header(weights_path)
        edit_header(head)
        write_header(weights_path, head, rest)
    return directory

def fingerprint_shape(head, key, shape):
    record = json.loads(head["__metadata__"]["veralab_projections"])
    record[key] = shape
    head["__metadata__"]["veralab_projections"] = json.dumps(record)

def all_lambdas_d(head, size):
    for key, entry in head.items():
        if key.endswith("vera_lambda_d"):
            entry["shape"] = [size]

BIG = 3_000_000
variants = {
    "config r of 3,000,000": variant("r", lambda c: c.update(r=BIG)),
    "config r of 3,000,000 and lambda_d shapes to match": variant(
        "r-and-shapes", lambda c: c.update(r=BIG), lambda h: all_lambdas_d(h, BIG)
    ),
    "fingerprint vera_A_shape (4, 3,000,000)": variant(
        "fingerprint-A", edit_header=lambda h: fingerprint_shape(h, "vera_A_shape", [4, BIG])
    ),
    "fingerprint vera_B_shape (3,000,000, 4)": variant(
        "fingerprint-B", edit_header=lambda h: fingerprint_shape(h, "vera_B_shape", [BIG, 4])
    ),
    "config r of 10**12": variant("r-huge", lambda c: c.update(r=10**12)),
    "a lambda_b shape of 10**12": variant(
        "shape-huge", edit_header=lambda h: h["base_model.model.0.vera_lambda_b"].update(shape=[10**12])
    ),
}
targets = {name: base() for name in variants}
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + headroom, resource.RLIM_INFINITY))
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
outcomes = {}
for name, directory in variants.items():
    try:
        VeraModel.from_pretrained(targets[name], directory)
        outcomes[name] = "loaded"
    except AdapterLoadError as e:
        outcomes[name] = "AdapterLoadError: " + str(e)
    except BaseException as e:
        outcomes[name] = f"escaped {type(e).__name__}: {e}"
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
print(json.dumps({"outcomes": outcomes, "peak_growth": growth}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads its own memory use from /proc")
@pytest.mark.fault(
    "file",
    "sizes in the files that would allocate gigabytes: `r` of 3,000,000 or 10**12 in adapter_config.json "
    "(save_projection=False), lambda shapes raised to match, projection shapes in the fingerprint metadata, "
    "a tensor shape of 10**12 in the safetensors header; loaded under an address-space cap of 256 MiB above "
    "the process's use",
    "AdapterLoadError naming the file and the size, before anything is allocated (peak memory grows by "
    "under 32 MiB)",
)
def test_hostile_sizes_are_refused_before_allocation_under_a_memory_cap(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(HEADROOM)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, outcome in report["outcomes"].items():
        assert outcome.startswith("AdapterLoadError: "), (name, outcome)
        assert str(tmp_path) in outcome, (name, outcome)
    assert report["peak_growth"] < PEAK_GROWTH_LIMIT, report
