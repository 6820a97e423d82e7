"""Writes models/nanodet-int8.onnx: static int8 quantisation of nanodet.onnx in QDQ form
(QuantizeLinear/DequantizeLinear pairs around standard ops, which tract reads; tract
rejects the QOperator/com.microsoft ops), weights per channel, activations calibrated on
the demo photos (public-domain and BSD-licensed photos that scikit-image and OpenCV ship,
fetched by scripts/fetch-demo-photos) with flips, crops and exposure changes. Never
calibrated on ../shared: the result is committed.

    python models/quantize.py PHOTO_DIR        (tools pinned in requirements.txt)

Prints the sha256 of the result; nanodet-int8.onnx.sha256 pins it.

    python models/quantize.py PHOTO_DIR --qlinearconv [OUT.onnx]

writes models/nanodet-int8-qlinear.onnx (pinned by its .sha256; the int8 model the boards
with a dot product run, as NNEF, see MODEL_CARD.md), the form tract runs on its integer
kernels: the zero Pads folded into the convolutions that follow them, then QLinearConv
(standard ONNX, QOperator) for the convolutions only, int8 activations and weights (tract
wants the two of one type), one weight scale per tensor (a per-channel scale is not fused
into tract's requantisation: 2x slower). Between the convolutions two exact rewrites
(checked here against onnxruntime) keep tensors int8 across concatenations and LeakyReLU
(tract's lookup tables); the rest stays float behind QuantizeLinear/DequantizeLinear.
"""
import hashlib
import os
import shutil
import sys

import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import MODEL, preprocess  # noqa: E402  (the same pre-processing)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "nanodet-int8.onnx")
QLINEAR_OUT = os.path.join(HERE, "nanodet-int8-qlinear.onnx")
PHOTOS = ["astronaut.png", "basketball1.png", "camera.png", "left.jpg", "left06.jpg", "zz-covered-lens.png"]


def variants(rgb):
    """The photo, mirrored, a centre crop and two exposures: more of what a desk camera
    sees from six photos (activation ranges, not labels, are what calibration needs)."""
    h, w, _ = rgb.shape
    yield rgb
    yield rgb[:, ::-1]
    yield rgb[h // 8: h - h // 8, w // 8: w - w // 8]
    for gain in (0.6, 1.4):
        yield np.clip(rgb.astype(np.float32) * gain, 0, 255).astype(np.uint8)


class Photos(CalibrationDataReader):
    def __init__(self, photo_dir):
        tensors = []
        for name in PHOTOS:
            rgb = np.asarray(Image.open(os.path.join(photo_dir, name)).convert("RGB"))
            tensors += [preprocess(np.ascontiguousarray(v))[0] for v in variants(rgb)]
        self.items = iter([{"input": t} for t in tensors])
        print(f"calibration: {len(tensors)} inputs from {len(PHOTOS)} photos", file=sys.stderr)

    def get_next(self):
        return next(self.items, None)


def constants(graph):
    """The graph's constant values by name: its initializers and Constant nodes."""
    from onnx import numpy_helper
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    return values


def consumers(graph):
    """The nodes that read each value, by the value's name."""
    users = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def infinite_pads(path):
    """Pad nodes whose constant value is infinite: TF's MaxPool padding (-inf) before
    the backbone's max-pool. An infinite range has no int8 scale; they stay float."""
    import onnx
    m = onnx.load(path)
    values = constants(m.graph)
    return [n.name for n in m.graph.node if n.op_type == "Pad" and len(n.input) > 2
            and n.input[2] in values and not np.all(np.isfinite(values[n.input[2]]))]


def fold_zero_pads(src, dst):
    """Folds each constant-zero Pad that only feeds a Conv's input into that Conv's pads
    (TF's explicit padding): a Pad between two convolutions would otherwise keep a
    QuantizeLinear between them. Returns how many were folded."""
    import onnx
    from onnx import helper
    m = onnx.load(src)
    g = m.graph
    consts = constants(g)
    users = consumers(g)
    folded = set()
    for n in g.node:
        if n.op_type != "Pad" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        if any(a.name == "mode" and a.s != b"constant" for a in n.attribute):
            continue
        value = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(1)
        pads = consts[n.input[1]].astype(np.int64).tolist()
        us = users.get(n.output[0], [])
        if (value is None or float(np.asarray(value).reshape(-1)[0]) != 0.0 or len(pads) != 8
                or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0
                or len(us) != 1 or us[0].op_type != "Conv" or us[0].input[0] != n.output[0]):
            continue
        conv = us[0]
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        old = [a for a in conv.attribute if a.name == "pads"]
        cp = list(old[0].ints) if old else [0, 0, 0, 0]
        for a in old:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute(
            "pads", [cp[0] + pads[2], cp[1] + pads[3], cp[2] + pads[6], cp[3] + pads[7]]))
        conv.input[0] = n.input[0]
        folded.add(id(n))
    kept = [n for n in g.node if id(n) not in folded]
    del g.node[:]
    g.node.extend(kept)
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return len(folded)


def int8_between_convs(path):
    """Exact rewrites (the same numbers, checked by the caller) that keep tensors int8
    between the QLinearConvs, so tract does not round-trip them through float:
    - Concat → QuantizeLinear becomes QuantizeLinear on each input → Concat (of int8);
    - each QuantizeLinear fed by DequantizeLinear → LeakyRelu gets a copy of that chain
      of its own, which tract folds into one 256-entry int8 lookup table (it folds only
      chains whose nodes each have one consumer).
    Returns (concats, chains) rewritten."""
    import copy
    import onnx
    from onnx import helper
    m = onnx.load(path)
    g = m.graph
    outputs = {o.name for o in g.output}

    users = consumers(g)
    concats = 0
    for c in [n for n in g.node if n.op_type == "Concat" and n.output[0] not in outputs]:
        us = users.get(c.output[0], [])
        if len(us) != 1 or us[0].op_type != "QuantizeLinear":
            continue
        q = us[0]
        for k, inp in enumerate(list(c.input)):
            name = f"{c.name}_in{k}_q"
            g.node.append(helper.make_node("QuantizeLinear", [inp, q.input[1], q.input[2]], [name], name=name))
            c.input[k] = name
        c.output[0] = q.output[0]
        g.node.remove(q)
        concats += 1
    prod, users = {o: n for n in g.node for o in n.output}, consumers(g)
    chains = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear"]:
        lrelu = prod.get(q.input[0])
        dq = prod.get(lrelu.input[0]) if lrelu is not None and lrelu.op_type == "LeakyRelu" else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        if len(users[lrelu.output[0]]) == 1 and len(users[dq.output[0]]) == 1:
            continue
        dq2, lrelu2 = copy.deepcopy(dq), copy.deepcopy(lrelu)
        dq2.name = dq2.output[0] = f"{q.name}_dq"
        lrelu2.name = lrelu2.output[0] = f"{q.name}_lrelu"
        lrelu2.input[0] = dq2.name
        q.input[0] = lrelu2.name
        g.node.extend([dq2, lrelu2])
        chains += 1
    # What nothing uses any more goes; the rest in an order where inputs come first.
    while True:
        users = consumers(g)
        dead = [n for n in g.node if all(o not in users and o not in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ordered, waiting = [], list(g.node)
    while waiting:
        ready = [n for n in waiting if all(i in known for i in n.input)]
        if not ready:
            raise SystemExit("int8_between_convs: the graph has a cycle")
        for n in ready:
            known.update(n.output)
        ordered += ready
        waiting = [n for n in waiting if n not in ready]
    del g.node[:]
    g.node.extend(ordered)
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return concats, chains


def same_outputs(a, b, photo_dir):
    """The largest difference between two models' outputs on the first calibration input."""
    import onnxruntime as ort
    feed = next(iter(Photos(photo_dir).items))
    ra = ort.InferenceSession(a).run(None, feed)
    rb = ort.InferenceSession(b).run(None, feed)
    return max(float(np.abs(x - y).max()) for x, y in zip(ra, rb))


def main():
    args = sys.argv[1:]
    qlinear = None
    if len(args) in (2, 3) and args[1] == "--qlinearconv":
        qlinear = args[2] if len(args) == 3 else QLINEAR_OUT
    elif len(args) != 1:
        sys.exit(__doc__)
    out = qlinear or OUT
    pre = out + ".pre.onnx"
    src = MODEL
    if qlinear:
        src = out + ".nopad.onnx"
        print(f"zero pads folded into convolutions: {fold_zero_pads(MODEL, src)}", file=sys.stderr)
    # Shape inference and graph clean-up first, as onnxruntime recommends for QDQ.
    try:
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    finally:
        if qlinear:
            os.remove(src)
    exclude = infinite_pads(pre)
    print(f"kept in float: {exclude} and the max-pool after it", file=sys.stderr)
    try:
        # The QLinearConv form: int8 both sides, one scale per tensor, convolutions only.
        form = (dict(quant_format=QuantFormat.QOperator, per_channel=False,
                     activation_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
                if qlinear else
                dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv", "LeakyRelu", "Add", "Concat", "Resize", "Sigmoid",
                                           "Pad", "MaxPool"]))
        quantize_static(pre, out, Photos(args[0]), weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude, **form)
    finally:
        os.remove(pre)
    if qlinear:
        plain = out + ".plain.onnx"
        shutil.copy(out, plain)
        try:
            concats, chains = int8_between_convs(out)
            worst = same_outputs(plain, out, args[0])
        finally:
            os.remove(plain)
        print(f"int8 between convolutions: {concats} concatenations, {chains} LeakyReLU chains; "
              f"largest output change {worst}", file=sys.stderr)
        if worst != 0.0:
            sys.exit("the int8 rewrites changed the model's outputs")
    digest = hashlib.sha256(open(out, "rb").read()).hexdigest()
    print(f"{digest}  {os.path.basename(out)}  ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
