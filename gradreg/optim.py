"""``GR``: gradient regularization around any already-built ``torch.optim`` optimizer.

    optimizer = gradreg.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=0.1)
    loss = optimizer.step(lambda: loss_fn(model(x), y))   # the closure returns the loss, no backward()

``step`` asks the engine (:mod:`gradreg.engine`) for the GR direction d ≈ ∇L + γH∇L, writes it into ``.grad``
and lets the base optimizer step with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from gradreg.engine import NonFiniteError, ParamGroup, check_config, gr_direction

ON_NONFINITE = ("raise", "skip")


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
        adaptive_eta: η in ASAM's T = |θ| + η (``perturbation="adaptive"`` only).
        on_nonfinite: ``"raise"`` a :class:`gradreg.NonFiniteError`, or ``"skip"`` the step (count it in
            ``skipped_steps``) when a pass yields a non-finite loss or gradient. Either way nothing changes.

    ``param_groups`` and ``state`` are the base optimizer's own, so LR schedulers, per-group learning rates and
    ``state_dict``/``load_state_dict`` (which also restore ``gamma``/``eps`` per group) work as usual.
    For gradient clipping, split the step: ``loss = opt.direction(closure)``, clip ``.grad``, then
    ``opt.base_optimizer.step()``.
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
    ):
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer instance, got {type(base_optimizer).__name__}"
            )
        check_config(gamma, eps, method, perturbation)
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}; got {on_nonfinite!r}")
        if not any(p.requires_grad for group in base_optimizer.param_groups for p in group["params"]):
            raise ValueError("base_optimizer: no parameter requires grad; nothing to regularize")
        if getattr(base_optimizer, "_wrapped_by_gradreg", False):
            # The groups already carry the first wrapper's gamma/eps, which would silently win over these.
            raise ValueError(
                "base_optimizer is already wrapped by a gradreg.GR: build a fresh base optimizer for a second "
                "configuration, or change gamma/eps in optimizer.param_groups"
            )
        self.base_optimizer = base_optimizer
        self.method = method
        self.perturbation = perturbation
        self.adaptive_eta = adaptive_eta
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        super().__init__(base_optimizer.param_groups, {"gamma": gamma, "eps": eps})
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
        """Add a group to the base optimizer (unless it is already there) with this GR's defaults."""
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        check_config(param_group["gamma"], param_group["eps"], self.method, self.perturbation)

    def _groups(self) -> list[ParamGroup]:
        return [
            ParamGroup(
                [p for p in group["params"] if p.requires_grad],
                group.get("gamma", self.defaults["gamma"]),
                group.get("eps", self.defaults["eps"]),
            )
            for group in self.param_groups
        ]

    def direction(self, closure: Callable[[], Tensor]) -> Tensor | None:
        """Fill ``.grad`` with the GR direction and return the loss at θ, without stepping.

        Returns ``None`` when ``on_nonfinite="skip"`` skipped this step.
        """
        if closure is None:
            raise TypeError("GR needs a closure that returns the loss: optimizer.step(lambda: loss_fn(model(x), y))")
        try:
            return gr_direction(
                closure, self._groups(), method=self.method, perturbation=self.perturbation,
                adaptive_eta=self.adaptive_eta,
            )
        except NonFiniteError:
            if self.on_nonfinite == "raise":
                raise
            self.skipped_steps += 1
            return None

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One GR step: the engine's direction into ``.grad``, then the base optimizer's step.

        Returns the loss at θ before the step, or ``None`` if the step was skipped (``on_nonfinite="skip"``).
        """
        if closure is None:
            raise TypeError(
                "GR.step() needs a closure that runs the forward pass and returns the loss (without calling "
                "backward), e.g. optimizer.step(lambda: loss_fn(model(x), y))"
            )
        loss = self.direction(closure)
        if loss is not None:
            self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry ``gamma``/``eps``) plus this wrapper's settings."""
        state = self.base_optimizer.state_dict()
        state["gr"] = {
            "method": self.method,
            "perturbation": self.perturbation,
            "adaptive_eta": self.adaptive_eta,
            "on_nonfinite": self.on_nonfinite,
            "skipped_steps": self.skipped_steps,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        settings = state_dict.pop("gr", None)
        self.base_optimizer.load_state_dict(state_dict)
        if settings is not None:
            check_config(self.defaults["gamma"], self.defaults["eps"], settings["method"], settings["perturbation"])
            self.method = settings["method"]
            self.perturbation = settings["perturbation"]
            self.adaptive_eta = settings["adaptive_eta"]
            self.on_nonfinite = settings["on_nonfinite"]
            self.skipped_steps = settings["skipped_steps"]

    def __repr__(self) -> str:
        return (
            f"GR(method={self.method!r}, perturbation={self.perturbation!r}, "
            f"gamma={self.defaults['gamma']}, eps={self.defaults['eps']}, base={self.base_optimizer!r})"
        )
