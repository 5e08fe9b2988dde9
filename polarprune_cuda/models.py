"""CIFAR-style ResNets (He et al. 2016, section 4.2) for small inputs.

Three stages of BasicBlocks with 16, 32 and 64 channels, depth ``6n + 2``.
Downsampling blocks use a 1x1 convolution + BatchNorm projection shortcut
(option B), which channel pruning can follow; the parameter-free zero-padding
shortcut (option A) cannot be pruned structurally.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "cifar_resnet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (any size works: global average pooling)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth!r}")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, layers = width, []
        in_planes = width
        for stage in range(3):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
            planes *= 2
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(110, num_classes, in_channels)


class CifarVGG(nn.Module):
    """A VGG-style plain CNN for small images: 3x3 conv + BN + ReLU stages with max pooling, global average
    pooling, one linear classifier. ``widths`` lists the convs, ``"M"`` a 2x2 max pool (in
    ceil mode, so a 1x1 map stays 1x1 and 8x8 inputs work too)."""

    def __init__(self, widths, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


VGG_WIDTHS = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]}


def vgg11(num_classes: int = 10, in_channels: int = 3) -> CifarVGG:
    """VGG-11 with BatchNorm for small images (9.2M params)."""
    return CifarVGG(VGG_WIDTHS["vgg11"], num_classes, in_channels)


CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
#: torchvision ResNets whose stem ``small_input`` replaces (any torchvision classification model works by name)
TORCHVISION = ("resnet18", "resnet34", "resnet50")


def torchvision_names() -> list[str]:
    """Every torchvision classification model's name (empty without torchvision)."""
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _timm_name(name: str) -> str | None:
    return name[len("timm:"):] if name.startswith("timm:") else None


def is_builtin(name) -> bool:
    """Whether ``name`` builds a model from this package or a named library (torchvision, timm) rather than from
    code a name points at (``module:function``)."""
    if not isinstance(name, str) or not name:
        return False
    if name in CIFAR_DEPTHS or name in VGG_WIDTHS or name in TORCHVISION:
        return True
    timm_name = _timm_name(name)
    if timm_name is not None:
        return bool(timm_name) and ":" not in timm_name and "/" not in timm_name
    return ":" not in name and name in torchvision_names()


def _first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the model's first convolution by one that takes ``in_channels`` channels (freshly initialised)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                if child.groups != 1:
                    raise ValueError(f"the model's first convolution is grouped ({child.groups} groups): it cannot "
                                     f"take {in_channels} input channels")
                setattr(parent, child_name, nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                                      child.stride, child.padding, child.dilation,
                                                      bias=child.bias is not None, padding_mode=child.padding_mode))
                return
    raise ValueError("the model has no Conv2d to take the input channels")


def _import_function(name: str):
    """``module:function`` imported as ``python -m`` would: the current folder first on the path."""
    import importlib
    import os
    import sys

    module_name, _, fn_name = name.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"model {name!r}: cannot import {fn_name} from {module_name} ({exc}; looked in the "
                         f"current folder {cwd} and on the Python path)") from exc
    finally:
        if added:
            sys.path.remove(cwd)


def build_model(name: str, num_classes: int, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """A model by name, its weights random.

    * ``resnet20`` ... ``resnet110`` (CIFAR-style), ``vgg11`` (this package);
    * any torchvision classification model by its name (``resnet18``, ``mobilenet_v3_small``, ...; the first
      convolution replaced where the data have other than 3 channels; ``small_input`` gives a torchvision ResNet
      a 3x3 stride-1 stem without max pooling, for 32x32-sized images);
    * ``timm:NAME``: ``timm.create_model(NAME, num_classes=, in_chans=)`` (timm installed: ``pip install timm``);
    * ``module:function``, imported as ``python -m`` would (the current folder first) and called with
      ``num_classes=`` (and ``in_channels=`` or ``in_chans=`` where it takes one).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty name, got {name!r}")
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes, in_channels)
    if name in VGG_WIDTHS:
        return CifarVGG(VGG_WIDTHS[name], num_classes, in_channels)
    timm_name = _timm_name(name)
    if timm_name is not None:
        try:
            import timm
        except ImportError:
            raise ValueError(f"model {name!r} needs timm, which is not installed: pip install timm") from None
        if not timm_name or timm_name not in timm.list_models():
            close = timm.list_models(f"*{timm_name}*")[:5] if timm_name else []
            raise ValueError(f"model {name!r}: timm has no model {timm_name!r}"
                             + (f" (close: {', '.join(close)})" if close else ""))
        return timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if ":" in name:
        import inspect

        fn = _import_function(name)
        kwargs = {"num_classes": num_classes}
        try:
            params = inspect.signature(fn).parameters
            for arg in ("in_channels", "in_chans"):
                if arg in params:
                    kwargs[arg] = in_channels
        except (TypeError, ValueError):
            pass
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    names = torchvision_names()
    if name in names:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if name in TORCHVISION and small_input:
            model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            _first_conv(model, in_channels)
        return model
    import difflib

    known = list(CIFAR_DEPTHS) + list(VGG_WIDTHS) + names
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"model {name!r} is not a model name: resnet20/32/44/56/110, vgg11, a torchvision "
                     f"classification model{'' if names else ' (torchvision is not installed)'}, timm:NAME or "
                     f"module:function" + (f"; close: {', '.join(close)}" if close else ""))
