"""What every method takes its steps on: a model, one fixed random batch and the loss.

Three built-in models (:data:`MODELS`) and any model of your own (``"package.module:function"``). The batch is
drawn once from a seeded generator, so every method — and every run with the same seed — sees the same data.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gradreg import models

MODELS = ("mlp", "resnet18", "transformer")
#: 128 for the MLP and ResNet-18 (the batch size of the paper's Wide-ResNet experiments), 32 sequences for the
#: transformer; 128 for a model of your own.
DEFAULT_BATCH_SIZE = {"mlp": 128, "resnet18": 128, "transformer": 32, "custom": 128}


@dataclass
class Workload:
    """A model, one fixed batch and its loss: what every method takes one step on."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    config: dict[str, Any] = field(default_factory=dict)
    #: ``loss_fn(model(inputs), targets)`` is the scalar loss (cross-entropy unless you pass another).
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default_factory=lambda: nn.functional.cross_entropy)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def is_custom(model: str) -> bool:
    """Whether ``model`` names a model of your own, ``"package.module:function"``."""
    return ":" in model


def check_model_name(model: str) -> None:
    """Raise ``ValueError`` unless ``model`` is a built-in name or has the form ``package.module:function``."""
    module, _, function = model.partition(":")
    if is_custom(model) and module.strip() and function.isidentifier():
        return
    if not is_custom(model) and model in MODELS:
        return
    raise ValueError(
        f"model must be one of {', '.join(map(repr, MODELS))} or 'package.module:function' (a function that "
        f"returns an nn.Module); got {model!r}"
    )


def load_custom_model(model: str) -> nn.Module:
    """Import ``package.module`` and call its ``function()``; it must return an ``nn.Module``."""
    check_model_name(model)
    module_name, _, function = model.partition(":")
    module = importlib.import_module(module_name)
    if not callable(getattr(module, function, None)):
        raise ValueError(f"model {model!r}: module {module_name!r} has no function {function!r}")
    net = getattr(module, function)()
    if not isinstance(net, nn.Module):
        raise TypeError(f"{model} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def make_workload(
    model: str = "mlp",
    *,
    depth: int = 8,
    width: int = 512,
    batch_size: int | None = None,
    seq_len: int = 64,
    d_model: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 10,
) -> Workload:
    """Build one of the benchmark's models with a random batch.

    * ``"mlp"``: ``models.mlp(width, width, depth, width, bias=False)``, a bias-free ReLU MLP whose every layer is
      width × width (inputs and 'classes' are ``width`` wide too, so every matrix product of a step has the
      same size), He-initialised so that activations keep their scale at any depth (vanishing activations
      would reach subnormal floats, which slow a CPU down and distort timings); cross-entropy over ``width``
      classes.
    * ``"resnet18"``: :func:`gradreg.models.resnet18_cifar`, 3×32×32 inputs, 10 classes, training mode
      (BatchNorm with batch statistics).
    * ``"transformer"``: :func:`gradreg.models.transformer_encoder` (two encoder layers, ``d_model`` wide,
      4 heads, no dropout) on ``seq_len`` tokens, 10 classes.
    * ``"package.module:function"``: your own model, ``function()`` → ``nn.Module``, on standard-normal inputs
      of shape (batch, ``*input_shape``) and cross-entropy over ``num_classes`` classes (default batch 128).
    """
    check_model_name(model)
    kind = "custom" if is_custom(model) else model
    batch = _positive("batch_size", DEFAULT_BATCH_SIZE[kind] if batch_size is None else batch_size)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config: dict[str, Any] = {"model": model, "batch_size": batch, "dtype": str(dtype).removeprefix("torch.")}
    if kind == "custom":
        net, x, y = _custom(model, input_shape, num_classes, batch, generator)
        config.update(input_shape=list(x.shape[1:]), num_classes=num_classes)
        name = model
    elif kind == "mlp":
        net, x, y = _mlp(_positive("depth", depth), _positive("width", width), batch, generator)
        config.update(depth=depth, width=width)
        name = f"MLP depth {depth}, width {width}"
    elif kind == "resnet18":
        net = models.resnet18_cifar(10)
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        name = "ResNet-18 (CIFAR)"
    else:
        net = models.transformer_encoder(_positive("d_model", d_model), 4, num_layers=2, dim_feedforward=4 * d_model)
        x = torch.randn(batch, _positive("seq_len", seq_len), d_model, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        config.update(seq_len=seq_len, d_model=d_model)
        name = f"Transformer encoder (2 layers, d={d_model}, {seq_len} tokens)"
    net = net.to(device=device, dtype=dtype).train()
    return Workload(name, net, x.to(device=device, dtype=dtype), y.to(device), config)


def _custom(
    model: str, input_shape: Sequence[int] | None, num_classes: int, batch: int, generator: torch.Generator
) -> tuple[nn.Module, Tensor, Tensor]:
    """Your own model on standard-normal inputs of shape (batch, *input_shape), ``num_classes`` classes."""
    if input_shape is None:
        raise ValueError(f"input_shape is required for a model of your own ({model}), e.g. (3, 32, 32)")
    shape = [_positive("every entry of input_shape", n) for n in input_shape]
    classes = _positive("num_classes", num_classes)
    net = load_custom_model(model)
    x = torch.randn(batch, *shape, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return net, x, y


def _mlp(depth: int, width: int, batch: int, generator: torch.Generator) -> tuple[nn.Module, Tensor, Tensor]:
    """The bias-free, He-initialised width × width ReLU MLP, inputs and targets (``width`` classes)."""
    net = models.mlp(width, width, depth, width, bias=False)
    for layer in net:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
    x = torch.randn(batch, width, generator=generator)
    y = torch.randint(0, width, (batch,), generator=generator)
    return net, x, y
