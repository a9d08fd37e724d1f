"""The CamVid table's bookkeeping (benchmarks/camvid_world.py): which row a stored run belongs to, and the verdict of
target (3). The stored runs are the evidence behind the defaults, so a run filed under the wrong row, or a verdict
computed against the wrong row, would move a default on nothing."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

from clipzss.worlds.students import REFERENCE

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "camvid_world.py"


@pytest.fixture(scope="module")
def cw():
    spec = importlib.util.spec_from_file_location("camvid_world_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and annotations look the module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(row: str, seed: int, u: float, **method: object) -> dict:
    return {
        "row": row,
        "seed": seed,
        "method": method,
        "metrics": {"mIoU(U)": u, "mIoU(S)": 20.0, "hIoU": 20.0},
    }


def test_old_default_rows_are_filed_under_the_reference(cw):
    """Rows named "default ± part" before the default moved were switches on what is now the reference."""
    old = _run("default − mask fusion", 0, 20.0, mask_fusion=False, **REFERENCE)
    assert cw.renamed(old) == "reference − mask fusion"
    old_plus = _run("default + dense distillation (all pixels)", 0, 20.0, w_distill=1.0, bank=True)
    assert cw.renamed(old_plus) == "reference + dense distillation (all pixels)"


def test_rows_on_todays_default_keep_their_names(cw):
    today = _run(cw.DEFAULT_MINUS + "GLM", 1, 20.0, glm=False, w_distill=4.0, bank=False)
    assert cw.renamed(today) == cw.DEFAULT_MINUS + "GLM"
    # the bare "default" row is told from the reference by its stored settings
    assert cw.renamed(_run(cw.DEFAULT_ROW, 0, 20.0, w_distill=4.0, bank=False)) == cw.DEFAULT_ROW
    assert cw.renamed(_run(cw.DEFAULT_ROW, 0, 20.0, **REFERENCE)) == cw.REFERENCE_ROW
    # the row that measured weight 4 before it became the default is the default now
    assert (
        cw.renamed(_run("default, distillation weight 4", 2, 20.0, w_distill=4.0, bank=False))
        == cw.DEFAULT_ROW
    )


def test_runs_of_the_first_default_are_filed_under_it(cw):
    """Runs made while the default distilled at weight 1 keep that name after it moved to weight 4."""
    assert cw.renamed(_run(cw.DEFAULT_ROW, 0, 20.0, w_distill=1.0, bank=False)) == cw.FIRST_DEFAULT_ROW
    four = cw.DEFAULT_MINUS + "all four (PLM clusters + distillation, CE)"
    assert (
        cw.renamed(_run(four, 0, 20.0, w_distill=1.0, bank=False))
        == cw.FIRST_MINUS + four[len(cw.DEFAULT_MINUS) :]
    )
    supervised = {**_run(cw.SUPERVISED_ROW, 0, 20.0, w_distill=1.0, bank=False), "setting": "supervised"}
    assert cw.renamed(supervised) == cw.SUPERVISED_ROW + cw.ON_FIRST
    # and every name they get is a row of the table that reruns them with weight 1
    rows = cw.rows()
    for name in (
        cw.FIRST_DEFAULT_ROW,
        cw.FIRST_MINUS + four[len(cw.DEFAULT_MINUS) :],
        cw.SUPERVISED_ROW + cw.ON_FIRST,
    ):
        assert cw.run_method(rows[name]["switches"])["w_distill"] == 1.0


def test_every_default_minus_row_switches_what_its_name_says(cw):
    rows = cw.rows()
    minus = {name: spec["switches"] for name, spec in rows.items() if name.startswith(cw.DEFAULT_MINUS)}
    assert minus[cw.DEFAULT_MINUS + "GLM"] == {"glm": False}
    assert minus[cw.DEFAULT_MINUS + "all four (PLM clusters + distillation, CE)"] == {
        "glm": False,
        "mask_fusion": False,
        "nel": False,
        "center_tokens": False,
    }
    for switches in minus.values():  # on today's default, not on the reference nor the first default
        assert not set(switches) & set(REFERENCE)


def test_part_verdicts_against_one_standard_deviation(cw):
    whole = [_run(cw.DEFAULT_ROW, s, u) for s, u in enumerate((30.0, 26.0, 28.0))]
    helps = [_run(cw.DEFAULT_MINUS + "A", s, u) for s, u in enumerate((20.0, 17.0, 18.0))]
    noise = [_run(cw.DEFAULT_MINUS + "B", s, u) for s, u in enumerate((29.0, 27.0, 27.0))]
    by_row = {cw.DEFAULT_MINUS + "A": helps, cw.DEFAULT_MINUS + "B": noise, "reference − C": noise}
    a, b = cw._part_verdicts(
        by_row, cw.DEFAULT_MINUS, whole
    )  # the reference's row is not a part of the default
    margin = max(statistics.stdev([30.0, 26.0, 28.0]), statistics.stdev([20.0, 17.0, 18.0]))
    assert a.startswith(f"A +{28.0 - 55.0 / 3:.1f} vs {margin:.1f} (met; per seed +10.0, +9.0, +10.0")
    assert "paired +9.7 ± 0.6, met" in a
    assert b.startswith("B +0.3 vs 2.0 (not met; per seed +1.0, -1.0, +1.0; paired +0.3 ± 1.2, not met")


def test_the_reference_minus_bank_row_stands_for_the_default_without_distillation(cw):
    full = [_run(cw.DEFAULT_ROW, s, 25.0 + s, w_distill=4.0, bank=False) for s in range(3)]
    base = [_run(cw.BASELINE_ROW, s, 10.0) for s in range(3)]
    same = [_run(cw.REFERENCE_MINUS_BANK, s, 20.0, w_distill=0.0, bank=False) for s in range(3)]
    text = " ".join(
        cw.targets({cw.BASELINE_ROW: base, cw.DEFAULT_ROW: full, cw.REFERENCE_MINUS_BANK: same}, 30.0)
    )
    assert "dense distillation (the reference − bank row) +6.0" in text
    # a "− bank" row of other settings is not taken for it
    other = [_run(cw.REFERENCE_MINUS_BANK, s, 20.0, w_distill=1.0, bank=False) for s in range(3)]
    text = " ".join(
        cw.targets({cw.BASELINE_ROW: base, cw.DEFAULT_ROW: full, cw.REFERENCE_MINUS_BANK: other}, 30.0)
    )
    assert "dense distillation" not in text
