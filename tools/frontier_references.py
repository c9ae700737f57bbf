"""PyTorch and ONNX Runtime reference points for notebook 07 (the quantization frontier), into a small JSON
file the notebook plots (it runs where torch is not installed, as in CI).

At the notebook's points, on the same weights (the bundled ``lenet`` and ``fashion`` models), the same
first ``--samples`` test images and the same calibration images (``--calibration`` training images drawn
with each seed exactly as ``microcnn sweep`` draws them, through ``microcnn.quant.calibrate``):

* post-training: PyTorch eager ``torch.ao`` static INT8 (x86, per-channel weights, histogram activation
  ranges: ``microcnn.compare.torch_int8``) and ONNX Runtime QDQ (MinMax, per-channel) at W8A8, W4A8 and
  W4A4 (``microcnn.compare.ort_quantize``), for every seed;
* quantization-aware training at 4 and 2 bits: PyTorch fake quantization with LSQ (Esser et al.'s
  formulation: learned per-channel weight steps and per-tensor activation steps, the gradient scale
  1/sqrt(N Qp), round-half-even with a straight-through estimator) next to microcnn's own QAT
  (``microcnn.train.qat_fit``, the integer model it converts to) with the same recipe: the same start
  weights, LSQ step initialisation on the same 256 images, Adam at 1e-3 with a per-batch cosine
  schedule, batches of 64, no augmentation, the first ``--qat-images`` training images. PyTorch's number
  is the fake-quantized model's accuracy (torch has no integer kernels below 8 bits).

Usage (needs the ``compare`` extra; about 15 min on one loaded core)::

    python tools/frontier_references.py --out notebooks/frontier_references.json

An existing output is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from datetime import UTC, datetime

import numpy as np

SEEDS = (0, 1, 2)
PTQ_PRECISIONS = ("w8a8", "w4a8", "w4a4")
# QAT points at 4 and 2 bits: W2A2 on MNIST (the LeNet target), W2A4 on Fashion (its target).
QAT_POINTS = {"lenet": ("w4a4", "w2a2"), "fashion": ("w4a4", "w2a4")}
QAT_EPOCHS = {"lenet": 2, "fashion": 1}


def lsq_torch_model(torch, net, weight_bits: int, act_bits: int, start: np.ndarray):
    """A torch module running ``net`` (microcnn Sequential) with LSQ fake quantizers on every Conv2d/Linear
    weight (per output channel, signed grid) and input (per tensor, unsigned grid), initialised as
    ``microcnn.quant.qat.QATNetwork(init="lsq")``: 2 mean|v| / sqrt(Qp)."""
    from microcnn.compare import to_torch

    nn, F = torch.nn, torch.nn.functional
    layers = [m for m in to_torch(net).train() if not isinstance(m, nn.Softmax)]  # logits
    wqn, wqp = 2 ** (weight_bits - 1), 2 ** (weight_bits - 1) - 1
    aqp = 2 ** act_bits - 1

    def lsq(x, step, qn, qp, g):
        s = (step - step * g).detach() + step * g  # value s, gradient g ds
        v = torch.clamp(x / s, -qn, qp)
        return ((v.round() - v).detach() + v) * s  # round half to even, straight-through

    class LSQNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleList(layers)
            self.weighted = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d | nn.Linear)]
            with torch.no_grad():
                x, steps = torch.from_numpy(start), {}
                for i, m in enumerate(layers):
                    if i in self.weighted:
                        steps[i] = 2 * x.abs().mean() / math.sqrt(aqp)
                    x = m(x)
            self.act_steps = nn.ParameterList([nn.Parameter(steps[i].reshape(())) for i in self.weighted])
            self.weight_steps = nn.ParameterList([
                nn.Parameter(2 * layers[i].weight.detach().abs().flatten(1).mean(1) / math.sqrt(wqp))
                for i in self.weighted])

        def forward(self, x):
            for i, m in enumerate(self.body):
                if i not in self.weighted:
                    x = m(x)
                    continue
                k = self.weighted.index(i)
                x = lsq(x, self.act_steps[k], 0, aqp, 1 / math.sqrt(x[0].numel() * aqp))
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                w = lsq(m.weight, self.weight_steps[k].reshape(shape), wqn, wqp,
                        1 / math.sqrt(m.weight[0].numel() * wqp))
                x = F.conv2d(x, w, m.bias, m.stride, m.padding) if isinstance(m, nn.Conv2d) \
                    else F.linear(x, w, m.bias)
            return x

    return LSQNet()


def torch_qat(torch, net, images, labels, weight_bits, act_bits, epochs, seed=0, batch_size=64, lr=1e-3):
    """Train the LSQ model (recipe of ``microcnn.train.qat_fit``'s defaults); return it in eval mode."""
    torch.manual_seed(seed)
    start = images[np.random.default_rng(seed).permutation(len(images))[:256]]
    model = lsq_torch_model(torch, net, weight_bits, act_bits, start)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(0, len(images), batch_size):
            idx = order[b:b + batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--samples", type=int, default=2000, help="first N test images (default 2000)")
    p.add_argument("--calibration", type=int, default=100, help="calibration images per seed (default 100)")
    p.add_argument("--qat-images", type=int, default=None,
                   help="first N training images for QAT (default: 10,000 MNIST, 12,000 Fashion)")
    p.add_argument("--models", default="lenet,fashion", help="comma-separated (default lenet,fashion)")
    args = p.parse_args(argv)

    import onnxruntime as ort
    import torch

    from microcnn.compare import ort_quantize, torch_int8
    from microcnn.datasets import load_dataset
    from microcnn.fileutil import atomic_open, check_destination
    from microcnn.lenet import fashion_cnn, lenet
    from microcnn.quant import calibrate
    from microcnn.sweep import MODEL_DATASETS, parse_precision
    from microcnn.train import qat_fit

    check_destination(args.out, overwrite=args.force)
    torch.set_num_threads(1)
    rows = []

    def row(model, precision, system, seed, correct, n, model_bytes=None, **extra):
        rows.append(dict(model=model, precision=precision, system=system, seed=seed, errors=int(n - correct),
                         samples=int(n), accuracy=correct / n, model_bytes=model_bytes, **extra))
        print(f"{model:8s} {precision:5s} {system:40s} seed {seed}: {100 * correct / n:.2f} %", flush=True)

    for model in args.models.split(","):
        net = (lenet if model == "lenet" else fashion_cnn)(weights="bundled")
        train_x, train_y = load_dataset(MODEL_DATASETS[model], "train", download=False, progress=False)
        test_x, test_y = load_dataset(MODEL_DATASETS[model], "test", download=False, progress=False,
                                      samples=args.samples)
        n = len(test_y)
        for seed in SEEDS:
            cal = calibrate(net, train_x, samples=args.calibration, seed=seed, progress=False).images
            tq = torch_int8(net, cal, observer="histogram")
            with torch.inference_mode():
                pred = tq(torch.from_numpy(test_x)).argmax(1).numpy()
            row(model, "w8a8", "PyTorch torch.ao PTQ (x86, histogram)", seed, int((pred == test_y).sum()), n)
            for precision in PTQ_PRECISIONS:
                w, a = parse_precision(precision)
                blob = ort_quantize(net, cal, method="MinMax", weight_bits=w, act_bits=a)
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1
                if a == 4:  # extended optimizations move int4 tensors into MaxPool, which has no int4 kernel
                    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
                out = session.run(None, {session.get_inputs()[0].name: test_x})[0]
                row(model, precision, "ONNX Runtime QDQ PTQ (MinMax)", seed,
                    int((out.argmax(1) == test_y).sum()), n, len(blob))
        count = args.qat_images or (10_000 if model == "lenet" else 12_000)
        images, labels = train_x[:count], train_y[:count]
        epochs = QAT_EPOCHS[model]
        for precision in QAT_POINTS[model]:
            w, a = parse_precision(precision)
            recipe = dict(qat_images=len(images), epochs=epochs)
            t0 = time.perf_counter()
            tmodel = torch_qat(torch, net, images, labels, w, a, epochs)
            with torch.inference_mode():
                pred = tmodel(torch.from_numpy(test_x)).argmax(1).numpy()
            row(model, precision, "PyTorch LSQ QAT (fake-quant)", 0, int((pred == test_y).sum()), n,
                seconds=time.perf_counter() - t0, **recipe)
            t0 = time.perf_counter()
            qat, _ = qat_fit(copy.deepcopy(net), images, labels, w, a, epochs=epochs, progress=False)
            qnet = qat.quantized()
            row(model, precision, "microcnn LSQ QAT (integer model)", 0,
                int((qnet.predict_classes(test_x) == test_y).sum()), n, int(qnet.nbytes),
                seconds=time.perf_counter() - t0, **recipe)

    result = dict(
        command=" ".join(["python tools/frontier_references.py", *(argv or [])]),
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), samples=args.samples,
        calibration=args.calibration, seeds=list(SEEDS),
        environment=dict(processor=platform.processor() or platform.machine(), torch=torch.__version__,
                         onnxruntime=ort.__version__, python=platform.python_version()),
        rows=rows)
    check_destination(args.out, overwrite=args.force)
    with atomic_open(args.out, "w", overwrite=args.force) as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
