"""The fast engine against the literal one (gradreg.reference) over the product of every option, property-based.

The reference is first checked against independent oracles (torch.func, gradients at explicitly built points);
then hypothesis (derandomized, a fixed budget) draws method × perturbation × c = γ/ε from 0.01 to 10 (1 and > 1
included) × one to three groups with their own (γ, ε) × one to three micro-batches × GradScaler on/off ×
float32/float64 × every torch.optim base optimizer × model features (dropout, BatchNorm, InstanceNorm, a
spectral-norm parametrization, a parameter without gradient), and the invariants: γ = 0 is the base optimizer bit
for bit, and a fault in any pass leaves everything as it was.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import assert_same, reference_gr_direction, reference_gradient, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradreg as gr
from gradreg import methods
from gradreg.engine import ParamGroup
from gradreg.reference import reference_direction

#: Every optimizer class torch.optim ships, found by inspection (not typed in), and those GR refuses.
ALL_OPTIMIZERS = sorted((c for c in vars(torch.optim).values() if isinstance(c, type)
                         and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer),
                        key=lambda c: c.__name__)
REFUSED = {"LBFGS", "SparseAdam"}
OPTIMIZERS = [c for c in ALL_OPTIMIZERS if c.__name__ not in REFUSED]
FEATURES = ("dropout", "batchnorm", "instancenorm", "parametrization", "unused")
C_VALUES = (0.01, 0.3, 1.0, 2.0, 10.0)


class Net(nn.Module):
    """A smooth model with the chosen features (a parameter the loss never uses for "unused")."""

    def __init__(self, features: frozenset[str], dtype: torch.dtype, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.first = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if "batchnorm" in features else nn.Identity()
        self.drop = nn.Dropout(0.2) if "dropout" in features else nn.Identity()
        self.inorm = (nn.InstanceNorm1d(2, affine=True, track_running_stats=True) if "instancenorm" in features
                      else nn.Identity())
        self.last = nn.Linear(8, 3)
        if "parametrization" in features:
            torch.nn.utils.parametrizations.spectral_norm(self.last)
        if "unused" in features:
            self.unused = nn.Parameter(torch.ones(4))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.bn(self.first(x))))
        h = self.inorm(h.view(-1, 2, 4)).view(-1, 8)
        return self.last(h)


def closures(model: nn.Module, micro: int, dtype: torch.dtype, n: int = 12) -> list:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)
    chunks = list(zip(x.chunk(micro), y.chunk(micro)))
    return [lambda xi=xi, yi=yi: nn.functional.cross_entropy(model(xi), yi, reduction="sum") for xi, yi in chunks]


def base_optimizer(cls: type, groups: list[list[torch.Tensor]]) -> torch.optim.Optimizer:
    """``cls`` on ``groups`` with its defaults and lr 0.01 where it takes one (Muon takes matrices only: the callers
    give it matrix-only groups)."""
    kwargs = {"lr": 0.01} if "lr" in inspect.signature(cls).parameters else {}
    return cls([{"params": ps} for ps in groups], **kwargs)


def split(params: list[torch.Tensor], k: int, matrices_only: bool) -> list[list[torch.Tensor]]:
    params = [p for p in params if p.ndim == 2] if matrices_only else params
    k = min(k, len(params))
    return [params[i::k] for i in range(k)]


def error(got: list, want: list) -> float:
    """max |got − want| / max |want| over all tensors (None must match None)."""
    assert [g is None for g in got] == [w is None for w in want]
    pairs = [(g, w) for g, w in zip(got, want) if w is not None]
    scale = max(float(w.abs().max()) for _, w in pairs)
    return max(float((g - w).abs().max()) for g, w in pairs) / scale


# ------------------------------------------------------------------------------ the reference is right


@pytest.mark.parametrize("method", ["forward", "backward", "central"])
@pytest.mark.parametrize(("gamma", "eps"), [(0.1, 0.05), (1.0, 0.1)])
def test_the_reference_is_each_methods_formula_at_points_built_by_torch_func(method, gamma, eps):
    from helpers import make, params_of
    model, closure, x, y = make("mlp")
    theta = params_of(model)
    g = reference_gradient(model, x, y, theta, 5)
    plus = reference_gradient(model, x, y, {k: theta[k] + eps * g[k] for k in theta}, 5)
    minus = reference_gradient(model, x, y, {k: theta[k] - eps * g[k] for k in theta}, 5)
    c = gamma / eps
    want = {"forward": {k: (1 - c) * g[k] + c * plus[k] for k in g},
            "backward": {k: (1 + c) * g[k] - c * minus[k] for k in g},
            "central": {k: g[k] + c * (plus[k] - minus[k]) / 2 for k in g}}[method]
    torch.manual_seed(5)
    got = reference_direction(closure, [ParamGroup(list(model.parameters()), gamma, eps)], method=method,
                              modules=[model])
    assert error(got, list(want.values())) <= 1e-12


def test_the_reference_double_backprop_is_g_plus_gamma_hg_by_torch_func():
    from helpers import make
    model, closure, x, y = make("mlp")
    want = reference_gr_direction(model, x, y, 0.1, 5)
    torch.manual_seed(5)
    got = reference_direction(closure, [ParamGroup(list(model.parameters()), 0.1)], method="double", modules=[model])
    assert error(got, list(want.values())) <= 1e-12


# ------------------------------------------------------------------------------ the engine equals it


#: The axes every combination of which is run (the rest is drawn): each method with each perturbation.
SCHEMES = [("double", "raw"), *((m, p) for m in methods.STENCILS for p in methods.PERTURBATIONS)]


@st.composite
def configurations(draw, method: str | None = None, perturbation: str | None = None, c: float | None = None):
    """A configuration; ``method``, ``perturbation`` and the first group's c are drawn unless given."""
    if method is None:
        method, perturbation = draw(st.sampled_from(SCHEMES))
    ngroups = draw(st.integers(1, 3))
    eps = [draw(st.sampled_from((0.01, 0.05, 0.2))) for _ in range(ngroups)]
    cs = [c if c is not None and i == 0 else draw(st.sampled_from(C_VALUES)) for i in range(ngroups)]
    if ngroups > 1 and draw(st.booleans()):
        cs[draw(st.integers(1, ngroups - 1))] = 0.0  # one group not regularized
    if ngroups > 1 and draw(st.booleans()):
        cs = [cs[0] if x else 0.0 for x in cs]  # one c shared by the regularized groups (the seeds' fast path)
    return dict(method=method, perturbation=perturbation, eps=eps, gammas=[c * e for c, e in zip(cs, eps)],
                micro=draw(st.integers(1, 3)), scaler=draw(st.booleans()),
                dtype=draw(st.sampled_from((torch.float32, torch.float64))),
                base=draw(st.sampled_from(OPTIMIZERS)),
                features=frozenset(draw(st.sets(st.sampled_from(FEATURES)))))


def _direction_of(config: dict, engine: bool) -> tuple[list, nn.Module]:
    model = Net(config["features"], config["dtype"])
    model.train()
    matrices = config["base"].__name__ == "Muon"
    groups = split([p for p in model.parameters()], len(config["eps"]), matrices)
    pgroups = [ParamGroup(ps, gamma, eps) for ps, gamma, eps in zip(groups, config["gammas"], config["eps"])]
    cl = closures(model, config["micro"], config["dtype"])
    torch.manual_seed(3)
    if not engine:
        return reference_direction(cl, pgroups, method=config["method"], perturbation=config["perturbation"],
                                   modules=[model]), model
    base = base_optimizer(config["base"], groups)
    for group, pg in zip(base.param_groups, pgroups):
        group["gradreg"] = {"gamma": pg.gamma, "eps": pg.eps}
    opt = gr.GR(base, gamma=0.0, eps=1.0, method=config["method"], perturbation=config["perturbation"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if config["scaler"] else None
    opt.direction(cl, scaler=scaler)
    scale = 2.0**10 if scaler else 1.0
    return [None if p.grad is None else p.grad / scale for ps in groups for p in ps], model


@pytest.mark.parametrize("c", C_VALUES)
@pytest.mark.parametrize(("method", "perturbation"), SCHEMES)
@settings(max_examples=6, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_the_engine_equals_the_reference_everywhere(method, perturbation, c, data):
    config = data.draw(configurations(method, perturbation, c))
    want, ref_model = _direction_of(config, engine=False)
    got, model = _direction_of(config, engine=True)
    c_max = max(g / e for g, e in zip(config["gammas"], config["eps"]))
    tol = (1e-10 if config["dtype"] == torch.float64 else 2e-4) * (1 + c_max)
    assert error(got, want) <= tol, config
    assert_same(dict(model.named_buffers()), dict(ref_model.named_buffers()))  # buffers as one plain pass left


def test_the_normalized_step_with_gamma_above_eps_climbs():
    """The case 0.2.0 got wrong (c > 1: the seed's sign was dropped, ∇L(θ − δ) instead of ∇L(θ + δ))."""
    for c in (2.0, 5.0):
        config = dict(method="forward", perturbation="normalized", eps=[0.1], gammas=[0.1 * c], micro=1,
                      scaler=False, dtype=torch.float64, base=torch.optim.SGD, features=frozenset())
        assert error(_direction_of(config, True)[0], _direction_of(config, False)[0]) <= 1e-12


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_every_torch_optimizer_as_base_gets_the_formula_and_keeps_its_own_hyperparameters(cls):
    model = Net(frozenset({"dropout"}), torch.float32)
    params = [p for p in model.parameters() if p.ndim == 2 or cls.__name__ != "Muon"]
    base = base_optimizer(cls, [params])
    own = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in base.param_groups])
    opt = gr.GR.sam(base, rho=0.05)
    cl = closures(model, 1, torch.float32)
    torch.manual_seed(3)
    opt.direction(cl)
    got = [p.grad.clone() for p in params]
    torch.manual_seed(3)
    want = reference_direction(cl, [ParamGroup(params, 0.05, 0.05)], method="forward", perturbation="normalized",
                               modules=[model])
    assert error(got, want) <= 1e-5
    opt.step(cl)
    assert [{k: v for k, v in g.items() if k not in ("params", "gradreg")} for g in base.param_groups] == own
    assert base.param_groups[0]["gradreg"] == {"gamma": 0.05, "eps": 0.05}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_optimizers_gr_cannot_drive_are_refused(name):
    with pytest.raises(TypeError, match="base_optimizer"):
        gr.GR(getattr(torch.optim, name)([nn.Parameter(torch.ones(2))]), gamma=0.1, eps=0.1)


# ------------------------------------------------------------------------------ invariants


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(base=st.sampled_from(OPTIMIZERS), micro=st.integers(1, 3), method=st.sampled_from(methods.METHODS),
       features=st.sets(st.sampled_from(FEATURES)))
def test_gamma_zero_is_the_base_optimizer_bit_for_bit(base, micro, method, features):
    models = [Net(frozenset(features), torch.float64) for _ in range(2)]
    matrices = base.__name__ == "Muon"
    params = [[p for p in m.parameters() if p.ndim == 2 or not matrices] for m in models]
    plain, wrapped = base_optimizer(base, [params[0]]), base_optimizer(base, [params[1]])
    opt = gr.GR(wrapped, gamma=0.0, eps=None if method == "double" else 0.1, method=method)
    for step in range(3):
        torch.manual_seed(step)
        plain.zero_grad()
        for closure in closures(models[0], micro, torch.float64):
            closure().backward()
        plain.step()
        torch.manual_seed(step)
        opt.zero_grad()
        opt.step(closures(models[1], micro, torch.float64))
    assert_same(dict(models[1].named_parameters()), dict(models[0].named_parameters()))
    assert_same(dict(models[1].named_buffers()), dict(models[0].named_buffers()))
    assert [p.grad is None for p in params[1]] == [p.grad is None for p in params[0]]
    assert_same(wrapped.state_dict()["state"], plain.state_dict()["state"])


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(config=configurations(), fault_at=st.integers(0, 5), kind=st.sampled_from(("raise", "nan")))
def test_a_fault_in_any_pass_leaves_everything_as_it_was(config, fault_at, kind):
    model = Net(config["features"], config["dtype"])
    matrices = config["base"].__name__ == "Muon"
    groups = split(list(model.parameters()), len(config["eps"]), matrices)
    base = base_optimizer(config["base"], groups)
    for group, gamma, eps in zip(base.param_groups, config["gammas"], config["eps"]):
        group["gradreg"] = {"gamma": gamma, "eps": eps}
    opt = gr.GR(base, gamma=0.0, eps=1.0, method=config["method"], perturbation=config["perturbation"])
    good = closures(model, config["micro"], config["dtype"])
    opt.step(good)  # optimizer state exists
    calls = []

    def faulty(closure):
        def run():
            calls.append(1)
            loss = closure()
            if len(calls) - 1 == fault_at:
                if kind == "raise":
                    raise RuntimeError("injected")
                return loss * float("nan")
            return loss
        return run

    before = snapshot(model, opt)
    try:
        opt.step([faulty(c) for c in good])
    except (RuntimeError, FloatingPointError):
        assert_same(snapshot(model, opt), before)
    else:
        assert len(calls) <= fault_at  # the fault was never reached: a normal step


def test_a_stencil_of_four_rows_is_built_row_by_row(monkeypatch):
    """The fourth-order central stencil, added as one table row as the docs promise: each point θ + s_jδ must be
    built correctly from the previous one (0.2.0 built it from the first row's, 1.5e-2 off)."""
    rows = ((+1.0, 2 / 3), (-1.0, -2 / 3), (+2.0, -1 / 12), (-2.0, 1 / 12))
    monkeypatch.setitem(methods.STENCILS, "central4", rows)
    monkeypatch.setattr("gradreg._checks.METHODS", (*methods.METHODS, "central4"))
    for perturbation in methods.PERTURBATIONS:
        config = dict(method="central4", perturbation=perturbation, eps=[0.05], gammas=[0.1], micro=2, scaler=False,
                      dtype=torch.float64, base=torch.optim.SGD, features=frozenset({"dropout", "batchnorm"}))
        assert error(_direction_of(config, True)[0], _direction_of(config, False)[0]) <= 1e-10
    config = dict(config, eps=[2e-3], gammas=[2e-4])  # small steps: the truncation errors are visible
    exact = dict(config, method="double", perturbation="raw")
    central = dict(config, method="central", perturbation="raw")
    fourth = dict(config, perturbation="raw")
    want = _direction_of(exact, False)[0]
    assert error(_direction_of(fourth, True)[0], want) < 0.1 * error(_direction_of(central, True)[0], want)


def test_every_stencil_row_moves_away_from_theta():
    """A row with s = 0 would be g itself (and the engine reaches each point from the previous one)."""
    assert all(s != 0 for rows in methods.STENCILS.values() for s, _ in rows)
