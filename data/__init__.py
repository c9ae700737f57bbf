"""The shipped LeNet-5 weights (lenet.raw, lenet.safetensors): installed as the package data
``microcnn.data`` (see pyproject.toml and ``microcnn.lenet``)."""
