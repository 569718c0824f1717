"""Fuzzing adapter directories: every mutated adapter either loads (with finite outputs, identical ones when
nothing was mutated) or raises AdapterLoadError, and a failed load leaves the target model exactly as it was.

A case is a saved adapter (projections saved or regenerated from the key; one Embedding, one Linear and one
Conv1d layer adapted) with 0 to 3 mutations drawn by hypothesis: values and structure of
adapter_config.json, the safetensors header (shapes, dtypes, offsets, names, its length prefix), its
metadata (the projections' fingerprint included), tensor bytes (NaN/inf among them), truncation and raw
byte overwrites of either file. It is loaded either with `VeraModel.from_pretrained` into a fresh base or
with `load_adapter` into a model that already has an adapter. An *escape* is any other exception, a model
changed by a failed load, NaN/inf outputs without the warning that announces them, or an unmutated adapter
whose outputs differ.

`tests/test_fuzz_adapter_files.py` runs a few dozen cases in the suite; this script runs many:

    PYTHONPATH=. python benchmarks/fuzz_adapter_files.py [--cases 10000] [--seed 0]

It prints how many cases it tried, how they ended, and every escape (it exits 1 if there is one).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import platform
import shutil
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn

from veralab import VeraConfig
from veralab.fast import VeraModel, get_model
from veralab.fast.errors import AdapterLoadError
from veralab.fast.fingerprint import FINGERPRINT_KEY
from veralab.fast.layout import CONFIG_NAME, WEIGHTS_NAME


class EmbeddingLinearConv(nn.Module):
    """A small model with one layer of each VeRA layer class, in this order: an nn.Embedding (`embed`), an
    nn.Linear (`proj`) and an nn.Conv1d (`conv`) over the sequence; ids (batch, seq) -> (batch, 5, seq)."""

    TARGETS = ["embed", "proj", "conv"]

    def __init__(self, vocab: int = 11, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.conv = nn.Conv1d(width, 5, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.proj(self.embed(ids)).transpose(1, 2))


IDS = torch.tensor([[1, 4, 2, 9, 0], [3, 3, 10, 7, 5]])
CONFIG_KEYS = [
    "r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
    "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern",
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "auto_mapping", "revision",
]  # fmt: skip
FINGERPRINT_FIELDS = ["vera_A_shape", "vera_B_shape", "sha256", "projection_prng_key", "generator"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X"]
NON_FINITE = [struct.pack("<f", v) for v in (float("nan"), float("inf"), float("-inf"))]

SIZES = st.one_of(
    st.integers(-3, 40), st.sampled_from([2**31, 2**32 + 4, 3_000_000, 10**12, 2**63, 2**64 + 1])
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | SIZES
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["embed", "proj", "conv", "VERA", "LORA", ".*", "(a+)+$", "none", "F32"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
SHAPES = st.lists(SIZES, max_size=3) | JSON_VALUES
FILES = st.sampled_from([CONFIG_NAME, WEIGHTS_NAME])
FRACTIONS = st.floats(0, 1)

MUTATIONS = st.one_of(
    st.tuples(st.just("config-set"), st.sampled_from(CONFIG_KEYS) | st.text(max_size=8), JSON_VALUES),
    st.tuples(st.just("config-delete"), st.sampled_from(CONFIG_KEYS)),
    st.tuples(st.just("config-replace"), JSON_VALUES),
    st.tuples(st.just("header-shape"), st.integers(0, 20), SHAPES),
    st.tuples(st.just("header-dtype"), st.integers(0, 20), st.sampled_from(DTYPES) | JSON_VALUES),
    st.tuples(st.just("header-offsets"), st.integers(0, 20), st.lists(SIZES, max_size=3) | JSON_VALUES),
    st.tuples(st.just("header-delete"), st.integers(0, 20)),
    st.tuples(
        st.just("header-rename"),
        st.integers(0, 20),
        st.text(max_size=40) | st.sampled_from(["base_model.model.proj.vera_lambda_d", "vera_A", "x"]),
    ),
    st.tuples(
        st.just("metadata-set"),
        st.sampled_from([FINGERPRINT_KEY, "format"]) | st.text(max_size=6),
        JSON_VALUES,
    ),
    st.tuples(st.just("fingerprint-set"), st.sampled_from(FINGERPRINT_FIELDS), JSON_VALUES | SHAPES),
    st.tuples(st.just("header-length"), st.integers(-16, 2**64 - 1)),
    st.tuples(st.just("tensor-bytes"), FRACTIONS, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("tensor-non-finite"), FRACTIONS, st.sampled_from(NON_FINITE)),
    st.tuples(st.just("truncate"), FILES, FRACTIONS),
    st.tuples(st.just("raw-bytes"), FILES, FRACTIONS, st.binary(min_size=1, max_size=8)),
)
CASES = st.tuples(st.booleans(), st.booleans(), st.lists(MUTATIONS, max_size=3))


def _split(weights: bytes) -> tuple[object, bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _join(header: object, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _nth_tensor(header: dict, index: int) -> str | None:
    names = sorted(k for k in header if k != "__metadata__")
    return names[index % len(names)] if names else None


def mutate(files: dict[str, bytes], mutation: tuple) -> dict[str, bytes]:
    """`files` ({name: bytes} of an adapter directory) with one mutation applied (unchanged when it does
    not apply, e.g. a header edit once the header no longer parses)."""
    kind, *args = mutation
    files = dict(files)
    if kind.startswith("config-"):
        try:
            config = json.loads(files[CONFIG_NAME])
        except ValueError:
            return files
        if kind == "config-replace":
            config = args[0]
        elif isinstance(config, dict) and kind == "config-set":
            config[args[0]] = args[1]
        elif isinstance(config, dict):
            config.pop(args[0], None)
        files[CONFIG_NAME] = json.dumps(config).encode()
        return files
    if kind in ("truncate", "raw-bytes"):
        name, fraction = args[0], args[1]
        data = files[name]
        at = int(fraction * len(data))
        files[name] = data[:at] if kind == "truncate" else data[:at] + args[2] + data[at + len(args[2]) :]
        return files
    try:
        header, data = _split(files[WEIGHTS_NAME])
    except (ValueError, struct.error):
        return files
    if not isinstance(header, dict):
        return files
    if kind in ("tensor-bytes", "tensor-non-finite"):
        # A float32 value's position (aligned) for NaN/inf, any position for raw bytes.
        at = int(args[0] * max(len(data) - 4, 0))
        at = at - at % 4 if kind == "tensor-non-finite" else at
        data = data[:at] + args[1] + data[at + len(args[1]) :]
    elif kind == "header-length":
        files[WEIGHTS_NAME] = struct.pack("<Q", args[0] % 2**64) + files[WEIGHTS_NAME][8:]
        return files
    elif kind in ("metadata-set", "fingerprint-set"):
        metadata = header.setdefault("__metadata__", {})
        if not isinstance(metadata, dict):
            return files
        if kind == "metadata-set":
            metadata[args[0]] = args[1]
        else:
            try:
                record = json.loads(metadata[FINGERPRINT_KEY])
            except (KeyError, TypeError, ValueError):
                return files
            if isinstance(record, dict):
                record[args[0]] = args[1]
            metadata[FINGERPRINT_KEY] = json.dumps(record)
    else:
        name = _nth_tensor(header, args[0])
        if name is None or not isinstance(header[name], dict):
            return files
        if kind == "header-shape":
            header[name]["shape"] = args[1]
        elif kind == "header-dtype":
            header[name]["dtype"] = args[1]
        elif kind == "header-offsets":
            header[name]["data_offsets"] = args[1]
        elif kind == "header-delete":
            del header[name]
        else:
            header[args[1]] = header.pop(name)
    files[WEIGHTS_NAME] = _join(header, data)
    return files


def _model_state(model: nn.Module) -> tuple:
    return (
        [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        [(n, b.detach().clone()) for n, b in model.named_buffers()],
        (list(getattr(model, "peft_config", {})), getattr(model, "active_adapters", None)),
    )


def _same_state(a: tuple, b: tuple) -> bool:
    if a[0] != b[0] or a[3] != b[3]:
        return False
    for kind in (1, 2):
        if [e[0] for e in a[kind]] != [e[0] for e in b[kind]]:
            return False
        for x, y in zip(a[kind], b[kind], strict=True):
            if not torch.equal(x[1], y[1]) or x[2:] != y[2:]:
                return False
    return True


@dataclass
class Fuzzer:
    """The saved adapters every case starts from, the targets, and a tally of the outcomes."""

    scratch: Path
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    escapes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.base = EmbeddingLinearConv().eval()
        self.originals, self.expected = {}, {}
        for save_projection in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = VeraConfig(
                    r=4, target_modules=EmbeddingLinearConv.TARGETS, save_projection=save_projection
                )
                model = get_model(copy.deepcopy(self.base), config)
            with torch.no_grad():
                for name, param in sorted(model.named_parameters()):
                    if "vera_lambda_" in name:
                        param.copy_(torch.randn(param.shape) * 0.5)
            directory = self.scratch / f"original-{save_projection}"
            model.save_pretrained(directory)
            self.originals[save_projection] = {
                n: (directory / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)
            }
            with torch.no_grad():
                self.expected[save_projection] = model.eval()(IDS)
        self.cases = 0

    def target(self, into_existing: bool) -> nn.Module:
        """A fresh base, or a model that already holds an adapter of its own (default lambdas)."""
        base = copy.deepcopy(self.base)
        if not into_existing:
            return base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_model(base, VeraConfig(r=4, target_modules=EmbeddingLinearConv.TARGETS)).eval()

    def run(self, save_projection: bool, into_existing: bool, mutations: list[tuple]) -> str | None:
        """Load one mutated adapter; returns the escape (a description) or None, and tallies the outcome."""
        self.cases += 1
        original = self.originals[save_projection]
        files = original
        for mutation in mutations:
            files = mutate(files, mutation)
        directory = Path(tempfile.mkdtemp(dir=self.scratch))
        for name, data in files.items():
            (directory / name).write_bytes(data)
        target = self.target(into_existing)
        before = _model_state(target)
        escape = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if into_existing:
                    target.load_adapter(directory, "fuzzed")
                    target.set_adapter("fuzzed")
                    loaded = target
                else:
                    loaded = VeraModel.from_pretrained(target, directory)
            except AdapterLoadError as e:
                outcome = "refused"
                if str(directory) not in str(e):
                    escape = f"AdapterLoadError not naming the file: {e}"
                elif not _same_state(_model_state(target), before):
                    escape = f"the model changed although the load failed ({e})"
            except Exception as e:  # noqa: BLE001 - anything else escaped the contract
                outcome = "escaped"
                escape = f"{type(e).__name__}: {e}"
            else:
                outcome = "loaded"
                with torch.no_grad():
                    output = loaded.eval()(IDS)
                flagged = any("NaN/inf" in str(w.message) for w in caught)
                if not flagged and not torch.isfinite(output).all():
                    escape = "NaN/inf outputs without a warning"
                elif files == original and not torch.equal(output, self.expected[save_projection]):
                    escape = "an unmutated adapter loaded with different outputs"
        shutil.rmtree(directory)
        self.outcomes["escaped" if escape else outcome] += 1
        if escape:
            self.escapes.append(f"{escape[:300]}\n    mutations: {mutations!r}"[:2000])
        return escape


def fuzz(fuzzer: Fuzzer, cases: int, seed: int | None, stop_at_first: bool) -> None:
    """Run `cases` hypothesis-drawn cases through `fuzzer` (raise at the first escape if `stop_at_first`)."""

    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
    )
    @given(CASES)
    def one_case(case):
        save_projection, into_existing, mutations = case
        escape = fuzzer.run(save_projection, into_existing, mutations)
        if stop_at_first:
            assert escape is None, escape

    if seed is not None:
        one_case = hypothesis_seed(seed)(one_case)
    one_case()


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        fuzzer = Fuzzer(Path(scratch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fuzz(fuzzer, args.cases, args.seed, stop_at_first=False)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}")
    print(f"cases tried: {fuzzer.cases:,} in {time.perf_counter() - start:.0f} s")
    for outcome in ("loaded", "refused", "escaped"):
        print(f"  {outcome}: {fuzzer.outcomes[outcome]:,}")
    print(f"escapes from the contract: {len(fuzzer.escapes)}")
    for escape in fuzzer.escapes[:20]:
        print(f"  - {escape}")
    raise SystemExit(1 if fuzzer.escapes else 0)


if __name__ == "__main__":
    main()
