"""The GR optimizer wrapper: equivalence with the base optimizer, exact resume, torch.optim conventions."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_same, batch, loss_fn, mlp, snapshot

import gradreg as gr

BASES = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
}


def batches(n: int):
    return [batch("mlp", seed=100 + i) for i in range(n)]


def train(model, optimizer, data, *, gr_step: bool, scheduler=None):
    for x, y in data:
        if gr_step:
            optimizer.step(lambda x=x, y=y: loss_fn(model(x), y))
        else:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", ["forward", "backward", "central", "double"])
def test_gamma_zero_steps_equal_the_base_optimizer_bit_for_bit(base, method):
    """Dropout and BatchNorm included: same masks, same running statistics, same parameters."""
    data = batches(4)
    plain_model, gr_model = mlp(), mlp()
    plain = BASES[base](plain_model.parameters())
    wrapped = gr.GR(BASES[base](gr_model.parameters()), gamma=0.0, eps=0.1, method=method)
    torch.manual_seed(7)
    train(plain_model, plain, data, gr_step=False)
    torch.manual_seed(7)
    train(gr_model, wrapped, data, gr_step=True)
    assert_same(gr_model.state_dict(), plain_model.state_dict())
    assert_same(wrapped.base_optimizer.state_dict()["state"], plain.state_dict()["state"])


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", ["forward", "double"])
def test_state_dict_round_trip_resumes_exactly(base, method):
    """5 steps, save model + optimizer (+ scheduler), load into fresh objects, 5 more = 10 uninterrupted."""
    data = batches(10)

    def build():
        model = mlp()
        optimizer = gr.GR(BASES[base](model.parameters()), gamma=0.05, eps=0.1, method=method)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return model, optimizer, scheduler

    torch.manual_seed(3)
    model, optimizer, scheduler = build()
    train(model, optimizer, data, gr_step=True, scheduler=scheduler)

    torch.manual_seed(3)
    first, opt1, sched1 = build()
    train(first, opt1, data[:5], gr_step=True, scheduler=sched1)
    saved = copy.deepcopy((first.state_dict(), opt1.state_dict(), sched1.state_dict(), torch.get_rng_state()))
    resumed, opt2, sched2 = build()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    train(resumed, opt2, data[5:], gr_step=True, scheduler=sched2)

    assert_same(resumed.state_dict(), model.state_dict())
    assert_same(opt2.state_dict(), optimizer.state_dict())
    initial_lr = BASES[base]([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]
    assert opt2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == initial_lr * 0.5**3


def test_gamma_and_eps_per_group_survive_state_dict_and_reach_the_engine():
    model = mlp()
    params = list(model.parameters())
    base = torch.optim.SGD([{"params": params[:2], "gradreg": {"gamma": 0.2, "eps": 0.05}}, {"params": params[2:]}],
                           lr=0.1)
    optimizer = gr.GR(base, gamma=0.01, eps=0.1)
    assert [g["gradreg"] for g in optimizer.param_groups] == [{"gamma": 0.2, "eps": 0.05}, {"gamma": 0.01, "eps": 0.1}]
    state = optimizer.state_dict()
    assert [g["gradreg"]["gamma"] for g in state["param_groups"]] == [0.2, 0.01]
    fresh = gr.GR(torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1), gamma=0.3, eps=0.3)
    fresh.load_state_dict(state)
    assert [g["gradreg"] for g in fresh.param_groups] == [{"gamma": 0.2, "eps": 0.05}, {"gamma": 0.01, "eps": 0.1}]
    assert fresh.param_groups is fresh.base_optimizer.param_groups  # no stale alias after loading


def test_lr_scheduler_and_per_group_lr_act_on_the_base_optimizer():
    model = mlp()
    params = list(model.parameters())
    optimizer = gr.GR(torch.optim.SGD([{"params": params[:2], "lr": 0.5}, {"params": params[2:]}], lr=0.1),
                      gamma=0.01, eps=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.1**epoch)
    x, y = batch("mlp")
    optimizer.step(lambda: loss_fn(model(x), y))
    scheduler.step()
    assert [g["lr"] for g in optimizer.base_optimizer.param_groups] == pytest.approx([0.05, 0.01])


def test_direction_then_clipping_then_base_step():
    """The split step: the GR direction lands in .grad, clipping sees it, the base optimizer uses it."""
    model = mlp()
    x, y = batch("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.05, eps=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    optimizer.direction(lambda: loss_fn(model(x), y))
    direction = [p.grad.clone() for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    assert norm > 0.5
    optimizer.base_optimizer.step()
    scale = 0.5 / (norm + 1e-6)
    for p, p0, d in zip(model.parameters(), before, direction):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * scale * d, rtol=1e-12, atol=1e-14)


def test_skip_mode_counts_and_changes_nothing():
    model = mlp()
    x, y = batch("mlp")
    optimizer = gr.GR(torch.optim.Adam(model.parameters()), gamma=0.05, eps=0.1, on_nonfinite="skip")
    optimizer.step(lambda: loss_fn(model(x), y))
    before = snapshot(model, optimizer)
    calls = []

    def nan_in_second_pass():
        calls.append(1)
        loss = loss_fn(model(x), y)
        return loss * float("nan") if len(calls) == 2 else loss

    assert optimizer.step(nan_in_second_pass) is None
    assert optimizer.skipped_steps == 1
    assert optimizer.state_dict()["gr"]["skipped_steps"] == 1
    before["opt"]["gr"]["skipped_steps"] = 1
    assert_same(snapshot(model, optimizer), before)


def test_add_param_group_goes_to_the_base_with_gr_defaults():
    model = mlp()
    params = list(model.parameters())
    optimizer = gr.GR(torch.optim.SGD(params[:2], lr=0.1), gamma=0.02, eps=0.1)
    optimizer.add_param_group({"params": params[2:], "gradreg": {"gamma": 0.5}})
    assert len(optimizer.base_optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["gradreg"] == {"gamma": 0.5, "eps": 0.1}
    with pytest.raises(ValueError, match=r"gamma \(param group 2\) must be a finite number >= 0, got -1.0"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "gradreg": {"gamma": -1.0}})


def test_step_without_closure_and_wrong_base_are_refused():
    model = mlp()
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.02, eps=0.1)
    with pytest.raises(TypeError, match=r"GR.step\(\) needs a closure"):
        optimizer.step()
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer"):
        gr.GR(list(model.parameters()), gamma=0.1, eps=0.1)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.1, eps=0.1, on_nonfinite="ignore")


def test_zero_grad_and_repr():
    model = mlp()
    x, y = batch("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.02, eps=0.1)
    optimizer.step(lambda: loss_fn(model(x), y))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "GR(method='forward'" in repr(optimizer)


def test_a_base_optimizer_wrapped_twice_is_refused():
    """The groups hold the first wrapper's gamma/eps; a second wrapper must not silently run with them."""
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    gr.GR(base, gamma=0.01, eps=0.01)
    with pytest.raises(ValueError, match="already wrapped by a gradreg.GR"):
        gr.GR(base, gamma=0.5, eps=0.5)


def _schedulers(optimizer):
    """One instance of every LR scheduler torch ships, built on ``optimizer`` (SGD with momentum underneath)."""
    sched = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda: sched.LambdaLR(optimizer, lambda e: 0.9**e),
        "MultiplicativeLR": lambda: sched.MultiplicativeLR(optimizer, lambda e: 0.95),
        "StepLR": lambda: sched.StepLR(optimizer, step_size=2, gamma=0.5),
        "MultiStepLR": lambda: sched.MultiStepLR(optimizer, milestones=[1, 3], gamma=0.5),
        "ConstantLR": lambda: sched.ConstantLR(optimizer, factor=0.5, total_iters=2),
        "LinearLR": lambda: sched.LinearLR(optimizer, start_factor=0.5, total_iters=3),
        "ExponentialLR": lambda: sched.ExponentialLR(optimizer, gamma=0.9),
        "PolynomialLR": lambda: sched.PolynomialLR(optimizer, total_iters=4, power=2.0),
        "CosineAnnealingLR": lambda: sched.CosineAnnealingLR(optimizer, T_max=4),
        "CosineAnnealingWarmRestarts": lambda: sched.CosineAnnealingWarmRestarts(optimizer, T_0=2),
        "CyclicLR": lambda: sched.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2),
        "OneCycleLR": lambda: sched.OneCycleLR(optimizer, max_lr=0.1, total_steps=10),
        "SequentialLR": lambda: sched.SequentialLR(
            optimizer, [sched.ConstantLR(optimizer, factor=0.5, total_iters=2), sched.ExponentialLR(optimizer, 0.9)],
            milestones=[2]),
        "ChainedScheduler": lambda: sched.ChainedScheduler(
            [sched.ConstantLR(optimizer, factor=0.5, total_iters=2), sched.ExponentialLR(optimizer, 0.9)]),
        "ReduceLROnPlateau": lambda: sched.ReduceLROnPlateau(optimizer, patience=0, factor=0.5),
    }


SCHEDULERS = list(_schedulers(None))


def test_every_torch_scheduler_is_listed():
    import inspect

    shipped = {name for name, cls in inspect.getmembers(torch.optim.lr_scheduler, inspect.isclass)
               if cls.__module__.startswith("torch.optim") and not name.startswith("_") and name != "LRScheduler"
               and (issubclass(cls, torch.optim.lr_scheduler.LRScheduler) or name == "ReduceLROnPlateau")}
    assert shipped == set(SCHEDULERS)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_torch_lr_scheduler_drives_the_wrapper_as_it_drives_the_base(name):
    """GR.defaults carry the base's defaults (momentum: OneCycleLR and CyclicLR cycle it), and the learning
    rates and momenta a scheduler sets on the wrapper are exactly those it sets on a plain SGD."""
    x, y = batch("mlp")
    runs = {}
    for wrapped in (False, True):
        model = mlp()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer = gr.GR(base, gamma=0.0, eps=0.1) if wrapped else base
        scheduler = _schedulers(optimizer)[name]()
        seen = []
        torch.manual_seed(3)
        for _ in range(6):
            if wrapped:
                loss = optimizer.step(lambda model=model: loss_fn(model(x), y))
            else:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
            scheduler.step(float(loss)) if name == "ReduceLROnPlateau" else scheduler.step()
            seen.append([(g["lr"], g["momentum"]) for g in base.param_groups])
        runs[wrapped] = seen
    assert runs[True] == runs[False]


@pytest.mark.parametrize("method", ["forward", "backward", "central"])
@pytest.mark.parametrize("perturbation", ["raw", "normalized"])
def test_the_kept_buffer_changes_nothing_but_where_the_point_lives(method, perturbation):
    data = batches(3)
    kept_model, fresh_model = mlp(), mlp()
    kept = gr.GR(torch.optim.SGD(kept_model.parameters(), lr=0.05, momentum=0.9), gamma=0.05, eps=0.1,
                 method=method, perturbation=perturbation)
    fresh = gr.GR(torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9), gamma=0.05, eps=0.1,
                  method=method, perturbation=perturbation, keep_buffer=False)
    torch.manual_seed(7)
    train(kept_model, kept, data[:1], gr_step=True)
    pointers = {id(p): b.data_ptr() for p, b in kept.buffer.items()}
    train(kept_model, kept, data[1:], gr_step=True)
    torch.manual_seed(7)
    train(fresh_model, fresh, data, gr_step=True)
    assert_same(kept_model.state_dict(), fresh_model.state_dict())
    assert fresh.buffer is None and len(kept.buffer) == len(list(kept_model.parameters()))
    assert {id(p): b.data_ptr() for p, b in kept.buffer.items()} == pointers  # the same memory every step
