"""PyTorch -> microcnn: ``from_torch(module, input_shape)`` (exported as ``microcnn.from_torch``).

Two routes, chosen by the module:

* An ``nn.Sequential`` (nested ones flattened) is converted module by module (``layer_of``): each layer
  keeps PyTorch's hyperparameters exactly (BatchNorm's eps and momentum), nothing is traced, and
  torch is the only optional package needed.
* Any other module (residual blocks, concatenations, functional calls in ``forward``) goes through ONNX:
  ``torch.onnx.export`` writes it, in eval mode with BatchNorm kept as a node, to a temporary file that
  ``onnx_io.load_onnx`` reads. The TorchScript exporter is used (``dynamo=False``): torch's default
  exporter needs onnxscript, which is not a dependency. ONNX rather than ``torch.fx``: an fx graph names
  Python callables (``torch.add``, ``operator.add``, ``F.relu``, ``Tensor.view``, ``torch.flatten``,
  ``torch.cat`` ...), each of which would need its own translation and shape rules; the exporter
  already reduces them all to the ONNX ops ``load_onnx`` translates, so one table serves files and
  modules, and a module converts exactly as its exported file would.

torch (the ``compare`` extra) and onnx (the ``onnx`` extra) are imported inside functions only.
"""

from __future__ import annotations

import os
import tempfile
import warnings

from .errors import InputError
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid, Softmax
from .network import Sequential
from .onnx_io import EXPORT_OPSET, load_onnx, require


def _torch():
    return require("torch", purpose="from_torch")


def _refuse(module, why: str):
    raise InputError(f"from_torch: cannot convert {module!r}: {why}")


def _pair_of(value):
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def layer_of(module):
    """The microcnn layer for one PyTorch module (weights copied), or None for ``nn.Identity`` and
    ``nn.Dropout`` (the converted model computes the module in eval mode, as the ONNX route does)."""
    nn = _torch().nn
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            _refuse(module, "expected explicit integer zero padding (padding=<int or pair>)")
        layer = Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                       module.padding, bias=module.bias is not None, dilation=module.dilation,
                       groups=module.groups)
    elif isinstance(module, nn.Linear):
        layer = Linear(module.in_features, module.out_features, bias=module.bias is not None)
    elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        if (_pair_of(getattr(module, "dilation", 1)) != (1, 1) or getattr(module, "return_indices", False)
                or getattr(module, "divisor_override", None)):
            _refuse(module, "expected dilation=1 and no indices or divisor_override")
        if isinstance(module, nn.MaxPool2d):
            layer = MaxPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode)
        else:
            layer = AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                              module.count_include_pad)
    elif isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            _refuse(module, "expected Flatten(start_dim=1, end_dim=-1)")
        layer = Flatten()
    elif isinstance(module, nn.Softmax):
        if module.dim not in (1, -1):
            _refuse(module, "expected Softmax over the class axis (dim=1)")
        layer = Softmax()
    elif type(module) in (nn.ReLU, nn.Sigmoid):
        layer = ReLU() if isinstance(module, nn.ReLU) else Sigmoid()
    elif isinstance(module, nn.Identity | nn.Dropout):  # identities at inference, what the model is for
        return None
    else:
        layer = _new_layer_of(module, nn)
    for p, name in zip(layer.parameters(), ("weight", "bias"), strict=False):
        p.data[...] = getattr(module, name).detach().cpu().numpy()
    return layer


def _new_layer_of(module, nn):
    """The layers of issue 13 (BatchNorm, ReLU6, LeakyReLU, Tanh, global average pooling)."""
    from . import layers

    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        if not module.affine or not module.track_running_stats or module.momentum is None:
            _refuse(module, "expected affine=True, track_running_stats=True and a momentum")
        cls = layers.BatchNorm2d if isinstance(module, nn.BatchNorm2d) else layers.BatchNorm1d
        layer = cls(module.num_features, eps=module.eps, momentum=module.momentum)
        layer.running_mean[...] = module.running_mean.detach().cpu().numpy()
        layer.running_var[...] = module.running_var.detach().cpu().numpy()
        return layer
    if isinstance(module, nn.ReLU6):
        return layers.ReLU6()
    if isinstance(module, nn.LeakyReLU):
        return layers.LeakyReLU(module.negative_slope)
    if isinstance(module, nn.Tanh):
        return layers.Tanh()
    if isinstance(module, nn.AdaptiveAvgPool2d) and _pair_of(module.output_size) == (1, 1):
        return layers.GlobalAvgPool2d()
    _refuse(module, "supported modules are Conv2d, Linear, BatchNorm1d/2d, ReLU, ReLU6, LeakyReLU, Sigmoid, "
            "Tanh, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Softmax, Dropout, Identity and "
            "nested Sequentials; other modules convert through ONNX (give a module that is not an "
            "nn.Sequential, with input_shape)")


def _leaves(module, nn):
    for child in module.children():
        yield from _leaves(child, nn) if isinstance(child, nn.Sequential) else (child,)


def from_torch(module, input_shape=None):
    """A microcnn model computing what ``module`` computes in eval mode (see the module docstring).

    Args:
        module: an ``nn.Module`` built from the supported layers.
        input_shape: (C, H, W) of one sample; required for modules that are not an ``nn.Sequential``
            (the ONNX export traces one such sample), recorded in the model in both cases.

    Example::

        net = from_torch(my_resnet_block, (3, 32, 32))  # any nn.Module of the supported layers
        probabilities = net.predict(images)
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"from_torch: expected a torch.nn.Module, found {type(module).__name__}")
    if isinstance(module, torch.nn.Sequential):
        layers = [layer for layer in map(layer_of, _leaves(module, torch.nn)) if layer is not None]
        return Sequential(*layers, input_shape=input_shape)
    shape = tuple(input_shape) if isinstance(input_shape, tuple | list) else ()
    if len(shape) != 3 or not all(isinstance(d, int) and 0 < d <= 1 << 16 for d in shape):
        raise InputError(f"from_torch: input_shape: expected (C, H, W) of one sample for a "
                         f"{type(module).__name__} (it is exported to ONNX with one such sample), "
                         f"found {input_shape!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{type(module).__name__}.onnx")
        training = module.training
        module.eval()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
                torch.onnx.export(module, (torch.zeros(1, *shape),), path, dynamo=False,
                                  opset_version=EXPORT_OPSET, input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                                  training=torch.onnx.TrainingMode.PRESERVE)
        except Exception as exc:  # the exporter raises assorted types for what it cannot trace
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise InputError(f"from_torch: torch.onnx.export failed on {type(module).__name__} "
                             f"({type(exc).__name__}: {first})") from None
        finally:
            module.train(training)
        try:
            return load_onnx(path)
        except InputError as exc:  # name the module, not the temporary file
            raise InputError(str(exc).replace(path, f"from_torch({type(module).__name__})")) from None
