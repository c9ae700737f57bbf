"""Post-training quantization workbench: calibration observers, INT8 / packed-INT4 quantized networks,
storage-only compression, accuracy and timing analysis, mixed precision.

Typical use::

    from microcnn.quant import calibrate, quantize
    cal = calibrate(net, train_images, method="mse", samples=100)
    qnet = quantize(net, cal, weight_bits=8, act_bits=8)
    qnet.accuracy(test_images, test_labels); qnet.nbytes; qnet.save("lenet-int8.safetensors")
"""

from .analysis import layer_error_table, per_layer_table, sqnr_db
from .calibrate import Calibration, calibrate, load_calibration
from .compress import CompressedModel, compress
from .loading import load_model
from .mixed import MixedPrecisionResult, mixed_precision
from .observers import (
                        EntropyObserver,
                        HistogramObserver,
                        MinMaxObserver,
                        MovingAverageMinMaxObserver,
                        MSEObserver,
                        Observer,
                        PercentileObserver,
                        make_observer,
)
from .params import ActQuant, fixed_point_multiplier, qparams_from_range
from .precision import PRECISIONS, Precision, build_precision, parse_precision
from .qgraph import QuantizedGraph
from .qnetwork import QuantizedSequential
from .quantize import quantize

__all__ = [
    "PRECISIONS", "ActQuant", "Calibration", "CompressedModel", "EntropyObserver", "HistogramObserver",
    "MSEObserver", "MinMaxObserver", "MixedPrecisionResult", "MovingAverageMinMaxObserver", "Observer",
    "PercentileObserver", "Precision", "QuantizedGraph", "QuantizedSequential", "build_precision",
    "calibrate", "compress",
    "fixed_point_multiplier", "layer_error_table", "load_calibration", "load_model", "make_observer",
    "mixed_precision", "parse_precision", "per_layer_table", "qparams_from_range", "quantize", "sqnr_db",
]
