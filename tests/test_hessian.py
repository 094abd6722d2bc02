"""Hessian-vector products and power iteration against the full Hessian (torch.func.hessian + eigvalsh)."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_of_flat, params_vector
from torch import nn
from torch.func import hessian

from gradreg.hessian import hvp, top_eigenvalue
from gradreg.replay import Replay


def _tiny(seed: int = 0):
    """A smooth 26-parameter MLP with a cross-entropy loss on a fixed batch, in float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    return model, x, y


def _full_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The p×p Hessian of the loss in the flattened parameters, by torch.func (independent of gradreg)."""
    return hessian(loss_of_flat(model, x, y))(params_vector(model))


def test_hvp_matches_the_full_hessian():
    model, x, y = _tiny()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    got = torch.cat([h.reshape(-1) for h in hvp(lambda: nn.functional.cross_entropy(model(x), y), params, v)])
    expected = _full_hessian(model, x, y) @ torch.cat([u.reshape(-1) for u in v])
    assert float((got - expected).norm() / expected.norm()) <= 1e-12


def test_hvp_gives_zeros_for_unused_parameters_and_checks_lengths():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    unused = torch.ones(3, dtype=torch.float64, requires_grad=True)
    ones = [torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    out = hvp(lambda: (a**3).sum(), [a, unused], ones)
    assert torch.equal(out[0], 6 * a.detach()) and torch.equal(out[1], torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one tensor per parameter"):
        hvp(lambda: (a**3).sum(), [a], [])


@pytest.mark.parametrize("seed", [0, 1])
def test_top_eigenvalue_matches_eigvalsh_of_the_full_hessian(seed):
    model, x, y = _tiny(seed)
    eigenvalues = torch.linalg.eigvalsh(_full_hessian(model, x, y))
    by_magnitude = eigenvalues[eigenvalues.abs().argsort(descending=True)]
    assert abs(by_magnitude[1] / by_magnitude[0]) < 0.95  # a gap, so the test is not about slow convergence
    top = top_eigenvalue(lambda: nn.functional.cross_entropy(model(x), y), list(model.parameters()),
                         iters=5000, tol=1e-13, seed=seed)
    assert top.converged
    assert abs(top.value - float(by_magnitude[0])) <= 1e-6 * abs(float(by_magnitude[0]))
    # the returned vector is a unit eigenvector: H v = λ v
    v = torch.cat([u.reshape(-1) for u in top.vector])
    assert abs(float(v.norm()) - 1) < 1e-12
    residual = _full_hessian(model, x, y) @ v - top.value * v
    assert float(residual.norm()) <= 1e-5 * abs(top.value)


def test_top_eigenvalue_returns_the_largest_magnitude_with_its_sign():
    """On L = ½ θᵀAθ with eigenvalues (−5, 3, 1) power iteration finds −5, not the largest eigenvalue 3."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-5.0, 3.0, 1.0], dtype=torch.float64)) @ q.T
    theta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    top = top_eigenvalue(lambda: 0.5 * theta @ a @ theta, [theta], iters=500, tol=1e-14)
    assert top.converged and abs(top.value + 5.0) < 1e-10


def test_warm_start_converges_at_once():
    model, x, y = _tiny()
    closure, params = (lambda: nn.functional.cross_entropy(model(x), y)), list(model.parameters())
    first = top_eigenvalue(closure, params, iters=5000, tol=1e-13)
    again = top_eigenvalue(closure, params, iters=5000, tol=1e-10, v0=first.vector)
    assert again.iterations <= 2 and abs(again.value - first.value) <= 1e-10 * abs(first.value)


def test_training_mode_model_is_measured_as_one_function_and_left_untouched():
    """Dropout masks are replayed in every product; BatchNorm running statistics and the RNG are unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    model.train()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    closure, params = (lambda: nn.functional.cross_entropy(model(x), y)), list(model.parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rng = torch.get_rng_state()
    first = top_eigenvalue(closure, params, iters=50, tol=0.0, seed=1)
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    assert top_eigenvalue(closure, params, iters=50, tol=0.0, seed=1).value == first.value
    replay = Replay(params, replay_first=True)
    h1 = hvp(lambda: replay.evaluate(closure), params, first.vector)
    replay.end_pass()
    h2 = hvp(lambda: replay.evaluate(closure), params, first.vector)
    replay.close(keep_grads=False)
    assert all(torch.equal(a, b) for a, b in zip(h1, h2))  # same masks: the same operator every time
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())


def test_top_eigenvalue_rejects_bad_input():
    theta = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalue(lambda: (theta**2).sum(), [theta], iters=0)
    with pytest.raises(ValueError, match="not all zero"):
        top_eigenvalue(lambda: (theta**2).sum(), [theta], v0=[torch.zeros(2, dtype=torch.float64)])


# ------------------------------------------------------------------ argument checks (issue 24)


def test_hvp_refuses_a_vector_of_a_broadcastable_but_wrong_shape_dtype_or_device():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    f = lambda: (w ** 3).sum()  # noqa: E731
    assert torch.allclose(hvp(f, [w], [torch.ones(3)])[0], 6 * w.detach())
    for bad, needle in ((torch.ones(3, 1), r"shape \(3,\)"), (torch.ones(1), r"got shape \(1,\)"),
                        (torch.ones(3, dtype=torch.float64), "torch.float64")):
        with pytest.raises(ValueError, match=r"v\[0\] must match parameter 0") as info:
            hvp(f, [w], [bad])
        assert info.match(needle)
    with pytest.raises(TypeError, match="v must contain Tensors only"):
        hvp(f, [w], [[1.0, 1.0, 1.0]])


def test_hvp_and_top_eigenvalue_refuse_a_parameter_listed_twice():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    f = lambda: (w ** 2).sum() + w[0] * w[1]  # noqa: E731  (eigenvalues 1 and 3)
    assert top_eigenvalue(f, [w], iters=200, tol=1e-12).value == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ValueError, match="appears twice"):
        top_eigenvalue(f, [w, w])
    with pytest.raises(ValueError, match="appears twice"):
        hvp(f, [w, w], [torch.ones(2), torch.ones(2)])


def test_top_eigenvalue_error_note_names_the_iteration_that_failed():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return (w ** 2).sum() + w[0] * w[1]

    with pytest.raises(RuntimeError, match="boom") as info:
        top_eigenvalue(closure, [w], iters=10, tol=0.0)
    notes = " ".join(getattr(info.value, "__notes__", [])) or str(info.value)
    assert "in power iteration 3;" in notes, notes
