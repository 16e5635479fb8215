"""LoRA-DRS: the drift-resistant projector on a known spectrum, the projection of Adam's step, the subtracted
statistics against a hand computation, the augmented triplet loss by hand, and a tiny run on real images."""

import math

import pytest
import torch
from torch import nn

from conftest import smoke_sets
from loracl.cl.drs import ProjectedUpdates, augmented_triplet_loss, drift_resistant_projector, shifted_weights
from loracl.cl.statistics import layer_input_moments
from loracl.methods.lora_drs import LoRADRS
from loracl.models.lora import Site, attach_linear
from loracl.runs.assembly import load_config

TINY = ["benchmark.num_tasks=2", "benchmark.datasets=[{name: cifar100, root: '{data_root}/cifar100', classes: "
        f"{list(range(20))}, max_per_class: {{train: 20, test: 5}}}}]", "method.rank=4"]


def known_spectrum(d=12, seed=0):
    """C = Q diag(lam) Q^T whose top 4 eigenvalues are the first to hold 99% of the trace."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.tensor([50.0, 30.0, 15.0, 4.5] + [0.5 / (d - 4)] * (d - 4), dtype=torch.float64)
    # cumulative: 0.5, 0.8, 0.95, 0.995 >= 0.99 -> k = 4
    return Q @ torch.diag(lam) @ Q.t(), Q[:, :4]


@pytest.mark.parametrize("space", ["principal", "complement"])
def test_projector_keeps_an_update_inside_or_outside_the_99_percent_space(space):
    C, U = known_spectrum()
    T = drift_resistant_projector(C, 0.99, space).double()
    inside = U @ U.t()
    keep = inside if space == "principal" else torch.eye(12, dtype=torch.float64) - inside
    k = 4 if space == "principal" else 8
    assert torch.allclose(T, keep / math.sqrt(k), atol=1e-6)  # U U^T / ||U U^T||_F, ||.||_F = sqrt(k)
    u = torch.randn(3, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = u @ T
    assert torch.allclose(out - out @ keep, torch.zeros_like(out), atol=1e-6)  # nothing outside the kept space
    assert torch.allclose(out, u @ keep / math.sqrt(k), atol=1e-6)  # the kept part untouched but for the scale


def test_projector_threshold_counts_eigenvalues_not_their_squares():
    C, _ = known_spectrum()
    # on squared eigenvalues the top 2 would already hold 3400/3545 = 96%, the top 3 99.4%: k would be 3
    assert torch.linalg.matrix_rank(drift_resistant_projector(C, 0.99).double(), rtol=1e-4) == 4
    assert torch.linalg.matrix_rank(drift_resistant_projector(C, 0.95).double(), rtol=1e-4) == 3


def test_projected_updates_project_adams_step_not_the_gradient():
    g = torch.Generator().manual_seed(0)
    C, _ = known_spectrum()
    T = drift_resistant_projector(C, 0.99)
    down0, up0 = torch.randn(3, 12, generator=g), torch.randn(12, 3, generator=g)
    x = torch.randn(16, 12, generator=g)

    def steps(project: bool, n=3):
        down, up = nn.Parameter(down0.clone()), nn.Parameter(up0.clone())
        opt = torch.optim.Adam([down, up], lr=0.1)
        proj = ProjectedUpdates()
        if project:
            proj.add(down, right=T)
            proj.add(up, left=T)
            proj.start()
        moves = []
        for _ in range(n):
            opt.zero_grad()
            (x @ down.t() @ up.t()).pow(2).mean().backward()
            before = (down.detach().clone(), up.detach().clone())
            opt.step()
            moves.append((down.detach() - before[0], up.detach() - before[1]))
        proj.stop()
        return moves

    plain, projected = steps(False, 1), steps(True, 1)
    # first step: same gradient, same Adam moments, so the projected move is exactly the plain move projected
    assert torch.allclose(projected[0][0], plain[0][0] @ T, atol=1e-6)
    assert torch.allclose(projected[0][1], T @ plain[0][1], atol=1e-6)
    for d_down, d_up in steps(True):  # every step stays in the space
        assert torch.allclose(d_down @ (T * math.sqrt(4)), d_down, atol=1e-6)
        assert torch.allclose((T * math.sqrt(4)) @ d_up, d_up, atol=1e-6)
    assert not torch.allclose(steps(False)[1][0] @ T, steps(True)[1][0], atol=1e-6)  # not a projected gradient


def _two_layer_sites(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    l1, l2 = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
    with torch.no_grad():
        l1.weight.copy_(torch.randn(d, d, generator=g))
        l2.weight.copy_(torch.randn(d, d, generator=g))
    sites = [Site("image", i, "k", attach_linear(lin, {"k": (0, d)}), "k") for i, lin in enumerate((l1, l2))]
    return l1, l2, sites, g


@pytest.mark.parametrize("subtract", [1.0, 0.0])
def test_subtracted_statistics_equal_a_hand_computation(subtract):
    d = 5
    l1, l2, sites, g = _two_layer_sites(d)
    W0 = l1.weight.detach().clone()
    prev = torch.randn(d, d, generator=g) * 0.5
    sites[0].add_to_weight(prev)  # merged model: W = W0 + prev
    merged = l1.weight.detach().clone()
    x = torch.randn(7, 3, d, generator=g)  # 7 images x 3 tokens
    shift = [-(1 + subtract) * prev, torch.zeros(d, d)]
    with shifted_weights(sites, shift), layer_input_moments([s.layer for s in sites]) as acc:
        l2(l1(x))
    h = (x @ (W0 - subtract * prev).t()).reshape(-1, d)  # layer 2's input under W0 - subtract * prev
    assert torch.allclose(acc[sites[1].layer].finalize(), h.t() @ h / 21, atol=1e-5)
    if subtract == 0:  # the pretrained weights' inputs
        h0 = (x @ W0.t()).reshape(-1, d)
        assert torch.allclose(acc[sites[1].layer].finalize(), h0.t() @ h0 / 21, atol=1e-5)
    assert torch.equal(l1.weight.detach(), merged)  # restored bit for bit


def test_augmented_triplet_loss_equals_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    r2 = math.sqrt(2)
    # no prototypes: anchor 0: ap = r2, an = 2; anchor 1: ap = r2, an = r2; anchor 2: ap = self (1e-6), an = r2
    no_protos = ((1 - (2 - r2)) + 1 + max(0.0, 1 - (r2 - 1e-6))) / 3
    assert float(augmented_triplet_loss(f, y, None)) == pytest.approx(no_protos, abs=1e-5)
    # a stored prototype (0, -2) -> (0, -1): anchor 0's hardest negative becomes it (r2 < 2)
    protos = torch.tensor([[0.0, -2.0]])
    assert float(augmented_triplet_loss(f, y, protos)) == pytest.approx((1 + 1 + 0) / 3, abs=1e-5)
    # one class only: the hardest negative is ap + margin -> zero loss, unless a prototype is nearer
    same = torch.tensor([0, 0, 0])
    assert float(augmented_triplet_loss(f, same, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(augmented_triplet_loss(f, same, protos, margin=0.5)) > 0


@pytest.mark.slow
@pytest.mark.shared
def test_lora_drs_statistics_and_updates_on_real_images(tmp_path, monkeypatch):
    """Task 1's statistics equal a hand computation by the model W0 - prev (W0 from a snapshot taken at setup,
    prev = merged weights - W0), and task 1's trained LoRA moved only inside the recorded space."""
    from loracl.runs.runner import Runner

    rec = {}
    setup, moments, begin, end = LoRADRS.setup, LoRADRS.subtracted_moments, LoRADRS.begin_task, LoRADRS.end_task

    def recording_setup(self):
        setup(self)
        rec["W0"] = [s.weight().detach().clone() for s in self.model.adapter.sites]

    def recording_moments(self, task):
        C = moments(self, task)
        sites = self.model.adapter.sites
        merged = [s.weight().detach().clone() for s in sites]
        with torch.no_grad():  # by hand: the k and v rows set to W0 - (W - W0), inputs of every qkv recorded
            for s, w0, w in zip(sites, rec["W0"], merged):
                s.weight().copy_(w0 - (w - w0))
            sums = {layer: [0, 0] for layer in self.model.adapter.layers}
            hooks = [layer._host.register_forward_hook(
                lambda m, a, o, layer=layer: sums[layer].__setitem__(slice(0, 2), [
                    sums[layer][0] + a[0].reshape(-1, a[0].shape[-1]).t() @ a[0].reshape(-1, a[0].shape[-1]),
                    sums[layer][1] + a[0].shape[0] * a[0].shape[1]]))
                for layer in self.model.adapter.layers]
            self.model.eval()
            self.run.forward_pass(task.train, lambda b: self.model.features(b.x), desc="drs-stats", view="stats")
            for h in hooks:
                h.remove()
            for s, w in zip(sites, merged):
                s.weight().copy_(w)
        rec["C"], rec["hand"] = C, {k: (v[0] / v[1]).double() for k, v in sums.items()}
        return C

    def recording_begin(self, task):
        begin(self, task)
        if task.index == 1:
            rec["start"] = [s.branches["task1"].down.detach().clone() for s in self.model.adapter.sites]

    def recording_end(self, task):
        if task.index == 1:
            rec["moved"] = [(s.branches["task1"].down.detach() - d0, self.transforms[s.layer])
                            for s, d0 in zip(self.model.adapter.sites, rec["start"])]
        end(self, task)

    monkeypatch.setattr(LoRADRS, "setup", recording_setup)
    monkeypatch.setattr(LoRADRS, "subtracted_moments", recording_moments)
    monkeypatch.setattr(LoRADRS, "begin_task", recording_begin)
    monkeypatch.setattr(LoRADRS, "end_task", recording_end)
    cfg = load_config(preset="cifar100-mini", method="lora-drs", sets=smoke_sets(**{"eval.max_per_task": None}) + TINY)
    r = Runner(cfg, tmp_path / "lora-drs", progress=False, log=lambda *a, **k: None).run()
    for layer, C in rec["C"].items():
        assert torch.allclose(C, rec["hand"][layer], rtol=1e-4, atol=1e-5)
    for moved, T in rec["moved"]:
        assert float(moved.abs().max()) > 0
        k = int(torch.linalg.matrix_rank(T.double(), rtol=1e-4))  # T = U U^T / sqrt(k)
        assert torch.allclose(moved @ (T * math.sqrt(k)), moved, atol=1e-5)
    assert r["status"] == "complete" and r["acc_matrix"][1][0] is not None
