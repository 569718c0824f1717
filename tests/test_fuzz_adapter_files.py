"""A property (hypothesis): a mutated adapter directory either loads, with finite outputs (identical ones
when nothing was mutated), or raises AdapterLoadError naming the file and leaves the target model exactly as
it was. The mutations and the check are `benchmarks/fuzz_adapter_files.py`'s, which runs 10,000+ cases."""

from __future__ import annotations

import pytest

from benchmarks.fuzz_adapter_files import CONFIG_NAME, WEIGHTS_NAME, Fuzzer, fuzz, mutate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory) -> Fuzzer:
    return Fuzzer(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.fault(
    "file",
    "adapter directories mutated at random (hypothesis): config values and structure, safetensors header "
    "shapes, dtypes, offsets, names and length, metadata and the projections' fingerprint, tensor bytes "
    "(NaN/inf included), truncation, raw bytes; loaded by `from_pretrained` and by `load_adapter`",
    "each load succeeds with finite outputs (identical when unmutated; NaN/inf only with the warning) or "
    "raises AdapterLoadError naming the file, the target model unchanged (0 escapes in 10,000 cases of the "
    "script)",
)
def test_every_mutated_adapter_loads_or_raises_adapter_load_error(fuzzer):
    fuzz(fuzzer, cases=50, seed=None, stop_at_first=True)
    assert fuzzer.escapes == []
    assert fuzzer.outcomes["loaded"] > 0 and fuzzer.outcomes["refused"] > 0, fuzzer.outcomes


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("into_existing", [True, False])
def test_an_unmutated_adapter_loads_with_identical_outputs(fuzzer, save_projection, into_existing):
    assert fuzzer.run(save_projection, into_existing, []) is None
    assert fuzzer.outcomes["loaded"] >= 1


def test_the_mutations_change_what_they_name(fuzzer):
    files = fuzzer.originals[False]
    assert mutate(files, ("config-set", "r", 3_000_000))[CONFIG_NAME] != files[CONFIG_NAME]
    assert mutate(files, ("header-shape", 0, [7]))[WEIGHTS_NAME] != files[WEIGHTS_NAME]
    assert (
        mutate(files, ("fingerprint-set", "vera_A_shape", [4, 10**12]))[WEIGHTS_NAME] != files[WEIGHTS_NAME]
    )
    assert len(mutate(files, ("truncate", WEIGHTS_NAME, 0.5))[WEIGHTS_NAME]) == len(files[WEIGHTS_NAME]) // 2
    refused = [("config-set", "r", 3_000_000), ("header-length", 2**63), ("truncate", CONFIG_NAME, 0.3)]
    for mutation in refused:
        before = fuzzer.outcomes["refused"]
        assert fuzzer.run(False, True, [mutation]) is None
        assert fuzzer.outcomes["refused"] == before + 1, mutation


# Cases the long run found: finite lambdas whose product overflows float32 loaded without a warning.
FOUND = [
    [
        ("tensor-bytes", 2.220446049250313e-16, b"\xd0`\x06p4\xb5\x93{"),
        ("tensor-bytes", 0.83, b"P\r\xb0t\xa8_\xde"),
    ],
    [("tensor-bytes", 2.553810381950973e-30, b"\xdb\\\xeag\xc9lh\x7f")],
]


@pytest.mark.parametrize("mutations", FOUND)
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("into_existing", [True, False])
def test_cases_the_long_run_found_hold(fuzzer, mutations, save_projection, into_existing):
    assert fuzzer.run(save_projection, into_existing, mutations) is None
