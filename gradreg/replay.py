"""One step's context: the same function in every pass, and nothing lost when a pass fails.

A GR step (and a power iteration on the Hessian) evaluates the closure several times, at θ and at perturbed
points, and must differentiate the *same* function each time. :class:`Replay` makes that so and can undo it all:

* **Random numbers.** The CPU and CUDA generator states are saved on entry and restored before every replayed
  pass, so dropout draws the same masks; afterwards the generators continue from where the first pass left them
  (a GR step consumes random numbers like one plain step) or, with ``replay_first=True``, from where they were.
* **Buffers.** Every module the closure calls is seen through a global forward pre-hook (inside a
  ``torch.compile``d module: every module it holds). Its buffers are copied the first time it runs; in every
  replayed pass they are set back to those pre-step values before the module runs, and after the pass to the
  values the first pass left. So running statistics (BatchNorm, InstanceNorm, ...) are updated once per step,
  and a module that advances a buffer in ``forward`` (a spectral-norm parametrization's power iteration, any
  custom counter) computes the same function in every pass. State kept outside modules' buffers (a Python
  attribute, a global) is not covered: keep such updates out of the closure.
* **Same function, checked.** A module whose ``training`` flag differs from the first pass (a closure that calls
  ``model.eval()``), an in-place write to a parameter inside the closure (``weight.clamp_()``; an
  ``Embedding(max_norm=...)`` is refused before it runs), an optimizer stepped inside the closure, and a
  ``DistributedDataParallel`` module that the engine was not told about (``ddp_seen``) are errors.
* **Perturbed points.** :meth:`Replay.swap_in` points each parameter's ``.data`` at a tensor of the perturbed
  point; :meth:`Replay.end_pass` points it back at θ, whose storage is never written, so θ returns bit for bit.
* **The closure's manners.** Between the start and the end of each closure call every ``.grad`` must stay the
  same object at the same version: a closure that calls ``zero_grad()`` or ``backward()`` is refused, because the
  engine's passes accumulate into ``.grad`` and would be silently wrong.
* **Rollback.** The ``.grad`` objects found on entry are set aside (each ``.grad`` is ``None`` when the first
  pass starts), so a closure cannot touch them. On any failure :meth:`Replay.rollback` restores parameters,
  ``.grad`` (the very objects, untouched), buffers and the generators, and notes on the exception which pass
  failed. The one thing it cannot undo is a closure's own in-place write to θ in the first pass (gradreg keeps
  no copy of θ); that write is detected and the note says so instead of claiming θ was restored.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn.modules import module as nn_module
from torch.nn.parameter import is_lazy
from torch.optim import optimizer as optim_module

RNGState = tuple[Tensor, list[Tensor]]


class ClosureError(RuntimeError):
    """The closure did something that breaks the step: ``zero_grad()``/``backward()`` (the engine's job), an
    optimizer step, a switch of ``train()``/``eval()`` between passes, an in-place write to a parameter."""


def _rng_state() -> RNGState:
    """The CPU generator and every initialized CUDA device's (dropout may draw on any of them)."""
    devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: RNGState) -> None:
    torch.set_rng_state(state[0])
    for device, cuda_state in enumerate(state[1]):
        torch.cuda.set_rng_state(cuda_state, device)


def _copy_buffers(module: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.clone()) for b in module._buffers.values() if b is not None and not is_lazy(b)]


def _put_back(pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for buffer, saved in pairs:
            buffer.copy_(saved)


def annotate(exc: BaseException, message: str) -> None:
    """Add ``message`` to ``exc``: as a note (Python ≥ 3.11), else appended to its message where that is a string."""
    if hasattr(exc, "add_note"):
        exc.add_note(message)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]}\n{message}", *exc.args[1:])


_STEPS: list[Replay] = []  # the steps in progress, innermost last: the one hook below hands module calls to it
_KEY: list[int] = []  # the hook's key, the same in every step: torch.compile guards on it (a new key recompiles)
_EAGER: list[Callable[[torch.nn.Module, object], None]] = []  # _see, run eagerly from inside a compiled graph


def _is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile(model)`` returns (its graph hides the modules inside)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None),
                                                                      torch.nn.Module)


def _see(module: torch.nn.Module, args: object) -> None:
    if _STEPS:
        _STEPS[-1]._pre_hook(module, args)


def _module_pre_hook(module: torch.nn.Module, args: object) -> None:
    """The global forward pre-hook of every step: every module call goes to the step (from inside a graph that
    torch.compile traced, through a graph break, so that the step sees it eagerly)."""
    if not torch.compiler.is_compiling():
        _see(module, args)
    elif _EAGER and (module._buffers or _is_compiled(module)):  # a graph break only where buffers are at stake
        _EAGER[0](module, args)


def _optimizer_pre_hook(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """An optimizer stepped while a step is in progress: only a closure can do that."""
    if _STEPS:
        raise ClosureError(
            f"the closure called {type(optimizer).__name__}.step(): the closure must only run the forward pass and "
            "return the loss; gradreg steps the optimizer after the direction is computed. Nothing was changed"
        )


def _install(step: Replay) -> None:
    _STEPS.append(step)
    if len(_STEPS) > 1:
        return
    if not _EAGER and "torch._dynamo" in sys.modules:  # torch.compile is in use (importing it costs seconds)
        _EAGER.append(torch.compiler.disable(_see))
    if _KEY:
        nn_module._global_forward_pre_hooks[_KEY[0]] = _module_pre_hook
        optim_module._global_optimizer_pre_hooks[_KEY[1]] = _optimizer_pre_hook
    else:
        _KEY.append(nn_module.register_module_forward_pre_hook(_module_pre_hook).id)
        _KEY.append(optim_module.register_optimizer_step_pre_hook(_optimizer_pre_hook).id)


def _uninstall(step: Replay) -> None:
    if step in _STEPS:
        _STEPS.remove(step)
    if not _STEPS:
        nn_module._global_forward_pre_hooks.pop(_KEY[0], None)
        optim_module._global_optimizer_pre_hooks.pop(_KEY[1], None)


def _refuse_in_place_writers(module: torch.nn.Module) -> None:
    """Modules known to write their own weight in place during forward, refused before they run."""
    if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.max_norm is not None:
        raise ClosureError(
            f"{type(module).__name__}(max_norm={module.max_norm}) renormalizes its weight in place during forward, "
            "so each pass of a GR step would differentiate another θ: use max_norm=None and renormalize after "
            "optimizer.step() (e.g. with torch.no_grad(): emb.weight.renorm_(2, 0, max_norm))"
        )


class Replay:
    """The context of one step over ``params``; see the module docstring. Use :meth:`close` or :meth:`rollback`.

    ``closures`` are the micro-batches of the step (their losses add up to the step's loss); ``loss_scale``
    multiplies every back-propagated loss (a GradScaler's scale); ``ddp`` is the DistributedDataParallel module
    whose gradient synchronisation :meth:`run_pass` switches on only where asked.
    """

    def __init__(self, params: Sequence[Tensor], *, replay_first: bool = False,
                 closures: Sequence[Callable[[], Tensor]] = (), loss_scale: float = 1.0,
                 ddp: torch.nn.Module | None = None):
        self.closures, self.loss_scale, self.ddp = list(closures), loss_scale, ddp
        self.params = list(params)
        self.data = [p.data for p in self.params]  # θ: its storage is never written during the step
        self.grads = [p.grad for p in self.params]  # the .grad objects before the step, out of the closure's reach
        for p in self.params:
            p.grad = None
        self.replay_first = replay_first
        self.rng_start = _rng_state()
        self.rng_before: list[RNGState] = [self.rng_start]  # before each micro-batch of the first pass
        self.rng_after_first: RNGState | None = None
        self.passes = 0
        self.swapped = False  # whether the parameters point at a perturbed point (not θ) now
        self.theta_written = False  # a closure wrote θ in place (the one change a rollback cannot undo)
        self.saved: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}  # buffers before the step
        self.after_first: dict[torch.nn.Module, list[tuple[Tensor, Tensor]]] = {}  # buffers as pass 1 left them
        self.reset: set[torch.nn.Module] = set()  # modules set back to their pre-step buffers in this pass
        self.modes: dict[torch.nn.Module, bool] = {}  # each module's training flag when first seen
        self.ddp_seen: torch.nn.Module | None = None  # a DistributedDataParallel module the closure called
        _install(self)

    @property
    def replaying(self) -> bool:
        return self.replay_first or self.passes > 1

    def _pre_hook(self, module: torch.nn.Module, args: object) -> None:
        """Before a module runs (a compiled one: with every module inside it): the same mode as in the first pass,
        its buffers kept the first time and set back to them in a replayed pass."""
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            self.ddp_seen = module
        for m in module._orig_mod.modules() if _is_compiled(module) else [module]:
            _refuse_in_place_writers(m)
            if self.modes.setdefault(m, m.training) != m.training:
                raise ClosureError(
                    f"{type(m).__name__} runs in {'train' if m.training else 'eval'} mode in pass {self.passes} but "
                    f"ran in {'train' if self.modes[m] else 'eval'} mode in pass 1: the closure switches "
                    "model.train()/model.eval(), so the passes would differentiate different functions. Set the "
                    "mode before the step, outside the closure"
                )
            if not m._buffers or m in self.reset:
                continue
            if m not in self.saved:
                self.saved[m] = _copy_buffers(m)
            elif self.replaying:
                _put_back(self.saved[m])
            if self.replaying:
                self.reset.add(m)

    def begin_pass(self) -> None:
        self.passes += 1
        if self.replaying and self.rng_after_first is None and not self.replay_first:
            self.rng_after_first = _rng_state()
            self.after_first = {m: _copy_buffers(m) for m in self.saved}

    def no_sync(self, skip: bool = True) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` when ``skip`` (and there is a DDP module), else nothing."""
        return self.ddp.no_sync() if skip and self.ddp is not None else contextlib.nullcontext()

    def run_pass(self, inputs: Sequence[Tensor], seed: float = 1.0, *, sync: bool = True) -> Tensor:
        """One gradient pass: ``.grad += seed·∇L_i`` for every micro-batch i (back-propagating seed·loss_scale·L_i),
        synchronised across DDP workers only on the last micro-batch and only if ``sync``; returns Σ_i L_i."""
        self.begin_pass()
        total, scale = None, seed * self.loss_scale
        for i, closure in enumerate(self.closures):
            with self.no_sync(not (sync and i == len(self.closures) - 1)):
                loss = self.evaluate(closure, i)
                torch.autograd.backward(loss, None if scale == 1.0 else torch.full_like(loss, scale), inputs=inputs)
            total = loss.detach() if total is None else total + loss.detach()
        return total

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        """The mean over the DDP workers, in place, through one flat buffer."""
        flat = torch._utils._flatten_dense_tensors(tensors)
        torch.distributed.all_reduce(flat, group=self.ddp.process_group)
        flat /= torch.distributed.get_world_size(self.ddp.process_group)
        for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
            t.copy_(f)

    def evaluate(self, closure: Callable[[], Tensor], index: int = 0) -> Tensor:
        """``closure()`` (micro-batch ``index``), checked; in a replayed pass with the random numbers that the first
        pass drew for it. A first call with no pass begun begins one."""
        if self.passes == 0:
            self.begin_pass()
        if self.replaying:
            _set_rng_state(self.rng_before[index])
        elif index == len(self.rng_before):
            self.rng_before.append(_rng_state())
        watched = [(p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        versions = [p._version for p in self.params]
        with torch.enable_grad():
            loss = closure()
        self._check_versions(versions)
        for p, (grad, version) in zip(self.params, watched):
            if p.grad is not grad or (grad is not None and grad._version != version):
                raise ClosureError(
                    "the closure changed .grad (it called zero_grad() or backward()): the closure must only run "
                    "the forward pass and return the loss, e.g. lambda: loss_fn(model(x), y) — remove "
                    "optimizer.zero_grad()/model.zero_grad()/loss.backward() from it; gradreg differentiates itself. "
                    "A trainer whose closure calls backward (Lightning's automatic optimization) cannot drive GR: "
                    "use manual optimization and GR.direction (see the book's How-to page)"
                )
        if not isinstance(loss, Tensor):
            hint = ("; a trainer that passes an empty closure of its own (Lightning's opt.step() on a GR optimizer) "
                    "needs the base optimizer instead, with GR.direction in training_step (see the How-to page)"
                    if loss is None else "")
            raise TypeError(f"closure must return the loss as a scalar tensor, got {type(loss).__name__}{hint}")
        if loss.ndim != 0:
            raise ValueError(f"closure must return a scalar loss, got shape {tuple(loss.shape)}")
        if not loss.is_floating_point():
            raise TypeError(f"closure must return a real floating-point loss, got dtype {loss.dtype} (a complex loss "
                            "has no gradient to regularize: return its real part or its absolute value explicitly)")
        if not loss.requires_grad:
            raise ValueError(
                "closure returned a loss that does not require grad: it must not detach the loss, run under "
                "torch.no_grad(), or call backward() itself and return loss.detach() (as some trainers' closures do)"
            )
        return loss

    def _check_versions(self, versions: list[int]) -> None:
        changed = [i for i, (p, v) in enumerate(zip(self.params, versions)) if p._version != v]
        if changed:
            self.theta_written = not self.swapped  # a perturbed pass wrote the point's buffer, not θ
            raise ClosureError(
                f"the closure wrote parameter(s) {changed[:5]} in place (e.g. weight.clamp_(), a renorm, an "
                "optimizer-like update): each pass of a GR step must differentiate the same θ. Move the in-place "
                "update out of the closure (after optimizer.step())"
            )

    def swap_in(self, point: Sequence[Tensor]) -> None:
        """Evaluate the next pass at ``point`` (one tensor per parameter) instead of θ."""
        for p, x in zip(self.params, point):
            p.data = x
        self.swapped = True

    def end_pass(self) -> None:
        """After a pass and its backward: θ back in place, buffers as the first pass left them."""
        for p, data in zip(self.params, self.data):  # p.data is a new object on each access: no identity test
            p.data = data
        self.swapped = False
        for m in self.reset:  # replay_first: every pass leaves the buffers as they were before the step
            _put_back(self.saved[m] if self.replay_first else self.after_first.get(m, self.saved[m]))
        self.reset.clear()

    def close(self, keep_grads: bool = True) -> None:
        """Success: keep the first pass's statistics; the generators go on as after it. ``.grad`` keeps what the
        passes left there (``keep_grads``) or gets the objects found on entry back."""
        self.end_pass()
        if not keep_grads:
            for p, grad in zip(self.params, self.grads):
                p.grad = grad
        if self.replay_first:
            _set_rng_state(self.rng_start)
        elif self.rng_after_first is not None:
            _set_rng_state(self.rng_after_first)
        _uninstall(self)

    def rollback(self, exc: BaseException | None = None, where: str = "", hint: str = "") -> None:
        """Failure: parameters, ``.grad``, buffers and generators exactly as before the step."""
        self.reset.clear()
        self.end_pass()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        for pairs in self.saved.values():
            _put_back(pairs)
        _set_rng_state(self.rng_start)
        _uninstall(self)
        if exc is not None:
            theta = ("parameters (except the closure's own in-place write to θ, which gradreg cannot undo)"
                     if self.theta_written else "parameters")
            annotate(exc, f"gradreg: raised {where}; {theta}, .grad, buffers (running statistics) and RNG were "
                          "restored." + hint)
