"""``GR``: gradient regularization around any already-built ``torch.optim`` optimizer.

    optimizer = gradreg.GR(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.05, eps=0.1)
    loss = optimizer.step(lambda: loss_fn(model(x), y))   # the closure returns the loss, no backward()

``step`` asks the engine (:mod:`gradreg.engine`) for the GR direction d ≈ ∇L + γH∇L, writes it into ``.grad``
and lets the base optimizer step with it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradreg._checks import check_config
from gradreg.engine import NonFiniteError, ParamGroup, gr_direction

Closure = Callable[[], Tensor] | Sequence[Callable[[], Tensor]]

ON_NONFINITE = ("raise", "skip")
#: The one key GR adds to each param group, a dict of GR's own per-group settings, which no optimizer reads:
#: ``group["gradreg"] = {"gamma": γ, "eps": ε}``. The base optimizer's own keys (Adam's ``eps``, ...) stay its own.
NAMESPACE = "gradreg"
GROUP_KEYS = ("gamma", "eps")
#: What a checkpoint must agree on with the wrapper that loads it (they define the direction).
CONFIG = ("method", "perturbation", "adaptive_eta", "local_perturbation")
SETTINGS = (*CONFIG, "on_nonfinite", "skipped_steps")
#: ``state_dict()["gr"]["format"]``: 3 since gradreg 0.3 (per-group settings under ``"gradreg"``); 0.2.0 wrote none.
FORMAT = 3


def _refuse_unsuitable(base_optimizer: object) -> None:
    """GR needs a torch optimizer whose step() uses the dense .grad it is given, once."""
    if not isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer instance, got {type(base_optimizer).__name__}: "
            "build it first, e.g. GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=..., eps=...)"
        )
    if isinstance(base_optimizer, GR):
        raise TypeError("base_optimizer is already a gradreg.GR: wrap a plain optimizer, "
                        "e.g. GR(torch.optim.SGD(model.parameters(), lr=0.1), gamma=..., eps=...)")
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


def _refuse_legacy_keys(group: dict[str, Any], base: Optimizer, i: int) -> None:
    """A plain ``gamma``/``eps`` key that the base optimizer does not use was meant for GR (gradreg 0.2.0's way):
    refused, since GR reads only ``group["gradreg"]`` (and an optimizer's own ``eps`` must never be GR's)."""
    legacy = [key for key in GROUP_KEYS if key in group and key not in base.defaults]
    if legacy:
        raise ValueError(
            f"param group {i} has the key(s) {legacy}, which {type(base).__name__} does not use: GR's per-group "
            f"settings live in the group's 'gradreg' dict, e.g. {{'params': ..., 'gradreg': {{'gamma': 0.1}}}} "
            "(plain 'gamma'/'eps' keys, as in gradreg 0.2.0, collide with optimizers' own, such as Adam's eps)"
        )


def _group_settings(group: object, defaults: dict[str, Any], base: Optimizer, i: int, method: str,
                    perturbation: str, adaptive_eta: object) -> dict[str, Any]:
    """GR's settings of param group ``i``: its ``group["gradreg"]`` entries, else ``defaults``; checked."""
    if not isinstance(group, dict):
        raise TypeError(f"param_group must be a dict such as {{'params': [...], 'lr': 0.01, 'gradreg': "
                        f"{{'gamma': 0.1}}}}, got {type(group).__name__}")
    _refuse_legacy_keys(group, base, i)
    own = group.get(NAMESPACE, {})
    if not isinstance(own, dict) or not set(own) <= set(GROUP_KEYS):
        raise ValueError(f"param group {i}: group[{NAMESPACE!r}] must be a dict with the keys {GROUP_KEYS} (each "
                         f"optional), got {own!r}")
    gamma, eps = check_config(own.get("gamma", defaults["gamma"]), own.get("eps", defaults["eps"]), method,
                              perturbation, adaptive_eta, where=f" (param group {i})")
    return {"gamma": gamma, "eps": eps}


def _check_settings(settings: dict[str, Any]) -> None:
    if not set(settings) <= {*SETTINGS, "format", "base"}:
        raise ValueError(f"state_dict['gr'] may have the keys {(*SETTINGS, 'format', 'base')}; got {tuple(settings)}")
    if settings.get("format", FORMAT) != FORMAT:
        raise ValueError(f"state_dict['gr']['format'] is {settings['format']!r}; this gradreg reads format {FORMAT} "
                         "and gradreg 0.2.0's checkpoints (no format)")
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
        gamma: GR strength γ ≥ 0 in L + (γ/2)‖∇L‖².
        eps: finite-difference step ε > 0 (required unless ``method="double"``).
        method: ``"forward"`` (F-GR), ``"backward"`` (B-GR), ``"central"`` or ``"double"`` (exact, double
            backprop); see :func:`gradreg.gr_grad`.
        perturbation: ``"raw"`` (ε g), ``"normalized"`` (ε g/‖g‖, the SAM/GNP family) or ``"adaptive"`` (ASAM).
        adaptive_eta: η ≥ 0 in ASAM's T = |θ| + η (``perturbation="adaptive"`` only).
        on_nonfinite: ``"raise"`` a :class:`gradreg.NonFiniteError`, or ``"skip"`` the step (count it in
            ``skipped_steps``) when a pass yields a non-finite loss or gradient. Either way nothing changes.
        keep_buffer: keep the buffer of the perturbed point θ + δ between steps (the default), as SAM
            implementations keep their copy of θ: no allocation and no page faults per step. The price is one
            parameter-sized buffer held between steps too; the peak memory of a step is the same either way.
            ``False`` allocates it in every step and frees it after.
        ddp: the ``DistributedDataParallel`` module the closure calls. Gradients are then synchronised where the
            mathematics needs it and nowhere else: by default the perturbation uses the all-reduced gradient
            (a DDP step equals the single-process step on the concatenated batch; two all-reduces per step).
            Without ``ddp`` the finite-difference methods are still exact (every backward all-reduces); DB-GR
            refuses a closure that calls a DDP module.
        local_perturbation: with ``ddp``, each worker perturbs with its own gradient instead (SAM's
            m-sharpness; one all-reduce per step, as for SGD).

    **Per-group settings** live in GR's own namespace, one key no optimizer reads: ``group["gradreg"] =
    {"gamma": γ, "eps": ε}``, filled from ``gamma``/``eps`` where a group does not set them, e.g.
    ``AdamW([{"params": decay}, {"params": no_decay, "gradreg": {"gamma": 0.0}}])``. The base optimizer's own keys
    (Adam's ``eps``, a third-party optimizer's ``gamma``) are never read or written by GR; a plain ``"gamma"`` or
    ``"eps"`` key the base optimizer does not use (gradreg 0.2.0's way) is refused. With different ε per group the
    ascent step is ε_k g_k per group: keep one ε for the exact GR gradient and vary γ per group instead.

    ``param_groups`` and ``state`` are the base optimizer's own, so every torch LR scheduler, per-group learning
    rates and ``state_dict``/``load_state_dict`` work as usual (a checkpoint restores each group's ``"gradreg"``
    settings, refuses one of another optimizer or of another method/perturbation, and migrates gradreg 0.2.0's).
    Groups whose parameters are all frozen are skipped; a parameter may appear in one group only, once. For
    gradient clipping, split the step: ``loss = opt.direction(closure)``, clip ``.grad``, then
    ``opt.base_optimizer.step()``. Base optimizers that re-evaluate a closure themselves (LBFGS) or need sparse
    gradients (SparseAdam) are refused.
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
        for i, group in enumerate(base_optimizer.param_groups):  # every group checked before any changes
            _group_settings(group, {"gamma": gamma, "eps": eps}, base_optimizer, i, method, perturbation, adaptive_eta)
        _check_settings({"on_nonfinite": on_nonfinite})
        if not isinstance(keep_buffer, bool):
            raise TypeError(f"keep_buffer must be True or False, got {keep_buffer!r}")
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
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults,
                                                       NAMESPACE: {"gamma": gamma, "eps": eps}})
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
        """Add a group to the base optimizer (unless it is already there); its ``"gradreg"`` settings default to
        this GR's ``gamma``/``eps``. The group is checked before anything changes."""
        settings = self._settings(param_group, len(self.base_optimizer.param_groups))
        if not any(param_group is group for group in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
        param_group[NAMESPACE] = settings

    def _settings(self, group: object, i: int) -> dict[str, Any]:
        return _group_settings(group, self.defaults[NAMESPACE], self.base_optimizer, i, self.method,
                               self.perturbation, self.adaptive_eta)

    def _groups(self) -> list[ParamGroup]:
        """The engine's groups, from each group's ``"gradreg"`` settings (filled in for a group that was added to
        the base optimizer directly)."""
        groups = []
        for i, group in enumerate(self.param_groups):
            settings = self._settings(group, i)
            group.setdefault(NAMESPACE, settings)
            groups.append(ParamGroup(group["params"], settings["gamma"], settings["eps"]))
        return groups

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
        """The base optimizer's state dict (each group with its ``"gradreg"`` settings) plus ``"gr"``: this
        wrapper's settings, the base optimizer's class and the format."""
        state = self.base_optimizer.state_dict()
        state["param_groups"] = [{**group, NAMESPACE: dict(group[NAMESPACE])} if NAMESPACE in group else group
                                 for group in state["param_groups"]]
        state["gr"] = {"format": FORMAT, "base": type(self.base_optimizer).__name__,
                       **{name: getattr(self, name) for name in SETTINGS}}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, a gradreg 0.2.0 one (migrated) or a plain base optimizer's (GR's settings
        stay). A checkpoint of another base optimizer or of another method, perturbation, ``adaptive_eta`` or
        ``local_perturbation`` is refused; ``on_nonfinite`` stays this wrapper's. Everything is checked before
        anything changes."""
        state_dict = dict(state_dict)
        settings = state_dict.pop("gr", None)
        groups = [dict(group) for group in state_dict.get("param_groups", [])]
        if settings is not None:
            _check_settings(settings)
            self._refuse_other_config(settings)
            if "format" not in settings:  # gradreg 0.2.0: GR's settings were plain keys of the groups
                groups = [self._migrated(group) for group in groups]
        current = self.param_groups
        for i, group in enumerate(groups):
            self._refuse_foreign_keys(group, i)
            if NAMESPACE not in group and i < len(current):  # a plain base optimizer's checkpoint
                group[NAMESPACE] = dict(current[i].get(NAMESPACE, {}))
            group[NAMESPACE] = self._settings(group, i)
        self.base_optimizer.load_state_dict({**state_dict, "param_groups": groups})
        if settings is not None:
            self.skipped_steps = settings.get("skipped_steps", 0)

    def _refuse_other_config(self, settings: dict[str, Any]) -> None:
        base = settings.get("base", type(self.base_optimizer).__name__)
        if base != type(self.base_optimizer).__name__:
            raise ValueError(f"the checkpoint is of GR around {base}, this GR wraps "
                             f"{type(self.base_optimizer).__name__}: build the GR around a {base}")
        for name in CONFIG:
            if name in settings and settings[name] != getattr(self, name):
                raise ValueError(
                    f"the checkpoint was saved by a GR with {name}={settings[name]!r}, this GR has {name}="
                    f"{getattr(self, name)!r}: build the GR with GR(..., {name}={settings[name]!r}) to resume it, or "
                    "load the base optimizer's state alone (drop the checkpoint's 'gr' entry)"
                )

    def _refuse_foreign_keys(self, group: dict[str, Any], i: int) -> None:
        """A group key that this base optimizer's groups do not have: a checkpoint of another optimizer."""
        known = {"params", NAMESPACE, "initial_lr", *self.base_optimizer.defaults,
                 *(key for g in self.param_groups for key in g)}
        foreign = sorted(set(group) - known)
        if foreign:
            raise ValueError(f"param group {i} of the checkpoint has the key(s) {foreign}, which "
                             f"{type(self.base_optimizer).__name__}'s groups do not have: it is a checkpoint of "
                             "another optimizer")

    def _migrated(self, group: dict[str, Any]) -> dict[str, Any]:
        """A gradreg 0.2.0 group: its ``gamma`` (and ``eps``, unless the base optimizer has an ``eps`` of its own,
        which 0.2.0 confused with GR's) moved under ``"gradreg"``."""
        own = {key: group.pop(key) for key in GROUP_KEYS if key in group and key not in self.base_optimizer.defaults}
        if "eps" not in own and self.method != "double":
            warnings.warn(f"a gradreg 0.2.0 checkpoint of GR around {type(self.base_optimizer).__name__}, whose own "
                          "'eps' shadowed GR's: GR's eps is taken from this wrapper "
                          f"({self.defaults[NAMESPACE]['eps']})", UserWarning, stacklevel=3)
        return {**group, NAMESPACE: own}

    def __getstate__(self) -> dict[str, Any]:
        """The wrapper whole (torch's keeps 3 fields), without an LR scheduler's patch of ``step`` (a local
        function, which pickle cannot store) and with an empty buffer (it is remade on the next step)."""
        state = {name: value for name, value in self.__dict__.items() if name != "step"}
        state["buffer"] = None if self.buffer is None else {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.base_optimizer._wrapped_by_gradreg = True  # a copied base optimizer is wrapped by the copy

    def __repr__(self) -> str:
        return (
            f"GR(method={self.method!r}, perturbation={self.perturbation!r}, "
            f"gamma={self.defaults[NAMESPACE]['gamma']}, eps={self.defaults[NAMESPACE]['eps']}, "
            f"base={self.base_optimizer!r})"
        )
