"""Models used by the chapters and the benchmarks."""

from __future__ import annotations

from torch import nn


def mlp(
    in_features: int, width: int, depth: int, out_features: int, *, bias: bool = True,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A ``depth``-layer perceptron: ``depth`` linear layers of ``width`` units with ``activation`` between them."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def cnn1d(length: int = 40, channels: int = 32, num_classes: int = 10) -> nn.Sequential:
    """A small 1-D convolutional network for signals of shape (batch, ``length``), e.g. MNIST-1D: three ReLU
    convolutions of ``channels`` channels (kernel 5, 3, 3; strides 1, 2, 2) and a linear classifier.
    With the defaults it has 9.6 k parameters."""
    reduced = (length + 1) // 2
    reduced = (reduced + 1) // 2
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, padding=2), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * reduced, num_classes),
    )


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions with BatchNorm, identity (or 1×1-projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 3×32×32 inputs (the common CIFAR variant): a 3×3 stem without max-pooling, four stages of
    two basic blocks (64, 128, 256, 512 channels; strides 1, 2, 2, 2), BatchNorm after every convolution,
    global average pooling and a linear classifier. 11.2 M parameters for 10 classes."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            layers.append(_BasicBlock(in_planes, planes, block_stride))
            in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class _MeanPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def transformer_encoder(
    d_model: int = 128, nhead: int = 4, *, num_layers: int = 2, dim_feedforward: int = 512,
    num_classes: int = 10, dropout: float = 0.0,
) -> nn.Sequential:
    """A small sequence classifier: ``num_layers`` ``nn.TransformerEncoderLayer``\\ s (batch first, post-norm,
    ReLU feed-forward) on inputs of shape (batch, length, ``d_model``), mean pooling over the sequence and a
    linear head. Self-attention runs through ``scaled_dot_product_attention``, so PyTorch picks a fused
    attention kernel where one exists — kernels without a double backward (see Chapter 2)."""
    layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
    return nn.Sequential(encoder, _MeanPool(), nn.Linear(d_model, num_classes))
