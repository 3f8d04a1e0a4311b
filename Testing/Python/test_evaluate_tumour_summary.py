"""scripts/evaluate_tumour.py --summarise: folds' per-patient tables pooled into one table and card."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROJECT_ROOT, write_evaluation

SCRIPT = PROJECT_ROOT / "scripts" / "evaluate_tumour.py"


def summarise(tmp_path, *folders):
    card = tmp_path / "card.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--summarise", *map(str, folders), "--out",
                             str(tmp_path / "table.md"), "--card", str(card)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    return result, (json.loads(card.read_text(encoding="utf-8")) if card.exists() else None)


def test_folds_pool_into_one_figure_per_patient(tmp_path):
    result, card = summarise(tmp_path, write_evaluation(tmp_path / "fold1", {"P1": 0.8, "P2": 0.6}),
                             write_evaluation(tmp_path / "fold2", {"P3": 0.4}))
    assert result.returncode == 0, result.stderr
    figures = card["cross_validated_dice"]["sarcoma_t1_mri"]
    assert figures["mean"] == 0.6 and {"P1", "P2", "P3"} <= set(figures)


def test_a_case_in_two_folds_is_refused_by_name(tmp_path):
    """Counted twice in the mean, kept once in the card: refused instead."""
    fold1 = write_evaluation(tmp_path / "fold1", {"P1": 0.8, "P2": 0.6})
    fold2 = write_evaluation(tmp_path / "fold2", {"P2": 0.2, "P3": 0.4})
    result, card = summarise(tmp_path, fold1, fold2)
    assert result.returncode != 0 and card is None
    assert "case P2" in result.stderr and str(fold2) in result.stderr and "Traceback" not in result.stderr
