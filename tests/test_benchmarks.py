"""The benchmark scripts work: each ``--quick`` mode runs (tiny sizes) and prints its table rows.

No timing is asserted: the numbers live in BENCHMARKS.md.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(module: str, *extra: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SPARSIFY_DISABLE_TRITON="1")
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--threads", "1", *extra], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def table_cells(text: str, title: str) -> list[list[str]]:
    """Cells of each row of the Markdown table under the ``### title...`` heading."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### " + title))
    rows = []
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.split("|")[1:-1]])
    return rows


def table_rows(text: str, title: str) -> list[str]:
    """First cells of the Markdown table under the ``### title...`` heading."""
    return [cells[0] for cells in table_cells(text, title)]


@pytest.mark.slow
def test_eraser_overhead_quick():
    out = run_quick("benchmarks.eraser_overhead")
    variants = ["no hook", "ablate, 1 concept", "ablate, 10 concepts", "replace, 1 concept", "ablate, 1 concept, gated"]
    assert table_rows(out, "Eraser overhead per UNet call: tiny SD1.5") == variants + ["(SAE encode, all tokens)"]
    assert table_rows(out, "Eraser overhead per UNet call: tiny SDXL") == variants + ["(SAE encode, all tokens)"]
    assert table_rows(out, "Eraser overhead per model call through ComfyUI") == variants
    # The gate is open on the benchmark's input: the gated eraser edits what the ungated one does.
    edited = {cells[0]: cells[7] for cells in table_cells(out, "Eraser overhead per UNet call: tiny SD1.5")}
    assert edited["ablate, 1 concept, gated"] == edited["ablate, 1 concept"] != "0.0%"
    assert "GFLOP/s" in out


@pytest.mark.slow
def test_training_throughput_quick():
    out = run_quick("benchmarks.training_throughput")
    rows = table_rows(out, "SAE training throughput")
    assert rows[0].startswith("saeuron TrainStep (") and "auto" in rows[0]
    # The anchors are an optional extra: a row each when installed, a note when not.
    for dist, label in (("sparsify", "eai-sparsify SparseCoder"), ("sae_lens", "SAELens TopKTrainingSAE")):
        if importlib.util.find_spec(dist) is None:
            assert "is not installed" in out
        else:
            assert any(r.startswith(label) for r in rows)


@pytest.mark.slow
def test_scoring_scale_quick():
    out = run_quick("benchmarks.scoring_scale")
    assert table_rows(out, "Concept scoring at scale") == ["1,000", "10,000", "100,000"]


@pytest.mark.slow
def test_collection_overhead_quick():
    out = run_quick("benchmarks.collection_overhead")
    assert table_rows(out, "Collection overhead") == ["generate", "generate + no-op hook", "collect_activations"]


@pytest.mark.slow
def test_run_all_quick_runs_the_chosen_benchmarks(tmp_path):
    out = run_quick("benchmarks.run_all", "--only", "scoring_scale", "--out", str(tmp_path / "r.md"))
    assert table_rows(out, "Concept scoring at scale") == ["1,000", "10,000", "100,000"]
    assert "Concept scoring at scale" in (tmp_path / "r.md").read_text()



@pytest.mark.slow
def test_eraser_overhead_residual_blocks_quick():
    """The FLUX double block and the SDXL residual block sections (tiny sizes): both tables, every cell parses."""
    out = run_quick("benchmarks.eraser_overhead", "--only", "flux,sdxl_block")
    for title in ("Residual eraser per block call: tiny FLUX-layout double block",
                  "Residual eraser per block call: tiny SDXL-layout residual block"):
        cells = table_cells(out, title)
        assert [c[0] for c in cells] == ["no hook", "ablate, 1 concept (3 features)", "(SAE encode, all tokens)"]
        assert all(len(c) == 17 for c in cells)
        hooked, encode = cells[1], cells[2]
        touched, edited = float(hooked[6].rstrip("%")), float(hooked[7].rstrip("%"))
        # the concept fires on some tokens, and only touched tokens can be edited
        assert 0 < edited <= touched < 100 and encode[6] == "100%"
        for row in (hooked, encode):
            float(row[11])                                   # SAE GFLOP this call
            assert row[8].endswith(("s", "ms", "us"))        # the hook's own work, timed
            for col in (9, 10, 12, 13):
                assert float(row[col].rstrip("%")) > 0
            assert float(row[15].rstrip("x")) > 0            # own work / floor
        # the SAE does fewer FLOPs when it encodes only the touched tokens than when it encodes them all
        assert float(hooked[11]) < float(encode[11])
        float(hooked[3]), float(hooked[5])                  # paired and best-of ratios
    assert "TFLOP per call" in out and "Load average" in out
