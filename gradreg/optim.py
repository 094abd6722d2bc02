"""``GR``: gradient regularization around any already-built ``torch.optim`` optimizer.

    optimizer = gradreg.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=0.1)
    loss = optimizer.step(lambda: loss_fn(model(x), y))   # the closure returns the loss, no backward()

``step`` asks the engine (:mod:`gradreg.engine`) for the GR direction d ≈ ∇L + γH∇L, writes it into ``.grad``
and lets the base optimizer step with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradreg._checks import check_config
from gradreg.engine import NonFiniteError, ParamGroup, gr_direction

Closure = Callable[[], Tensor] | Sequence[Callable[[], Tensor]]

ON_NONFINITE = ("raise", "skip")
SETTINGS = ("method", "perturbation", "adaptive_eta", "on_nonfinite", "skipped_steps", "local_perturbation")


def _refuse_unsuitable(base_optimizer: object) -> None:
    """GR needs a torch optimizer whose step() uses the dense .grad it is given, once."""
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer instance, got {type(base_optimizer).__name__}: "
            "build it first, e.g. GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=..., eps=...)"
        )
    if isinstance(base_optimizer, torch.optim.SparseAdam):
        raise TypeError("base_optimizer: SparseAdam needs sparse gradients, and GR directions are dense; use Adam")
    closure = inspect.signature(type(base_optimizer).step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"base_optimizer: {type(base_optimizer).__name__}.step needs a closure of its own (it re-evaluates the "
            "loss, as LBFGS does); GR gives its base optimizer a finished direction in .grad. Use a first-order "
            "optimizer (SGD, Adam, AdamW, ...)"
        )
    if getattr(base_optimizer, "_wrapped_by_gradreg", False):
        # The groups already carry the first wrapper's gamma/eps, which would silently win over new ones.
        raise ValueError(
            "base_optimizer is already wrapped by a gradreg.GR: build a fresh base optimizer for a second "
            "configuration, or change gamma/eps in optimizer.param_groups"
        )


def _loss_scale(scaler: torch.amp.GradScaler, groups: list[dict[str, Any]]) -> float:
    """The scaler's current scale (initialised on the parameters' device, as ``scaler.scale(loss)`` would)."""
    device = next(p.device for group in groups for p in group["params"])
    scaler.scale(torch.zeros((), device=device))
    return float(scaler.get_scale())


def _record_overflow(scaler: torch.amp.GradScaler, base: Optimizer) -> None:
    """Let ``scaler`` see an overflow for ``base`` (so that ``scaler.step`` skips and ``scaler.update`` backs off),
    through its own ``unscale_`` on a stand-in gradient; every ``.grad`` is put back untouched."""
    params = [p for group in base.param_groups for p in group["params"]]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    smallest = min((p for p in params if p.requires_grad), key=torch.Tensor.numel)
    smallest.grad = torch.full_like(smallest, float("inf"))
    try:
        scaler.unscale_(base)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _check_groups(groups: Sequence[dict[str, Any]], defaults: dict[str, Any], method: str, perturbation: str,
                  adaptive_eta: object = 0.01) -> None:
    """Every group's ``gamma``/``eps`` (its own, else the defaults) valid for ``method``; errors name the group."""
    for i, group in enumerate(groups):
        check_config(group.get("gamma", defaults["gamma"]), group.get("eps", defaults["eps"]), method, perturbation,
                     adaptive_eta, where=f" (param group {i})")


def _check_settings(settings: dict[str, Any]) -> None:
    if not set(settings) <= set(SETTINGS):
        raise ValueError(f"state_dict['gr'] may have the keys {SETTINGS}; got {tuple(settings)}")
    if settings.get("on_nonfinite", "raise") not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got {settings['on_nonfinite']!r}")
    if not isinstance(settings.get("local_perturbation", False), bool):
        raise ValueError(f"local_perturbation must be True or False; got {settings['local_perturbation']!r}")
    skipped = settings.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"skipped_steps must be an integer >= 0; got {skipped!r}")


class GR(Optimizer):
    """Gradient regularization wrapped around ``base_optimizer`` (SGD, Adam, AdamW, ...).

    Args:
        base_optimizer: an already-built optimizer; it owns the parameter groups, their state and the step.
        gamma: GR strength γ ≥ 0 in L + (γ/2)‖∇L‖². A parameter group may override it with a ``"gamma"`` key.
        eps: finite-difference step ε > 0 (required unless ``method="double"``); per-group ``"eps"`` too.
            With different ε per group the ascent step is ε_k g_k per group: keep one ε for the exact GR
            gradient and vary γ per group instead.
        method: ``"forward"`` (F-GR), ``"backward"`` (B-GR), ``"central"`` or ``"double"`` (exact, double
            backprop); see :func:`gradreg.gr_grad`.
        perturbation: ``"raw"`` (ε g), ``"normalized"`` (ε g/‖g‖, the SAM/GNP family) or ``"adaptive"`` (ASAM).
        adaptive_eta: η ≥ 0 in ASAM's T = |θ| + η (``perturbation="adaptive"`` only).
        on_nonfinite: ``"raise"`` a :class:`gradreg.NonFiniteError`, or ``"skip"`` the step (count it in
            ``skipped_steps``) when a pass yields a non-finite loss or gradient. Either way nothing changes.
        keep_buffer: keep the buffer of the perturbed point θ + δ between steps (the default), as SAM
            implementations keep their copy of θ: no allocation and no page faults per step. The price is one
            parameter-sized buffer held between steps too; the peak memory of a step is the same either way.
            ``False`` allocates it in every step and frees it after (measured 2–8 % slower per step on a
            width-512 MLP on a CPU, from page faults).
        ddp: the ``DistributedDataParallel`` module the closure calls. Gradients are then synchronised where the
            mathematics needs it and nowhere else: by default the perturbation uses the all-reduced gradient
            (a DDP step equals the single-process step on the concatenated batch; two all-reduces per step);
        local_perturbation: with ``ddp``, each worker perturbs with its own gradient instead (SAM's
            m-sharpness; one all-reduce per step, as for SGD).

    ``param_groups`` and ``state`` are the base optimizer's own, and ``defaults`` include the base optimizer's, so
    every torch LR scheduler, per-group learning rates and ``state_dict``/``load_state_dict`` (which also
    restore ``gamma``/``eps`` per group) work as usual. Groups whose parameters are all frozen are skipped; a
    parameter may appear in one group only, once. For gradient clipping, split the step:
    ``loss = opt.direction(closure)``, clip ``.grad``, then ``opt.base_optimizer.step()``.
    Base optimizers that re-evaluate a closure themselves (LBFGS) or need sparse gradients (SparseAdam) are
    refused.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        gamma: float,
        eps: float | None = None,
        method: str = "forward",
        perturbation: str = "raw",
        adaptive_eta: float = 0.01,
        on_nonfinite: str = "raise",
        keep_buffer: bool = True,
        ddp: torch.nn.Module | None = None,
        local_perturbation: bool = False,
    ):
        _refuse_unsuitable(base_optimizer)
        gamma, eps = check_config(gamma, eps, method, perturbation, adaptive_eta)
        _check_groups(base_optimizer.param_groups, {"gamma": gamma, "eps": eps}, method, perturbation)
        _check_settings({"on_nonfinite": on_nonfinite})
        if ddp is not None and not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp must be the DistributedDataParallel module the closure calls, got "
                            f"{type(ddp).__name__}")
        if not isinstance(local_perturbation, bool) or (local_perturbation and ddp is None):
            raise ValueError("local_perturbation must be True or False, and True only together with ddp=")
        if not any(p.requires_grad for group in base_optimizer.param_groups for p in group["params"]):
            raise ValueError("base_optimizer: no parameter requires grad; nothing to regularize")
        self.base_optimizer = base_optimizer
        self.method = method
        self.perturbation = perturbation
        self.adaptive_eta = float(adaptive_eta)
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        self.buffer: dict[Tensor, Tensor] | None = {} if keep_buffer else None
        self.ddp, self.local_perturbation = ddp, local_perturbation
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults, "gamma": gamma, "eps": eps})
        base_optimizer._wrapped_by_gradreg = True

    # The ascent–descent family as configurations of the one engine (Chapter 4).
    @classmethod
    def sam(cls, base_optimizer: Optimizer, rho: float, **kwargs: Any) -> GR:
        """SAM (Foret et al. 2021): d = ∇L(θ + ρ g/‖g‖). F-GR with a normalized step and γ = ε = ρ."""
        return cls(base_optimizer, gamma=rho, eps=rho, method="forward", perturbation="normalized", **kwargs)

    @classmethod
    def usam(cls, base_optimizer: Optimizer, rho: float, **kwargs: Any) -> GR:
        """Unnormalized SAM: d = ∇L(θ + ρ g). Exactly F-GR with γ = ε = ρ."""
        return cls(base_optimizer, gamma=rho, eps=rho, method="forward", perturbation="raw", **kwargs)

    @classmethod
    def gnp(cls, base_optimizer: Optimizer, lam: float, r: float, **kwargs: Any) -> GR:
        """GNP (Zhao et al. 2022), penalty λ‖∇L‖: d = (1 − λ/r) g + (λ/r) ∇L(θ + r g/‖g‖); SAM is λ = r."""
        return cls(base_optimizer, gamma=lam, eps=r, method="forward", perturbation="normalized", **kwargs)

    @classmethod
    def asam(cls, base_optimizer: Optimizer, rho: float, eta: float = 0.01, **kwargs: Any) -> GR:
        """ASAM (Kwon et al. 2021): d = ∇L(θ + ρ T²g/‖Tg‖), T = |θ| + η on weights with ndim ≥ 2, 1 elsewhere.

        The official code scales parameters whose name contains "weight" (so BatchNorm scales too); an optimizer
        sees no names, so here matrices and kernels get T = |θ| + η and vectors (biases, norm scales) T = 1.
        """
        return cls(base_optimizer, gamma=rho, eps=rho, method="forward", perturbation="adaptive",
                   adaptive_eta=eta, **kwargs)

    # The groups and the state live in the base optimizer: no copies that could drift apart.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        pass  # Optimizer.__init__ assigns an empty list; the base optimizer's groups stay authoritative

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        pass

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (unless it is already there) with this GR's ``gamma``/``eps``
        defaults; the group is checked before anything changes."""
        check_config(param_group.get("gamma", self.defaults["gamma"]), param_group.get("eps", self.defaults["eps"]),
                     self.method, self.perturbation)
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
        param_group.setdefault("gamma", self.defaults["gamma"])
        param_group.setdefault("eps", self.defaults["eps"])

    def _groups(self) -> list[ParamGroup]:
        return [ParamGroup(group["params"], group.get("gamma", self.defaults["gamma"]),
                           group.get("eps", self.defaults["eps"])) for group in self.param_groups]

    def direction(self, closure: Closure, *, scaler: torch.amp.GradScaler | None = None) -> Tensor | None:
        """Fill ``.grad`` with the GR direction and return the loss at θ, without stepping.

        ``closure`` may be a list of closures, one per micro-batch (gradient accumulation; see
        :func:`gradreg.engine.gr_direction`). With a ``scaler``, ``.grad`` holds the scaled direction (unscale it
        with ``scaler.unscale_(opt.base_optimizer)`` before clipping). Returns ``None`` when the step was skipped.
        """
        if closure is None:
            raise TypeError("GR needs a closure that returns the loss: optimizer.step(lambda: loss_fn(model(x), y))")
        scale = 1.0 if scaler is None or not scaler.is_enabled() else _loss_scale(scaler, self.param_groups)
        try:
            return gr_direction(closure, self._groups(), method=self.method, perturbation=self.perturbation,
                                adaptive_eta=self.adaptive_eta, buffer=self.buffer, loss_scale=scale, ddp=self.ddp,
                                local_perturbation=self.local_perturbation)
        except NonFiniteError:
            if scale != 1.0:  # an overflow of the scaled gradients: the scaler backs off, as in a plain step
                _record_overflow(scaler, self.base_optimizer)
            elif self.on_nonfinite == "raise":
                raise
            self.skipped_steps += 1
            return None

    def step(self, closure: Closure | None = None, *, scaler: torch.amp.GradScaler | None = None) -> Tensor | None:  # type: ignore[override]
        """One GR step: the engine's direction into ``.grad``, then the base optimizer's step.

        With a ``torch.amp.GradScaler``: every pass back-propagates the scaled loss, the perturbation uses the
        unscaled gradient, and ``scaler.step(base_optimizer)`` unscales and steps — or skips the step when any pass
        overflowed (everything is restored; ``scaler.update()``, called by you afterwards as usual, backs off).
        Returns the loss at θ before the step, or ``None`` if the step was skipped.
        """
        if closure is None:
            raise TypeError(
                "GR.step() needs a closure that runs the forward pass and returns the loss (without calling "
                "backward), e.g. optimizer.step(lambda: loss_fn(model(x), y)). A trainer that calls "
                "optimizer.step() itself (the Hugging Face Trainer) must get the base optimizer: fill .grad with "
                "GR.direction(closure) in its training step (see the book's How-to page)"
            )
        loss = self.direction(closure, scaler=scaler)
        if scaler is not None and scaler.is_enabled():
            scaler.step(self.base_optimizer)
        elif loss is not None:
            self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry ``gamma``/``eps``) plus this wrapper's settings."""
        state = self.base_optimizer.state_dict()
        state["gr"] = {name: getattr(self, name) for name in SETTINGS}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or a plain base optimizer's); everything is checked before anything changes."""
        state_dict = dict(state_dict)
        settings = state_dict.pop("gr", None)
        current = {name: getattr(self, name) for name in SETTINGS}
        if settings is not None:
            _check_settings(settings)
        merged = {**current, **(settings or {})}
        _check_groups(state_dict.get("param_groups", []), self.defaults, merged["method"], merged["perturbation"],
                      merged["adaptive_eta"])
        self.base_optimizer.load_state_dict(state_dict)
        for name, value in merged.items():
            setattr(self, name, value)

    def __getstate__(self) -> dict[str, Any]:  # copy and pickle the wrapper whole (torch's keeps 3 fields)
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"GR(method={self.method!r}, perturbation={self.perturbation!r}, "
            f"gamma={self.defaults['gamma']}, eps={self.defaults['eps']}, base={self.base_optimizer!r})"
        )
