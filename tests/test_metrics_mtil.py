"""MTIL's Transfer / Average / Last (ZSCL's definitions) on hand-made accuracy matrices."""

import pytest

from loracl.results.metrics import all_metrics, average, last, transfer


def test_mtil_metrics_by_hand():
    a = [[50.0, 10.0, 20.0],
         [40.0, 60.0, 30.0],
         [35.0, 55.0, 70.0]]
    # Transfer: column i averaged over the rows before i: (10 + (20 + 30) / 2) / 2
    assert transfer(a) == pytest.approx((10 + 25) / 2)
    # Average: every entry of every column: mean over i of the column mean
    assert average(a) == pytest.approx(((50 + 40 + 35) / 3 + (10 + 60 + 55) / 3 + (20 + 30 + 70) / 3) / 3)
    assert last(a) == pytest.approx((35 + 55 + 70) / 3)
    m = all_metrics(a, [10, 10, 10], "cross-dataset", before=[45.0, 10.0, 20.0])
    assert m["transfer"] == pytest.approx(17.5) and m["last"] == pytest.approx(53.3333, abs=1e-4)
    assert m["fwt"] == pytest.approx(((10 - 10) + (30 - 20)) / 2)
    assert "transfer" not in all_metrics(a, [10, 10, 10], "class-incremental")


def test_zero_shot_rows_give_equal_average_and_last():
    row = [24.0, 88.0, 68.0, 44.0]
    a = [list(row) for _ in row]
    assert average(a) == pytest.approx(last(a)) == pytest.approx(sum(row) / 4)
    assert transfer(a) == pytest.approx(sum(row[1:]) / 3)


def test_missing_entries_give_none():
    a = [[50.0, None], [40.0, 60.0]]
    assert transfer(a) is None and average(a) is None and last(a) == 50.0
