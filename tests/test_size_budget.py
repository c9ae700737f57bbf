"""A size budget for the package, in the manner of tinygrad's line-count check.

The point of microcnn is an engine small enough to read in an afternoon; the risk is the tooling
around it (benchmarks, comparisons, plots, widgets, the command line) growing until it is most of what
a reader meets. So each layer has a budget of non-blank, non-comment source lines (docstrings count:
they are read too), and the tools may not outgrow a fixed fraction of the engine.

Counts when the budgets were set (December 2026): engine 5,163 (kernels 1,834 + engine modules 3,329),
quant 1,796, tools 2,381 (0.46 of the engine). The budgets leave about 12-15 % headroom. Raising one is
a decision to make in review, with the reason in the commit, not a number to bump when the test fails.

Raised once (December 2026, review of the merged issue 14/16/17 work): tools 2,700 -> 3,300, for the
offline report (issue 16: index, MathML formulas, widget previews, +420 lines) and the Dask sweep
(issue 14, +190 lines); the ratio of 0.55 tools per engine line stays and binds first (~3,100 today).

Raised again (issue 17, types17): engine 5,900 -> 6,700, for PyTorch-style docstrings with doctested
examples on the public API (optimizers, schedules, losses, datasets, fit, lenet, errors: about +480
lines, docstrings count) and the checked Python entry points of the raw-pointer GEMM kernels (+150).
Engine 6,270 after that change; the tools ratio (0.55) is unchanged.
Raised (December 2026, issue 13 layers): engine 5,900 -> 6,600 for the layers a researcher's CNN
needs (BatchNorm train/eval and folding, grouped and dilated convolution in the forward, fused and
backward kernels, pooling with padding and ceil mode, ReLU6/LeakyReLU/Tanh/Dropout/global pooling:
+613 lines, engine 5,639 -> 6,252).
Raised again (issue 14, post-training side): quant 2,050 -> 2,450 for AdaRound (quant/adaround.py, the
rounding registry), cross-layer equalization (quant/cle.py) and weights of any width 2..8, symmetric
or asymmetric (+~230 lines, quant at 2,273).

Raised (issue 14, qat14): quant 2,050 -> 2,300 for quantization-aware training (quant/qat.py: LSQ fake
quantization on the tape, the QAT network, conversion to integer stages, distillation: about +190 lines).
"""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "microcnn"

# Every module of the package belongs to exactly one layer (kernels/ and quant/ by their folder).
# (The import layers of tests/test_architecture.py are finer; resolve and timing count as engine here.)
ENGINE = {"__init__", "autograd", "checks", "convolution", "datasets", "errors", "fileutil", "io",
          "jsonutil", "layers", "lenet", "losses", "model", "graph", "network", "onnx_io", "optim",
          "resolve", "timing", "torch_io", "train"}
TOOLS = {"analysis", "bench", "cli", "cliargs", "compare", "plots", "report", "sweep", "widgets"}

# engine +500 (issue 13): the model interface (model.py) and graphs (graph.py: Add, Concat,
# Graph with its checks, plans and files), about +500 lines; tools stay bound by the 0.55 ratio.
# engine +800 (issue 13, onnx13): ONNX import/export and the PyTorch converter (onnx_io, torch_io:
# +750 lines; the exporter and converter moved out of compare, -110 tools lines).
# quant 2,450 + 250 (docstring) + 100 for quant/explain.py (the notebooks' worked requantization
# example, issue 16).
# engine +450 (issue 15, +414 lines): the u8 x s8 integer micro-kernels in three instruction
# forms (VNNI, pmaddwd, portable IR; kernels/qdot.py), the small-batch dense kernel, weight repacking,
# and the integer ops of the compiled program -- what makes quantized inference faster than FP32.
# quant +500 (issue 13, gq13, +430 lines): quantized graphs (QuantizedGraph and its builder, integer
# Add/Concat stages, their file format), BatchNorm folded inside quantize, grouped convolutions.
# tools +100 (issue 14, ort14): compare.quantized_accuracy and `compare --quantized-accuracy`, accuracy
# against PyTorch and ONNX Runtime at every quantized point they offer (+95 lines).
# engine +150 (issue 15, speed15, +181 lines): the vector requantize(+2x2 max pool) epilogue and the
# horizontal words of the integer convolution -- INT8 batched from ~0.8x to ~0.5x of FP32's time.
# engine +250 (issue 13, batched FP32 speed): the channel-blocked convolution micro-kernel with its
# in-register transpose (kernels/conv_blocked.py, +222) and the global average pooling fast path.
# engine +100 (issue 15, threads15, +45 lines net): kernels/threads.py, the batch cut into one slice per
# thread once per model call (the integer kernels' per-layer thread pool and pinned_threads moved into
# it) -- two threads from 1.3-1.6x to 1.8-1.9x one thread on LeNet.
# engine +150 (issues 13 and 15, workspace13, +127 lines): network.Workspace, the arrays batched
# inference writes its large convolution outputs into from call to call (each call page-faulted
# megabytes of fresh arrays: the trained residual CNN at batch 256 from 60 to 42 ms); compiled programs
# over folded BatchNorm pairs and global average pooling (the quantized BatchNorm CNN's batch-1 from
# 228 to 65 us); im2col's GEMM path as a function of its own; microcnn.load of .onnx files; the integer
# convolution's padded copy by whole vectors (an LLVM intrinsic) and stride-2 words of 4 channels split
# into the stride's phases (each pixel word copied once instead of once per tap).
# engine +150 (issues 13 and 15, intel13, +100 lines): two-block calls of the blocked FP32 convolution
# (32- and 64-channel layers 19-33 % faster on a core with two FMA units), the vector dequantizing
# epilogue of the integer convolution (qdot.dequant_row: a layer feeding global average pooling from 23
# to 11 ms per 1,000 images), Sequential.logits through the fused groups, the program's slot ops.
# quant +100 (issue 15, intel13, +91 lines): QuantizedGraph's compiled program (tensors that wait for a
# later step kept in slots, QAdd as a program op): the residual network's INT8 batch-1 226 -> 106 us.
# engine +50 (issue 15, amd15, +50 lines): the integer convolution's words built by a vector intrinsic
# straight from the padded rows (qdot.pack_words16 / phase_words16: a stride-2 layer's phase words had
# cost a Numba loop 1.75 ns a word on an AMD EPYC) and the micro-kernel's biases broadcast in registers
# (the BatchNorm CNN's INT8 from 47 to 37 ms per 1,000 images), and the choice of the FP32 two-block
# calls by core (simd.host_block_pairs: 15-20 % slower on AMD Zen 4, whose 512-bit FMAs are split in two).
# engine +25, tools +10 (issue 15, machine15, +15 and +5 lines): timing.machine_loop, the compute-only
# loop whose two-thread scaling the threads table prints beside each model's (this virtual machine's
# cores ran vector code 1.0-2.0x faster on two threads than on one within minutes).
BUDGET = {"engine": 10025, "quant": 3400, "tools": 3410}  # engine: 5,900 + the twelve raises above
MAX_TOOLS_PER_ENGINE_LINE = 0.55


def source_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] == "kernels":
        return "engine"
    if rel.parts[0] == "quant":
        return "quant"
    assert len(rel.parts) == 1, f"{rel}: a new subpackage; give it a layer in {Path(__file__).name}"
    layer = "engine" if path.stem in ENGINE else "tools" if path.stem in TOOLS else None
    assert layer, f"microcnn/{rel}: a new module; add it to ENGINE or TOOLS in {Path(__file__).name}"
    return layer


def layer_sizes() -> dict:
    sizes = dict.fromkeys(BUDGET, 0)
    for path in PACKAGE.rglob("*.py"):
        sizes[layer_of(path)] += source_lines(path)
    return sizes


def test_source_lines_counts_code_and_docstrings_but_not_blanks_or_comments(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Doc."""\n\n# a comment\n    # indented comment\nx = 1  # trailing\n\n\ndef g():\n'
                 '    return x\n', encoding="utf-8")
    assert source_lines(f) == 4


def test_every_listed_module_exists():
    stems = {p.stem for p in PACKAGE.glob("*.py")}
    assert ENGINE | TOOLS <= stems, f"listed but gone: {sorted((ENGINE | TOOLS) - stems)}"
    assert not ENGINE & TOOLS


def test_each_layer_stays_within_its_budget():
    sizes = layer_sizes()
    over = {layer: f"{n} > {BUDGET[layer]}" for layer, n in sizes.items() if n > BUDGET[layer]}
    assert not over, f"source lines over budget: {over} (all layers: {sizes})"


def test_tools_do_not_outgrow_the_engine():
    sizes = layer_sizes()
    ratio = sizes["tools"] / sizes["engine"]
    assert ratio <= MAX_TOOLS_PER_ENGINE_LINE, (
        f"tools have {sizes['tools']} source lines, {ratio:.2f} per engine line "
        f"(at most {MAX_TOOLS_PER_ENGINE_LINE}); engine {sizes['engine']}")
