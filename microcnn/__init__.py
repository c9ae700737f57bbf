"""microcnn: a compact Numba-backed CNN engine and quantization workbench.

Importing microcnn compiles nothing: Numba kernels compile (or load from cache) on first call.
"""

from .errors import DataNotFoundError, DownloadError, FileFormatError, InputError, MicrocnnError
from .graph import Add, Concat, Graph
from .io import save_model
from .layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    ReLU6,
    Sigmoid,
    Softmax,
    Tanh,
    fold_batchnorm,
)
from .lenet import lenet
from .model import Model
from .network import Sequential

__version__ = "0.1.0"


def load_model(path):
    """Load a self-describing model file: FP32, quantized or storage-compressed
    (``microcnn.quant.loading.load_model``; imported on first use so ``import microcnn`` stays light)."""
    from .quant.loading import load_model as load_any

    return load_any(path)


load = load_model


def from_torch(module, input_shape=None):
    """A microcnn model from a PyTorch ``nn.Module`` (``microcnn.torch_io.from_torch``; torch is optional)."""
    from .torch_io import from_torch as convert

    return convert(module, input_shape)


_QUANT_API = ("calibrate", "quantize", "compress")


def __getattr__(name):
    # The quantization API is re-exported lazily so `import microcnn` stays light.
    if name in _QUANT_API:
        from . import quant

        return getattr(quant, name)
    raise AttributeError(f"module 'microcnn' has no attribute {name!r}")


def set_num_threads(n: int) -> None:
    """Threads used by the parallel Numba kernels (benchmarks pin this to 1 by default)."""
    import numba

    numba.set_num_threads(int(n))


__all__ = [
    "Add", "Concat", "Graph", "Model",
    "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "DataNotFoundError", "DownloadError", "Dropout",
    "FileFormatError", "Flatten", "GlobalAvgPool2d", "InputError", "LeakyReLU", "Linear", "MaxPool2d",
    "MicrocnnError", "ReLU", "ReLU6", "Sequential", "Sigmoid", "Softmax", "Tanh", "__version__",
    "fold_batchnorm", "calibrate", "compress", "from_torch", "lenet", "load", "load_model", "quantize",
    "save_model", "set_num_threads",
]
