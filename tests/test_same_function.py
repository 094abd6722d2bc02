"""The cases gradreg 0.2.0 got silently wrong, one test each: GR's own namespace, the sign of normalized steps with
γ > ε, the same function in every pass (modes, buffers, in-place writes, optimizer steps), and the smaller ones."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import assert_same, make, snapshot
from test_reference import Net, closures, error

import gradreg as gr
from gradreg.engine import ParamGroup
from gradreg.reference import reference_direction
from gradreg.replay import ClosureError

GAMMA, EPS = 0.1, 0.05


# ------------------------------------------------------------------------ GR's own namespace


def test_adams_eps_is_adams_and_grs_eps_is_grs():
    model, closure, _, _ = make("mlp")
    opt = gr.GR(torch.optim.Adam(model.parameters()), gamma=GAMMA, eps=EPS)
    group = opt.param_groups[0]
    assert group["eps"] == 1e-8 and group["gradreg"] == {"gamma": GAMMA, "eps": EPS}
    group["gradreg"]["eps"] = 0.2  # a per-group GR eps leaves Adam's numerical eps alone
    opt.step(closure)
    assert group["eps"] == 1e-8


def test_sam_on_adamw_is_sams_direction_in_float32():
    model = Net(frozenset({"dropout"}), torch.float32)
    opt = gr.GR.sam(torch.optim.AdamW(model.parameters()), rho=0.05)
    cl = closures(model, 1, torch.float32)
    torch.manual_seed(0)
    want = reference_direction(cl, [ParamGroup(list(model.parameters()), 0.05, 0.05)], method="forward",
                               perturbation="normalized", modules=[model])
    torch.manual_seed(0)
    opt.direction(cl)
    assert error([p.grad for p in model.parameters()], want) <= 1e-5  # 0.2.0: 0.92 (Adam's eps as ρ)


class WithGamma(torch.optim.SGD):
    """A third-party optimizer with a ``gamma`` hyperparameter of its own."""

    def __init__(self, params, lr=0.1, gamma=0.9):
        super().__init__(params, lr=lr)
        self.defaults["gamma"] = gamma
        for group in self.param_groups:
            group.setdefault("gamma", gamma)


def test_an_optimizers_own_gamma_is_never_grs():
    model, closure, _, _ = make("mlp")
    opt = gr.GR(WithGamma(model.parameters()), gamma=GAMMA, eps=EPS)
    assert opt.param_groups[0]["gamma"] == 0.9 and opt.param_groups[0]["gradreg"]["gamma"] == GAMMA
    state = opt.state_dict()
    opt.load_state_dict(state)
    assert opt.param_groups[0]["gamma"] == 0.9


def test_plain_gamma_eps_keys_of_gradreg_0_2_are_refused_with_the_new_spelling():
    model, _, _, _ = make("mlp")
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"'gradreg': \{'gamma': 0.1\}"):
        gr.GR(torch.optim.SGD([{"params": params, "gamma": 0.2}], lr=0.1), gamma=GAMMA, eps=EPS)
    opt = gr.GR(torch.optim.SGD(params, lr=0.1), gamma=GAMMA, eps=EPS)
    opt.param_groups[0]["eps"] = 0.3  # set on a running optimizer: refused at the next step, not ignored
    with pytest.raises(ValueError, match="which SGD does not use"):
        opt.step(make("mlp")[1])


def test_a_gradreg_0_2_checkpoint_is_migrated():
    model, closure, _, _ = make("mlp")
    opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    opt.step(closure)
    state = opt.state_dict()
    old = {**state, "gr": {k: v for k, v in state["gr"].items() if k not in ("format", "base")},
           "param_groups": [{**{k: v for k, v in g.items() if k != "gradreg"}, "gamma": 0.3, "eps": 0.02}
                            for g in state["param_groups"]]}
    fresh = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=GAMMA, eps=EPS)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["gradreg"] == {"gamma": 0.3, "eps": 0.02} and "eps" not in fresh.param_groups[0]
    adam = gr.GR(torch.optim.Adam(model.parameters()), gamma=GAMMA, eps=EPS)
    adam.step(closure)
    state = adam.state_dict()
    old = {**state, "gr": {k: v for k, v in state["gr"].items() if k not in ("format", "base")},
           "param_groups": [{**{k: v for k, v in g.items() if k != "gradreg"}, "gamma": 0.3}
                            for g in state["param_groups"]]}
    with pytest.warns(UserWarning, match="GR's eps is taken from this wrapper"):
        adam.load_state_dict(old)
    assert adam.param_groups[0]["eps"] == 1e-8 and adam.param_groups[0]["gradreg"] == {"gamma": 0.3, "eps": EPS}


def test_a_checkpoint_of_another_base_optimizer_is_refused_before_anything_changes():
    model, closure, _, _ = make("mlp")
    adam = gr.GR(torch.optim.Adam(model.parameters()), gamma=GAMMA, eps=EPS)
    adam.step(closure)
    sgd = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS)
    before = snapshot(model, sgd)
    with pytest.raises(ValueError, match="GR around Adam, this GR wraps SGD"):
        sgd.load_state_dict(adam.state_dict())
    plain = adam.state_dict()
    del plain["gr"]
    with pytest.raises(ValueError, match=r"key\(s\) \['amsgrad', 'betas'.*another optimizer"):
        sgd.load_state_dict(plain)
    assert_same(snapshot(model, sgd), before)


def test_gr_pickles_with_an_lr_scheduler_attached():
    model, closure, _, _ = make("mlp")
    opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    opt.step(closure)
    copied = pickle.loads(pickle.dumps(opt))
    assert copied.param_groups[0]["gradreg"] == opt.param_groups[0]["gradreg"]


def test_a_second_gr_around_a_copied_base_is_refused():
    model, _, _, _ = make("mlp")
    copied = copy.deepcopy(gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS))
    with pytest.raises(ValueError, match="already wrapped"):
        gr.GR(copied.base_optimizer, gamma=0.5, eps=EPS)
    with pytest.raises(TypeError, match="already a gradreg.GR"):
        gr.GR(copied, gamma=0.5, eps=EPS)


@pytest.mark.parametrize("value", ["no", None, 1])
def test_keep_buffer_must_be_a_bool(value):
    model, _, _, _ = make("mlp")
    with pytest.raises(TypeError, match="keep_buffer must be True or False"):
        gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS, keep_buffer=value)


# ------------------------------------------------------------------------ normalized and adaptive with γ > ε


@pytest.mark.parametrize("perturbation", ["normalized", "adaptive"])
@pytest.mark.parametrize("c", [2.0, 5.0])
def test_normalized_and_adaptive_steps_with_gamma_above_eps_climb(perturbation, c):
    model, closure, _, _ = make("mlp")
    groups = [ParamGroup(list(model.parameters()), c * 0.1, 0.1)]
    torch.manual_seed(1)
    want = reference_direction(closure, groups, method="forward", perturbation=perturbation, modules=[model])
    torch.manual_seed(1)
    gr.gr_grad(closure, model.parameters(), gamma=c * 0.1, eps=0.1, perturbation=perturbation)
    assert error([p.grad for p in model.parameters()], want) <= 1e-12  # 0.2.0: 0.49 (c = 2), 0.90 (c = 5)


def test_gnp_with_lambda_above_r_is_gnps_formula():
    model, closure, _, _ = make("mlp")
    opt = gr.GR.gnp(torch.optim.SGD(model.parameters(), lr=0.1), lam=0.2, r=0.1)
    torch.manual_seed(1)
    want = reference_direction(closure, [ParamGroup(list(model.parameters()), 0.2, 0.1)], method="forward",
                               perturbation="normalized", modules=[model])
    torch.manual_seed(1)
    opt.direction(closure)
    assert error([p.grad for p in model.parameters()], want) <= 1e-12


# ------------------------------------------------------------------------ the same function in every pass


def test_a_closure_that_switches_to_eval_is_refused_and_nothing_changes():
    model, _, x, y = make("mlp")
    opt = gr.GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=GAMMA, eps=EPS)

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.eval()  # e.g. to compute a metric
        return loss

    before = snapshot(model, opt)
    with pytest.raises(ClosureError, match=r"eval mode in pass 2 but ran in train mode in pass 1"):
        opt.step(closure)
    model.train()
    assert_same(snapshot(model, opt), before)


def test_a_spectral_norm_parametrization_sees_the_same_vectors_in_every_pass():
    model = Net(frozenset({"parametrization"}), torch.float64)
    ref, plain = copy.deepcopy(model), copy.deepcopy(model)
    closures(plain, 1, torch.float64)[0]()  # one plain forward: u advances once
    want = reference_direction(closures(ref, 1, torch.float64), [ParamGroup(list(ref.parameters()), GAMMA, EPS)],
                               method="forward", modules=[ref])
    gr.gr_grad(closures(model, 1, torch.float64), model.parameters(), gamma=GAMMA, eps=EPS)
    assert_same(dict(model.named_buffers()), dict(plain.named_buffers()))  # 0.2.0: u 3e-2 off
    assert error([p.grad for p in model.parameters()], want) <= 1e-12


def test_an_optimizer_step_inside_the_closure_is_refused_before_it_runs():
    model, _, x, y = make("mlp")
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = gr.GR(base, gamma=GAMMA, eps=EPS)
    opt.step(make("mlp")[1])

    def closure():
        base.step()
        return torch.nn.functional.cross_entropy(model(x), y)

    before = snapshot(model, opt)
    with pytest.raises(ClosureError, match=r"the closure called SGD.step\(\)"):
        opt.step(closure)
    assert_same(snapshot(model, opt), before)
    with pytest.raises(ClosureError, match=r"the closure called GR.step\(\)"):
        opt.step(lambda: opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y)))
    assert_same(snapshot(model, opt), before)


def test_an_embedding_with_max_norm_is_refused_before_it_writes():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, max_norm=0.5)
    before = emb.weight.detach().clone()
    with pytest.raises(ClosureError, match=r"Embedding\(max_norm=0.5\) renormalizes its weight in place"):
        gr.gr_grad(lambda: emb(torch.tensor([1, 2])).pow(2).sum(), emb.parameters(), gamma=GAMMA, eps=EPS)
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("where", ["first pass", "perturbed pass"])
def test_an_in_place_write_to_theta_is_an_error_that_says_what_it_could_undo(where):
    model, _, x, y = make("mlp")
    weight = model[0].weight
    calls = []

    def closure():
        calls.append(1)
        if where == "first pass" or len(calls) > 1:
            with torch.no_grad():
                weight.clamp_(-0.2, 0.2)
        return torch.nn.functional.cross_entropy(model(x), y)

    theta = weight.detach().clone()
    with pytest.raises(ClosureError, match="wrote parameter") as info:
        gr.gr_grad(closure, model.parameters(), gamma=GAMMA, eps=EPS)
    note = " ".join(info.value.__notes__)
    if where == "first pass":  # θ itself was written: the note does not claim it was restored
        assert "except the closure's own in-place write to θ" in note
    else:  # the write hit the perturbed point's buffer: θ is exactly as before
        assert torch.equal(weight, theta) and "except" not in note


def test_a_complex_loss_is_refused():
    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(TypeError, match="real floating-point loss, got dtype torch.complex64"):
        gr.gr_grad(lambda: (w * (1 + 1j)).sum(), [w], gamma=GAMMA, eps=EPS)


def test_double_backprop_names_pass_2_when_only_the_hessian_vector_product_is_non_finite():
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(gr.NonFiniteError, match=r"pass 2 \(Hessian-vector product") as info:
        gr.gr_grad(lambda: w.abs().pow(1.5).sum(), [w], gamma=GAMMA, method="double")
    assert info.value.pass_index == 2


def test_gamma_zero_leaves_grad_none_where_autograd_gives_none():
    model = Net(frozenset({"unused"}), torch.float64)
    base = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    opt = gr.GR(base, gamma=0.0, eps=EPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closures(model, 1, torch.float64))
    assert model.unused.grad is None and torch.equal(model.unused, torch.ones(4, dtype=torch.float64))
