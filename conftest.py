"""Root conftest: applies to tests/ and to the notebooks nbval replays.

The data directory defaults to the shared MNIST folder beside the checkout (where CI's fresh clone
finds it); MICROCNN_DATA overrides it. Set here, before any notebook kernel starts, so kernels inherit it.
"""

import os
from pathlib import Path

_SHARED_MNIST = Path(__file__).resolve().parent.parent / "shared" / "datasets" / "mnist"
if "MICROCNN_DATA" not in os.environ and _SHARED_MNIST.is_dir():
    os.environ["MICROCNN_DATA"] = str(_SHARED_MNIST)
