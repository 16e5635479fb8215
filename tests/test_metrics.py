"""Every metric against numbers worked out by hand."""

import pytest

from loracl.results import metrics as M

# a[j][i]: after task j, on task i (3 tasks, class-incremental: upper triangle undefined)
A = [[90.0, None, None],
     [70.0, 80.0, None],
     [60.0, 75.0, 85.0]]
N = [100, 200, 100]


def test_final_accuracies():
    assert M.final_acc(A, N) == pytest.approx((60 * 100 + 75 * 200 + 85 * 100) / 400)  # 73.75
    assert M.final_acc_task_avg(A) == pytest.approx((60 + 75 + 85) / 3)


def test_average_incremental_accuracy_both_definitions():
    a1 = 90.0
    a2_w, a2_t = (70 * 100 + 80 * 200) / 300, (70 + 80) / 2
    a3_w, a3_t = 73.75, (60 + 75 + 85) / 3
    assert M.avg_inc_acc(A, N, weighted=True) == pytest.approx((a1 + a2_w + a3_w) / 3)
    assert M.avg_inc_acc(A, N, weighted=False) == pytest.approx((a1 + a2_t + a3_t) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: best before last = max(90, 70) = 90 -> 30; task 1: 80 -> 5
    assert M.forgetting(A) == pytest.approx((30 + 5) / 2)


def test_learning_accuracy_is_the_diagonal():
    assert M.learning_acc(A) == pytest.approx((90 + 80 + 85) / 3)
    assert M.learning_acc([[90.0, None], [70.0, None]]) is None  # a task never evaluated after learning it


def test_backward_and_forward_transfer():
    assert M.bwt(A) == pytest.approx(((60 - 90) + (75 - 80)) / 2)
    full = [[50.0, 40.0, 30.0], [55.0, 60.0, 35.0], [52.0, 58.0, 70.0]]
    before = [45.0, 38.0, 20.0]
    assert M.fwt(full, before) == pytest.approx(((40 - 38) + (35 - 20)) / 2)
    assert M.fwt(A, before) is None  # a[0][1] undefined


def test_mtil_transfer_average_last():
    a = [[80.0, 40.0, 30.0, 20.0],
         [78.0, 90.0, 32.0, 22.0],
         [75.0, 85.0, 70.0, 25.0],
         [70.0, 80.0, 65.0, 95.0]]
    transfer = (40 + (30 + 32) / 2 + (20 + 22 + 25) / 3) / 3
    average = sum(sum(a[j][i] for j in range(4)) / 4 for i in range(4)) / 4
    last = (70 + 80 + 65 + 95) / 4
    assert M.transfer(a) == pytest.approx(transfer)
    assert M.average(a) == pytest.approx(average)
    assert M.last(a) == pytest.approx(last)
    assert M.transfer(A) is None and M.average(A) is None


def test_all_metrics_rounds_and_names():
    m = M.all_metrics(A, N, "class-incremental")
    assert m["final_acc"] == 73.75
    assert set(m) >= {"final_acc", "final_acc_task_avg", "avg_inc_acc", "learning_acc", "forgetting", "bwt", "fwt"}
    assert "transfer" not in m
    assert {"transfer", "average", "last"} <= set(M.all_metrics(A, N, "cross-dataset"))


def test_single_task():
    a = [[88.0]]
    assert M.forgetting(a) == 0.0 and M.bwt(a) == 0.0
    assert M.final_acc(a, [10]) == 88.0


def test_compare_derives_learning_accuracy_for_older_runs():
    from loracl.results.compare import _derive_metrics

    r = {"status": "complete", "acc_matrix": A, "acc_matrix_task_aware": [[95.0, None], [90.0, 85.0]],
         "metrics": {"final_acc": 73.75}}
    _derive_metrics(r)
    assert r["metrics"]["learning_acc"] == pytest.approx(85.0) and r["metrics"]["learning_acc_task_aware"] == 90.0
    r = {"status": "complete", "acc_matrix": A, "metrics": {"learning_acc": 1.0}}
    _derive_metrics(r)
    assert r["metrics"]["learning_acc"] == 1.0 and r["metrics"].get("learning_acc_task_aware") is None  # kept
