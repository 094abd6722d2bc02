"""Habits users bring from other code, and valid setups that used to crash: each gets a clear error or the correct
result, never a silently wrong direction, and a refused step leaves everything as it was (float64 throughout)."""

from __future__ import annotations

import copy
import fractions
import pickle

import pytest
import torch
from helpers import (
    assert_same,
    grads_of,
    make,
    params_of,
    reference_gr_direction,
    rel_err,
    snapshot,
    square_whose_double_backward_raises,
)
from torch import nn

import gradreg as gr
from gradreg.engine import ParamGroup, gr_direction

GAMMA, EPS, SEED = 0.1, 0.05, 5
FD = ["forward", "backward", "central"]


def gr_step(closure, model, **kwargs):
    torch.manual_seed(SEED)
    return gr.gr_grad(closure, model.parameters(), **kwargs)


# ------------------------------------------------------------------------------ closures with foreign habits


def _habits(model, optimizer):
    """Closures that call what a plain training loop calls; the engine must refuse every one of them."""
    return {
        "optimizer.zero_grad()": lambda closure: (optimizer.zero_grad(), closure())[1],
        "model.zero_grad()": lambda closure: (model.zero_grad(), closure())[1],
        "zero_grad(set_to_none=False)": lambda closure: (model.zero_grad(set_to_none=False), closure())[1],
        "backward(retain_graph=True)": lambda closure: (lambda loss: (loss.backward(retain_graph=True), loss)[1])(
            closure()),
        "backward() and a detached loss": lambda closure: (lambda loss: (loss.backward(), loss.detach())[1])(
            closure()),
        "touches .grad": lambda closure: ([p.grad.mul_(2) for p in model.parameters() if p.grad is not None],
                                          closure())[1],
    }


@pytest.mark.parametrize("method", [*FD, "double"])
@pytest.mark.parametrize("habit", ["optimizer.zero_grad()", "model.zero_grad()", "zero_grad(set_to_none=False)",
                                   "backward(retain_graph=True)", "backward() and a detached loss", "touches .grad"])
def test_a_closure_that_changes_grad_is_refused_and_nothing_changes(method, habit):
    """.grad is set aside while a step runs, so a closure meets .grad = None in pass 1 (zeroing it is then
    harmless: DB-GR, which has one closure call, gives the exact direction) and the engine's own gradient in the
    later passes, where any change is refused."""
    model, closure, _, _ = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS,
                      method=method)
    optimizer.step(closure)  # .grad and momentum exist now
    bad = _habits(model, optimizer)[habit]
    before = snapshot(model, optimizer)
    if method == "double" and "backward" not in habit:
        torch.manual_seed(SEED)
        optimizer.direction(lambda: bad(closure))
        harmless = grads_of(model)
        torch.manual_seed(SEED)
        optimizer.direction(closure)
        assert_same(harmless, grads_of(model))
        return
    with pytest.raises((RuntimeError, ValueError), match=r"closure|backward") as info:
        optimizer.step(lambda: bad(closure))
    message = str(info.value)
    assert "remove" in message or "backward() itself" in message, message
    assert_same(snapshot(model, optimizer), before)


def test_a_closure_that_touches_grad_and_then_fails_leaves_grad_bit_for_bit():
    model, closure, _, _ = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS)
    optimizer.step(closure)
    before = snapshot(model, optimizer)
    calls = []

    def touching():
        calls.append(1)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.add_(1.0)
        if len(calls) == 2:
            raise RuntimeError("the data loader broke")
        return closure()

    with pytest.raises(RuntimeError):
        optimizer.step(touching)
    assert_same(snapshot(model, optimizer), before)


def test_the_error_names_the_pass_on_python_without_add_note():
    from gradreg.replay import annotate

    class NoNotes(RuntimeError):
        add_note = property(lambda self: (_ for _ in ()).throw(AttributeError("add_note")))

    exc = NoNotes("kernel failed")
    annotate(exc, "gradreg: raised in pass 2")
    assert str(exc) == "kernel failed\ngradreg: raised in pass 2"
    exc = RuntimeError("kernel failed")
    annotate(exc, "gradreg: raised in pass 2")
    assert str(exc) == "kernel failed" and exc.__notes__ == ["gradreg: raised in pass 2"]


# ------------------------------------------------------------------------------------- what params may be


def test_a_parameter_listed_twice_is_refused():
    model, closure, _, _ = make("mlp")
    params = list(model.parameters())
    with pytest.raises(ValueError, match="a parameter appears twice"):
        gr.gr_grad(closure, [*params, params[0]], gamma=GAMMA, eps=EPS)
    with pytest.raises(ValueError, match="appears twice"):
        gr_direction(closure, [ParamGroup(params[:3], GAMMA, EPS), ParamGroup(params[2:], GAMMA, EPS)])
    with pytest.warns(UserWarning, match="duplicate"):  # torch only warns about duplicates within a group
        base = torch.optim.SGD([*params, params[0]], lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="appears twice"):
        gr.GR(base, gamma=GAMMA, eps=EPS).step(closure)
    assert_same(snapshot(model), before)


@pytest.mark.parametrize(("params", "match"), [
    (lambda m: m[0].weight, "iterable of Tensors.*got Parameter"),
    (lambda m: dict(m.named_parameters()), "iterable of Tensors.*got dict"),
    (lambda m: m, r"use model\.parameters\(\)"),
    (lambda m: m.named_parameters(), r"named_parameters\(\)"),
    (lambda m: [1.0, 2.0], "Tensors only, got a float"),
])
def test_params_of_the_wrong_kind_get_torch_optims_kind_of_message(params, match):
    model, closure, _, _ = make("mlp")
    with pytest.raises(TypeError, match=match):
        gr.gr_grad(closure, params(model), gamma=GAMMA, eps=EPS)


def test_closure_must_be_callable():
    model, _, _, _ = make("mlp")
    with pytest.raises(TypeError, match="closure must be a callable"):
        gr.gr_grad(None, model.parameters(), gamma=GAMMA, eps=EPS)


@pytest.mark.parametrize("method", [*FD, "double"])
def test_empty_and_frozen_groups_are_skipped(method):
    model, closure, x, y = make("mlp")
    frozen = nn.Parameter(torch.zeros(3, dtype=torch.float64), requires_grad=False)
    base = torch.optim.SGD([{"params": list(model.parameters())}, {"params": []}, {"params": [frozen]}], lr=0.1)
    optimizer = gr.GR(base, gamma=GAMMA, eps=EPS, method=method)
    torch.manual_seed(SEED)
    optimizer.direction(closure)
    alone = make("mlp")[0]
    torch.manual_seed(SEED)
    gr.gr_grad(lambda: closure.__class__ and nn.functional.cross_entropy(alone(x), y, reduction="sum"),
               alone.parameters(), gamma=GAMMA, eps=EPS, method=method)
    assert_same(grads_of(model), grads_of(alone))
    assert frozen.grad is None


# ------------------------------------------------------------------------ models that used to crash DB-GR


class WithUnused(nn.Module):
    """An MLP, a parameter the loss never reaches and a bias the loss is linear in (Hg is zero there)."""

    def __init__(self):
        super().__init__()
        self.net = make("mlp")[0]
        self.unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.shift = nn.Parameter(torch.full((3,), 0.5, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("method", ["double", *FD])
def test_unused_and_linear_parameters_get_their_exact_direction(method):
    _, _, x, y = make("mlp")
    model = WithUnused()

    def closure():
        return nn.functional.cross_entropy(model(x), y, reduction="sum") + model.shift.sum()

    expected = reference_gr_direction(model.net, x, y, GAMMA, SEED)
    gr_step(closure, model, gamma=GAMMA, eps=1e-6, method=method)
    got = {k.removeprefix("net."): v.grad for k, v in model.named_parameters() if k.startswith("net.")}
    assert rel_err(got, expected) <= (1e-10 if method == "double" else 1e-5)
    assert model.unused.grad is None  # as after a plain backward: no gradient, no .grad
    assert torch.allclose(model.shift.grad, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)


def test_double_blames_a_missing_double_backward_only_when_that_is_the_cause():
    model, closure, _, _ = make("mlp")

    square = square_whose_double_backward_raises("out of memory while allocating")  # not a missing derivative
    with pytest.raises(RuntimeError, match="out of memory") as info:
        gr.gr_grad(lambda: square(closure()), model.parameters(), gamma=GAMMA, method="double")
    notes = " ".join(info.value.__notes__)
    assert "pass 2" in notes and "no double backward" not in notes


# --------------------------------------------------------------------------------- state that must be kept


def instance_norm_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8, 3)).double()


@pytest.mark.parametrize("method", [*FD, "double"])
def test_instance_norm_running_stats_updated_once_as_in_a_plain_step(method):
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    model, plain = instance_norm_model(), instance_norm_model()
    plain(x)
    gr.gr_grad(lambda: nn.functional.cross_entropy(model(x), y), model.parameters(), gamma=GAMMA, eps=EPS,
               method=method)
    assert_same(dict(model.named_buffers()), dict(plain.named_buffers()))


def test_cumulative_batchnorm_and_lazy_batchnorm_updated_once():
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(), nn.LazyBatchNorm1d(),
                              nn.Linear(6, 3)).double()
        model(x)  # lazy modules are initialized by a first forward, as torch's documentation asks
        return model

    model, plain = build(), build()
    plain(x)
    gr.gr_grad(lambda: nn.functional.cross_entropy(model(x), y), model.parameters(), gamma=GAMMA, eps=EPS,
               method="central")
    assert_same(dict(model.named_buffers()), dict(plain.named_buffers()))


def test_top_eigenvalue_leaves_instance_norm_statistics_and_grad_alone():
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    model = instance_norm_model()
    model(x).sum().backward()
    before = snapshot(model)
    gr.hessian.top_eigenvalue(lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()), iters=5)
    assert_same(snapshot(model), before)


@pytest.mark.parametrize("base", [lambda p: torch.optim.LBFGS(p), lambda p: torch.optim.SparseAdam(p)])
def test_base_optimizers_that_cannot_take_a_direction_are_refused_at_construction(base):
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="base_optimizer: .*(closure of its own|sparse gradients)"):
        gr.GR(base(list(model.parameters())), gamma=GAMMA, eps=EPS)


def test_sparse_gradients_are_refused_before_any_perturbation():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"sparse gradients .*sparse=False") as info:
        gr.gr_grad(lambda: emb(torch.tensor([1, 2, 3])).pow(2).sum(), emb.parameters(), gamma=GAMMA, eps=EPS)
    assert "pass 1" in " ".join(info.value.__notes__)
    assert torch.equal(emb.weight, before) and emb.weight.grad is None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_gr_optimizer_can_be_copied_and_pickled(how):
    model, closure, x, y = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    optimizer.step(closure)
    pair = (model, optimizer)
    model2, optimizer2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    for m, opt in ((model, optimizer), (model2, optimizer2)):
        torch.manual_seed(SEED)
        opt.step(lambda m=m: nn.functional.cross_entropy(m(x), y, reduction="sum"))
    assert_same(model2.state_dict(), model.state_dict())
    assert_same(optimizer2.state_dict(), optimizer.state_dict())
    assert optimizer2.param_groups[0]["params"][0] is next(model2.parameters())


def test_add_param_group_checks_before_it_changes_anything():
    model, _, _, _ = make("mlp")
    params = list(model.parameters())
    optimizer = gr.GR(torch.optim.SGD(params[:2], lr=0.1), gamma=GAMMA, eps=EPS)
    with pytest.raises(ValueError, match=r"eps \(param group 1\) must be a finite number > 0"):
        optimizer.add_param_group({"params": params[2:], "gradreg": {"eps": -1.0}})
    with pytest.raises(ValueError, match="which SGD does not use: GR's per-group settings live in the group's"):
        optimizer.add_param_group({"params": params[2:], "eps": 0.2})  # gradreg 0.2.0's way
    with pytest.raises(TypeError, match="param_group must be a dict"):
        optimizer.add_param_group(params[2:])
    assert len(optimizer.param_groups) == 1 and len(optimizer.base_optimizer.param_groups) == 1
    optimizer.add_param_group({"params": params[2:], "gradreg": {"eps": 0.2}})
    assert optimizer.param_groups[1]["gradreg"] == {"gamma": GAMMA, "eps": 0.2}


def _checkpoint(**changes):
    model, closure, _, _ = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    optimizer.step(closure)
    state = copy.deepcopy(optimizer.state_dict())
    for key, value in changes.items():
        if key in state["gr"]:
            state["gr"][key] = value
        else:
            state["param_groups"][0]["gradreg"][key] = value
    return state


@pytest.mark.parametrize(("changes", "match"), [
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
    (dict(method="fgr"), "the checkpoint was saved by a GR with method='fgr'"),
    (dict(perturbation="l2"), "the checkpoint was saved by a GR with perturbation='l2'"),
    (dict(adaptive_eta=-1.0), "the checkpoint was saved by a GR with adaptive_eta=-1.0"),
    (dict(local_perturbation=True), "the checkpoint was saved by a GR with local_perturbation=True"),
    (dict(base="Adam"), "the checkpoint is of GR around Adam, this GR wraps SGD"),
    (dict(format=7), r"state_dict\['gr'\]\['format'\] is 7"),
    (dict(eps=0.0), r"eps \(param group 0\) must be a finite number > 0"),
    (dict(gamma=float("nan")), r"gamma \(param group 0\) must be"),
    (dict(skipped_steps=-2), "skipped_steps must be an integer >= 0"),
])
def test_load_state_dict_validates_everything_before_it_changes_anything(changes, match):
    model, closure, _, _ = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=match):
        optimizer.load_state_dict(_checkpoint(**changes))
    assert_same(optimizer.state_dict(), before)


def test_load_state_dict_restores_per_group_eps_and_refuses_another_method():
    """A forward checkpoint's per-group eps is restored; a DB-GR refuses it (it used to switch silently)."""
    state = _checkpoint(eps=0.3)
    model, closure, _, _ = make("mlp")
    optimizer = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["gradreg"] == {"gamma": GAMMA, "eps": 0.3} and optimizer.method == "forward"
    optimizer.step(closure)
    double = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, method="double")
    before = copy.deepcopy(double.state_dict())
    with pytest.raises(ValueError, match=r"method='forward', this GR has method='double'.*GR\(\.\.\., method="):
        double.load_state_dict(state)
    assert_same(double.state_dict(), before)


# ------------------------------------------------------------------------------------ unchecked arguments


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(adaptive_eta=-0.1), ValueError, "adaptive_eta must be a finite number >= 0"),
    (dict(adaptive_eta=float("nan")), ValueError, "adaptive_eta must be a finite number >= 0"),
    (dict(adaptive_eta="0.1"), TypeError, "adaptive_eta must be a finite number >= 0"),
    (dict(method="double", perturbation="normalized"), ValueError, "does not apply to method='double'"),
    (dict(method="double", eps=-1.0), ValueError, "eps must be a finite number > 0"),
    (dict(gamma=1e300, eps=1e-300), ValueError, "overflows: c = γ/ε must be finite"),
])
def test_arguments_are_checked(kwargs, error, match):
    model, closure, _, _ = make("mlp")
    kwargs = {"gamma": GAMMA, "eps": EPS, **kwargs}
    with pytest.raises(error, match=match):
        gr.gr_grad(closure, model.parameters(), **kwargs)
    with pytest.raises(error, match=match):
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_any_real_number_is_accepted_as_float():
    model, closure, _, _ = make("mlp")
    before = params_of(model)
    gr_step(closure, model, gamma=fractions.Fraction(1, 10), eps=fractions.Fraction(1, 20))
    fraction = grads_of(model)
    gr_step(closure, model, gamma=0.1, eps=0.05)
    assert_same(fraction, grads_of(model))
    assert_same(params_of(model), before)
    opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=fractions.Fraction(1, 10), eps=0.05)
    assert type(opt.defaults["gradreg"]["gamma"]) is float
