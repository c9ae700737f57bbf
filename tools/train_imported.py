"""Train the three PyTorch networks of issue 13's accuracy targets and export them to ONNX (data/).

* ``fmnist-bn-cnn.onnx``: Conv+BatchNorm+ReLU blocks, two stride-2 convolutions, global average
  pooling, Linear; Fashion-MNIST.
* ``mnist-mlp.onnx``: Flatten, Linear 784-64, ReLU, Linear 64-10; MNIST.
* ``fmnist-resnet.onnx``: a stem and two residual blocks (the second downsamples with a 1x1 projection),
  global average pooling, Linear; Fashion-MNIST.

Full training splits, Adam, seeds explicit and deterministic algorithms, one thread, no augmentation.
BatchNorm stays a node of the files (``TrainingMode.PRESERVE``) so the importer and the quantizer meet
it. Existing files are never overwritten.

Usage: ``python tools/train_imported.py [--out data] [--only NAME]`` (needs the ``compare`` extra).
"""

import argparse
import os
import sys
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from microcnn.datasets import load_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_onnx import Residual  # noqa: E402  (the block bench_onnx times)


def bn_cnn():
    def block(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def resnet():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Residual(16, 16, 1), Residual(16, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


# name -> (builder, dataset, epochs)
MODELS = {"fmnist-bn-cnn": (bn_cnn, "fashion-mnist", 3), "mnist-mlp": (mlp, "mnist", 20),
          "fmnist-resnet": (resnet, "fashion-mnist", 3)}


def train(module, dataset: str, epochs: int, seed: int = 0, batch: int = 128):
    torch.manual_seed(seed)
    images, labels = load_dataset(dataset, "train", progress=False)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (-(-len(x) // batch)))
    gen = torch.Generator().manual_seed(seed)
    module.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in tqdm(range(0, len(x), batch), desc=f"epoch {epoch + 1}/{epochs}", unit="batch"):
            idx = order[s:s + batch]
            loss = nn.functional.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return module.eval()


def export(module, path: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 1, 28, 28),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE)  # BatchNorm stays a node


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="folder of the .onnx files (default data)")
    parser.add_argument("--only", choices=sorted(MODELS), help="train one model only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name, (build, dataset, epochs) in MODELS.items():
        if args.only and name != args.only:
            continue
        path = os.path.join(args.out, f"{name}.onnx")
        if os.path.exists(path):
            print(f"{path} exists; not overwritten")
            continue
        torch.manual_seed(0)
        module = train(build(), dataset, epochs)
        test_x, test_y = load_dataset(dataset, "test", progress=False)
        with torch.no_grad():
            acc = (module(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean()
        export(module, path)
        print(f"{path}: {epochs} epochs on {dataset}, test accuracy {acc * 100:.2f}% (PyTorch), "
              f"{os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
