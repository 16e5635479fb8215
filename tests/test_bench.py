"""`loracl bench`: the three ways of holding earlier branches compute the same function, and the command runs
end to end on the fixture (no timing is asserted: it is a benchmark, not a timed test)."""

import pytest
import torch

from loracl.bench import official_forward


def test_official_dense_sum_equals_low_rank_sum_and_merge(tiny_vit):
    from loracl.models.backbones import TimmViT

    bb = TimmViT.__new__(TimmViT)
    torch.nn.Module.__init__(bb)
    bb.model = tiny_vit
    ad = bb.inject_lora(["k", "v"])
    g = torch.Generator().manual_seed(0)
    for s in ad.sites:
        for _ in range(3):
            s.add_branch(torch.randn(4, s.d_in, generator=g) * 0.1, torch.randn(s.d_out, 4, generator=g) * 0.1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        low_rank = tiny_vit(x)
        with official_forward(ad):
            dense = tiny_vit(x)
        assert not any("apply_branches" in vars(layer) for layer in ad.layers)  # patch removed
        ad.merge_all()
        merged = tiny_vit(x)
    torch.testing.assert_close(dense, low_rank, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, low_rank, atol=1e-5, rtol=1e-5)


@pytest.mark.shared
def test_bench_command_runs(capsys):
    from loracl.cli import main

    torch.set_num_threads(1)
    rc = main(["bench", "--steps", "1", "--warmup", "0", "--tasks", "1", "3", "--batch-size", "8",
               "--set", "eval.retention=null", "--set",
               "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', max_per_class: {train: 2, test: 1}}]"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("share of a task at 3 epochs", "merged into W (loracl)", "kept, summed dense (official code)",
                 "task 1", "task 3", "stats-before", "stats-after"):
        assert text in out
