"""Each benchmark script runs in --quick mode and prints well-formed tables of ratios.

Only the shape of the output is checked: which tables, which rows, numbers where numbers belong, the target
lines and the GPU note. Times are never asserted. The scripts run in this process (their imports are already
paid for); bench_memory's --same-process keeps it so.
"""

from __future__ import annotations

import re

import pytest

from benchmarks import bench_inference, bench_memory, bench_quantized, bench_training
from benchmarks.common import FROZEN_BASE, PEFT_LORA, PEFT_VERA, VERALAB

NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$|^n/a$")


def parse_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{title: (header, rows)} of the markdown tables printed under '## title' lines."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.startswith("| ") and title is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if title not in tables:
                tables[title] = (cells, [])
            else:
                tables[title][1].append(cells)
    return tables


def check_table(
    header: list[str], rows: list[list[str]], variants: list[str], numeric_columns: range
) -> None:
    assert [row[0] for row in rows] == variants
    for row in rows:
        assert len(row) == len(header), row
        for column in numeric_columns:
            assert NUMBER.match(row[column]), (header[column], row[column])


def run(script, argv, capsys) -> str:
    script.main(
        [*argv, "--threads", "1"]
    )  # the suite's one thread (conftest): the quick runs only smoke-test
    return capsys.readouterr().out


@pytest.mark.filterwarnings("ignore")
def test_bench_training_quick(capsys):
    out = run(bench_training, ["--quick"], capsys)
    ((title, (header, rows)),) = parse_tables(out).items()
    assert title.startswith("Training step")
    check_table(header, rows, [FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA], range(1, len(header)))
    assert rows[0][3] == "1.000" and rows[3][-1] == "1.000"  # each ratio's own reference row
    assert re.search(
        r"adapter overhead, .*: -?\d+\.\d+ \(target <= 0\.35: (meets|MISSES)\); cost-model limit \d", out
    )
    assert re.search(
        r"headline, .*: \d+\.\d+ \(target < 1\.0: (meets|MISSES)\), training 11\.0x fewer parameters", out
    )
    assert "need a CUDA GPU" in out


@pytest.mark.filterwarnings("ignore")
def test_bench_memory_quick(capsys):
    out = run(bench_memory, ["--quick", "--same-process"], capsys)
    ((title, (header, rows)),) = parse_tables(out).items()
    assert title.startswith("Training memory")
    check_table(header, rows, [FROZEN_BASE, PEFT_VERA, VERALAB, PEFT_LORA], range(1, len(header)))
    assert rows[0][2] == "1.000"
    saved_mb = {row[0]: float(row[1]) for row in rows}
    assert saved_mb[VERALAB] < saved_mb[PEFT_VERA]  # bytes, not time: deterministic
    assert re.search(r"veralab / frozen base: \d+\.\d+ \(target <= 1\.12: (meets|MISSES)\)", out)
    assert "need a CUDA GPU" in out


@pytest.mark.filterwarnings("ignore")
def test_bench_inference_quick(capsys):
    out = run(bench_inference, ["--quick"], capsys)
    tables = parse_tables(out)
    assert len(tables) == 2
    (eval_title, (eval_header, eval_rows)), (mixed_title, (mixed_header, mixed_rows)) = tables.items()
    assert eval_title.startswith("Eval forward")
    check_table(
        eval_header,
        eval_rows,
        [FROZEN_BASE, "veralab merged", "veralab unmerged", "PEFT VeRA unmerged"],
        range(1, len(eval_header)),
    )
    assert mixed_title.startswith("Mixed batch, 4 rows")
    assert [row[0] for row in mixed_rows][:4] == [
        "veralab, 4 adapters (adapter_names)",
        "veralab, 1 adapter (adapter_names)",
        "veralab, 1 adapter (plain forward)",
        "veralab, 4 separate forward passes",
    ]
    rows_right = {row[0]: row[-1] for row in mixed_rows}
    assert rows_right["veralab, 4 adapters (adapter_names)"] == "yes"  # each row got its own adapter
    assert rows_right["veralab, 1 adapter (adapter_names)"] == "yes"
    assert re.search(r"merged veralab / base model: \d+\.\d+ \(target <= 1\.03: (meets|MISSES)\)", out)
    assert re.search(
        r"different adapters / one adapter, .*: \d+\.\d+ \(target <= 1\.1: (meets|MISSES)\)", out
    )
    assert "need a CUDA GPU" in out


@pytest.mark.filterwarnings("ignore")
def test_bench_quantized_quick(capsys):
    from veralab.fast.backends import unavailable_reason

    backend = "hqq-4bit" if unavailable_reason("hqq") is None else "bnb-8bit"
    if unavailable_reason(bench_quantized.QUANTIZATIONS[backend][0]) is not None:
        pytest.skip("needs hqq or bitsandbytes: pip install 'veralab[hqq]'")
    out = run(bench_quantized, ["--quick", "--same-process", "--only", f"float32,{backend}"], capsys)
    ((title, (header, rows)),) = parse_tables(out).items()
    assert title.startswith("Training step over quantized bases")
    assert [(row[0], row[1]) for row in rows] == [
        (base, implementation) for base in ("float32", backend) for implementation in (VERALAB, PEFT_VERA)
    ]
    for row in rows:
        assert len(row) == len(header) and all(NUMBER.match(cell) for cell in row[2:]), row
    assert rows[0][4] == "1.000"  # veralab over float32 is the reference of its column
    assert float(rows[2][2]) < float(rows[0][2])  # the quantized base takes less memory
