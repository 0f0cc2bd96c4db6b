"""medvit.optim: SAM / ASAM against hand computations, parameter groups, Adafactor's state, EMA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from medvit.optim.adafactor import AdafactorViT
from medvit.optim.ema import model_ema
from medvit.optim.factory import make_optimizer
from medvit.optim.param_groups import param_groups
from medvit.optim.sam import SAM
from medvit.optim.schedule import lr_factor, schedule_factor

W0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]])
B0 = torch.tensor([0.1, -0.2])
X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.5, 2.0], [2.0, 0.0, 1.0]])
Y = torch.tensor([0, 1, 1])


def _linear() -> nn.Linear:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.copy_(B0)
    return lin


def _grads(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    nn.functional.cross_entropy(X @ w.T + b, Y).backward()
    return w.grad, b.grad


def _hand_step(adaptive: bool, rho: float, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    gw, gb = _grads(W0, B0)
    if adaptive:
        norm = torch.cat([(W0.abs() * gw).flatten(), (B0.abs() * gb).flatten()]).norm()
        ew, eb = rho * W0**2 * gw / norm, rho * B0**2 * gb / norm
    else:
        norm = torch.cat([gw.flatten(), gb.flatten()]).norm()
        ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = _grads(W0 + ew, B0 + eb)
    return W0 - lr * gw2, B0 - lr * gb2


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_hand_computation(adaptive: bool) -> None:
    lin = _linear()
    opt = SAM(lin.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.1)
    seen: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        seen.append(lin.weight.detach().clone())
        loss = nn.functional.cross_entropy(lin(X), Y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    want_w, want_b = _hand_step(adaptive, rho=0.5, lr=0.1)
    torch.testing.assert_close(lin.weight.detach(), want_w)
    torch.testing.assert_close(lin.bias.detach(), want_b)
    # first gradient at w, second at the perturbed point, which is not w
    torch.testing.assert_close(seen[0], W0)
    assert not torch.allclose(seen[1], W0)
    assert float(loss.detach()) == pytest.approx(float(nn.functional.cross_entropy(X @ W0.T + B0, Y)))
    # the step differs from plain SGD's (else the test would not tell SAM from SGD)
    gw, _ = _grads(W0, B0)
    assert not torch.allclose(lin.weight.detach(), W0 - 0.1 * gw)


def test_sam_two_halves_restore_weights_and_keep_groups() -> None:
    lin = _linear()
    opt = SAM(
        [{"params": [lin.weight], "lr": 0.1}, {"params": [lin.bias], "lr": 0.0}], torch.optim.SGD, rho=0.05, lr=0.1
    )
    nn.functional.cross_entropy(lin(X), Y).backward()
    opt.first_step()
    assert not torch.equal(lin.weight.detach(), W0)
    assert all(p.grad is None for p in lin.parameters())
    nn.functional.cross_entropy(lin(X), Y).backward()
    opt.second_step()
    torch.testing.assert_close(lin.bias.detach(), B0)  # lr 0 group: restored, not moved
    assert opt.param_groups is opt.base_optimizer.param_groups
    opt.param_groups[0]["lr"] = 0.5  # a scheduler changing SAM's LR changes the base's
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_sam_state_dict_round_trip() -> None:
    lin = _linear()
    opt = make_optimizer("adamw", lin.parameters(), lr=1e-2, weight_decay=0.05, sam="sam")
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(lin(X), Y)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state_dict()
    other = make_optimizer("adamw", _linear().parameters(), lr=1e-2, weight_decay=0.05, sam="sam")
    other.load_state_dict(state)
    exp_avg = opt.base_optimizer.state[lin.weight]["exp_avg"]
    loaded = next(iter(other.base_optimizer.state.values()))["exp_avg"]
    torch.testing.assert_close(loaded, exp_avg)
    assert other.param_groups[0]["weight_decay"] == 0.05


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.head_dist = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_by_role() -> None:
    model = _Tiny()
    groups = {g["name"]: g for g in param_groups(model, 0.05, head_weight_decay=0.3, lr_scale_head=10.0)}
    ids = {n: {id(p) for p in g["params"]} for n, g in groups.items()}
    named = dict(model.named_parameters())
    assert ids["body"] == {id(named["fc.weight"])}
    assert ids["body_no_decay"] == {
        id(named[n]) for n in ("cls_token", "pos_embed", "fc.bias", "norm.weight", "norm.bias")
    }
    assert ids["head"] == {id(named["head.weight"]), id(named["head_dist.weight"])}
    assert ids["head_no_decay"] == {id(named["head.bias"]), id(named["head_dist.bias"])}
    assert [groups[n]["weight_decay"] for n in ("body", "body_no_decay", "head", "head_no_decay")] == [0.05, 0, 0.3, 0]
    assert groups["head"]["lr_scale"] == 10.0 and groups["body"]["lr_scale"] == 1.0
    assert not any(id(p) in s for p in model.frozen.parameters() for s in ids.values())
    # make_optimizer applies the groups' LR scale and keeps their decay
    opt = make_optimizer("adamw", param_groups(model, 0.05, head_weight_decay=0.3, lr_scale_head=10.0), lr=1e-3)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["lr"] == pytest.approx(1e-2) and by_name["body"]["lr"] == pytest.approx(1e-3)
    assert by_name["head"]["weight_decay"] == 0.3 and by_name["body_no_decay"]["weight_decay"] == 0.0
    # everything decays alike when asked
    flat = param_groups(model, 0.05, no_decay_bias_norm=False)
    assert [g["name"] for g in flat] == ["body", "head"] and flat[1]["weight_decay"] == 0.05


def test_param_groups_on_a_registered_vit() -> None:
    import medvit

    model = medvit.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)
    groups = {g["name"]: g for g in param_groups(model, 0.05, head_weight_decay=0.1)}
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))
    assert {id(model.head.weight)} == {id(p) for p in groups["head"]["params"]}
    assert id(model.pos_embed) in {id(p) for p in groups["body_no_decay"]["params"]}


def test_adafactor_state_is_factored_and_smaller_than_adamw() -> None:
    def state_numel(name: str) -> tuple[int, torch.optim.Optimizer, nn.Linear]:
        torch.manual_seed(0)
        lin = nn.Linear(256, 256)
        opt = make_optimizer(name, lin.parameters(), lr=1e-2, weight_decay=0.0)
        before = lin.weight.detach().clone()
        lin(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        assert not torch.equal(lin.weight.detach(), before)
        numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
        return numel, opt, lin

    ada, opt, lin = state_numel("adafactor")
    adamw, _, _ = state_numel("adamw")
    assert isinstance(opt, torch.optim.Adafactor)
    shapes = {k: tuple(v.shape) for k, v in opt.state[lin.weight].items() if torch.is_tensor(v) and v.ndim > 0}
    assert sorted(shapes.values()) == [(1, 256), (256, 1)]  # a row and a column vector, no full matrix
    assert adamw == 2 * (256 * 256 + 256)
    assert ada < adamw / 100
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("lamb", lin.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="sam must be"):
        make_optimizer("sgd", lin.parameters(), lr=1.0, sam="gsam")


def test_ema_tracks_weights() -> None:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = model_ema(model, decay=0.9)
    for _ in range(4):
        ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight, model.weight)  # constant weights: ema == w
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.weight.detach(), torch.full((1, 2), 0.9 * 1.0 + 0.1 * 3.0))
    with pytest.raises(ValueError, match="decay"):
        model_ema(model, decay=1.0)


def test_ema_averages_buffers() -> None:
    model = nn.BatchNorm1d(2)
    ema = model_ema(model, decay=0.5)
    ema.update_parameters(model)
    with torch.no_grad():
        model.running_mean.fill_(4.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.running_mean, torch.full((2,), 2.0))


def test_schedule_factor() -> None:
    assert schedule_factor("cosine", 0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert schedule_factor("poly", 55, 100, 10) == pytest.approx(0.5**0.9)


def test_package_import_loads_no_torch() -> None:
    code = "import sys, medvit.optim, medvit.optim.schedule; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_adafactor_vit_first_step_on_a_rank_one_gradient() -> None:
    # g = a b^T makes g^2 rank one, so the factored second moment is exact: u = sign(g),
    # RMS 1 (no clipping), m = 0.1 sign(g) after one step from m = 0
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0, -1.0])
    w = nn.Parameter(torch.zeros(2, 3))
    opt = make_optimizer("adafactor_vit", [w], lr=0.5, weight_decay=0.0)
    assert isinstance(opt, AdafactorViT)
    (w * torch.outer(a, b)).sum().backward()
    opt.step()
    torch.testing.assert_close(w.detach(), -0.5 * 0.1 * torch.outer(a, b).sign())
    state = opt.state[w]
    assert state["m"].dtype == torch.bfloat16 and state["m"].shape == (2, 3)
    assert state["row"].shape == (2,) and state["col"].shape == (3,)


def test_adafactor_vit_clips_and_decays() -> None:
    # a vector keeps an unfactored second moment; at step 1 beta2 = 0, so u = sign(g)
    w = nn.Parameter(torch.ones(4))
    opt = AdafactorViT([w], lr=0.1, beta1=None, weight_decay=0.5, clip_threshold=0.5)
    w.grad = torch.tensor([1.0, -3.0, 2.0, 0.5])
    opt.step()
    # decay w * (1 - 0.1 * 0.5), then - 0.1 * sign(g) / (RMS 1 / 0.5)
    torch.testing.assert_close(w.detach(), 0.95 - 0.1 * 0.5 * w.grad.sign())
    assert "m" not in opt.state[w] and opt.state[w]["v"].shape == (4,)
    with pytest.raises(ValueError, match="beta1"):
        AdafactorViT([w], beta1=1.0)


def test_adafactor_vit_state_smaller_than_adamw() -> None:
    def state_bytes(name: str) -> int:
        lin = nn.Linear(256, 256)
        opt = make_optimizer(name, lin.parameters(), lr=1e-3)
        lin(torch.randn(4, 256)).sum().backward()
        opt.step()
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    # AdamW: two float32 moments; AdafactorViT: one bfloat16 moment + row/col vectors
    assert state_bytes("adafactor_vit") < state_bytes("adamw") / 3.5
