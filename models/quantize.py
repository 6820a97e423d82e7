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
into tract's requantisation: 2x slower). Then exact rewrites (the outputs identical in
onnxruntime, checked here): tensors stay int8 across concatenations, LeakyReLU (tract's
lookup tables) and the max-pool, and the 3x3 convolutions become 1x1 ones over patches
gathered with Pad/Slice/Concat (tract's own int8 patch gathering is slow; at stride 2 by
way of the input's four phases); the rest stays float behind
QuantizeLinear/DequantizeLinear.
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
from graph_rewrites import (BILINEAR, STRIDE_COLUMNS, constants, consumers, int64_const,  # noqa: E402
                            tidy_and_save)
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
    tidy_and_save(m, path)
    return concats, chains


def int8_max_pool(path):
    """Pad(-inf) → MaxPool → QuantizeLinear becomes QuantizeLinear → Pad(-128) → MaxPool
    on int8: exact, as rounding to the nearest step and clamping keep the order of values
    (the quantised maximum is the maximum of the quantised values; -inf quantises to
    -128). tract then folds the DequantizeLinear → LeakyRelu → QuantizeLinear in front
    into a lookup table, and no float pass is left around the max-pool. The pool may be
    followed by the Slice that keeps every second column (graph_rewrites.py's
    stride_one_max_pools, which the fp32 model carries): the QuantizeLinear then comes
    after that. Returns how many were rewritten."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(path)
    g = m.graph
    prod, users, values = {o: n for n in g.node for o in n.output}, consumers(g), constants(g)
    count = 0
    for mp in [n for n in g.node if n.op_type == "MaxPool" and len(n.output) == 1]:
        us, pad = users.get(mp.output[0], []), prod.get(mp.input[0])
        tail = mp  # the pool, or the column Slice after it
        if len(us) == 1 and us[0].op_type == "Slice" and us[0].name.endswith(STRIDE_COLUMNS):
            tail, us = us[0], users.get(us[0].output[0], [])
        # Only a pad of -inf (TF's max-pool padding): another value would not quantise
        # to -128.
        if (len(us) != 1 or us[0].op_type != "QuantizeLinear" or pad is None or pad.op_type != "Pad"
                or len(pad.input) < 3 or len(users[pad.output[0]]) != 1
                or any(a.name == "mode" and a.s != b"constant" for a in pad.attribute)
                or pad.input[2] not in values or not np.all(values[pad.input[2]] == -np.inf)):
            continue
        q = us[0]
        # One positive scale and an int8 zero point (a per-axis or negative scale would not
        # keep the order of values the same way on every element).
        if (len(q.input) < 3 or q.input[1] not in values or q.input[2] not in values
                or values[q.input[1]].size != 1 or not float(values[q.input[1]]) > 0
                or values[q.input[2]].dtype != np.int8):
            continue
        name = f"{mp.name}_in_q"
        g.node.append(helper.make_node("QuantizeLinear", [pad.input[0], q.input[1], q.input[2]], [name], name=name))
        low = f"{mp.name}_int8_low"
        g.initializer.append(numpy_helper.from_array(np.array(-128, np.int8), low))
        pad.input[0], pad.input[2] = name, low
        g.node.remove(q)
        tail.output[0] = q.output[0]
        count += 1
    tidy_and_save(m, path)
    return count


def conv_over_taps(g, n, taps, length, grid):
    """The nodes that end a convolution over explicit patches: the taps (each [1, C,
    length], in kernel row-major order) concatenated on the channel axis, a 1×1
    QLinearConv over them with the weights reordered to match (tap-major), and the
    output, computed on rows of `width` pixels, cut to `cols`: grid = (rows, width,
    cols)."""
    from onnx import helper, numpy_helper
    rows, width, cols_kept = grid
    name, w = n.name, n.input[3]
    weight = numpy_helper.to_array(next(i for i in g.initializer if i.name == w))
    o, c, kh, kw = weight.shape
    w1 = f"{w}_taps"
    g.initializer.append(numpy_helper.from_array(
        np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(o, kh * kw * c, 1, 1)), w1))
    patches, cols, y, wide = f"{name}_patches", f"{name}_cols", f"{name}_wide", f"{name}_grid"
    _, xs, xz, _, ws, wz, ys, yz = n.input[:8]
    return [
        helper.make_node("Concat", taps, [patches], name=patches, axis=1),
        helper.make_node("Reshape", [patches, int64_const(g, f"{cols}_shape", [1, kh * kw * c, length, 1])],
                         [cols], name=cols),
        helper.make_node("QLinearConv", [cols, xs, xz, w1, ws, wz, ys, yz] + list(n.input[8:]), [y],
                         name=name, kernel_shape=[1, 1]),
        helper.make_node("Reshape", [y, int64_const(g, f"{wide}_shape", [1, o, rows, width])], [wide], name=wide),
        helper.make_node("Slice", [wide, int64_const(g, f"{name}_crop_starts", [0]),
                                   int64_const(g, f"{name}_crop_ends", [cols_kept]),
                                   int64_const(g, f"{name}_crop_axes", [3])], list(n.output), name=f"{name}_crop"),
    ]


def explicit_patches(path):
    """Each QLinearConv with a kernel larger than 1×1 at stride 1, and each at stride 2,
    becomes a 1×1 QLinearConv over its patches, gathered with plain ops: the input padded
    with its zero point (so a padded tap adds nothing, as in the convolution's own
    padding), one 1-D slice of flattened rows per kernel tap (the output is computed on
    the slices' row width and the extra columns cut off after), concatenated on the
    channel axis; the weights reordered to match (tap-major). At stride 2 the slices are
    taken from the padded input's four phases (stride_two_taps()). The integer sums are
    the same, so the outputs are identical. Why: tract gathers a convolution's int8
    patches element by element into its kernel's layout (its Im2col, about 15
    instructions per byte on the Cortex-A76, half the int8 model's time), while a 1×1
    convolution's input is packed as a plain matrix, and the slices and concatenation
    are block copies. Returns how many were rewritten."""
    import onnx
    from onnx import helper, shape_inference
    m = shape_inference.infer_shapes(onnx.load(path))
    g = m.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    weights = {i.name: list(i.dims) for i in g.initializer}
    out, count = [], 0
    for n in g.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        # The kernel's size from the weights (the attribute is optional in ONNX); none
        # for other ops and for weights that are not constants, which are kept.
        kernel = weights.get(n.input[3], [])[2:] if n.op_type == "QLinearConv" else []
        stride = a.get("strides", [1, 1])
        taps = None
        if (len(kernel) == 2 and a.get("group", 1) == 1 and a.get("dilations", [1, 1]) == [1, 1]
                and a.get("auto_pad", b"NOTSET") in (b"", b"NOTSET")
                and len(shapes.get(n.input[0], [])) == 4 and 0 not in shapes[n.input[0]]):
            pads = a.get("pads", [0, 0, 0, 0])
            if stride == [1, 1] and kernel != [1, 1]:
                taps = stride_one_taps(g, n, shapes[n.input[0]], kernel, pads)
            elif stride == [2, 2]:
                taps = stride_two_taps(g, n, shapes[n.input[0]], kernel, pads)
        if taps is None:
            out.append(n)
            continue
        nodes, tap_names, length, grid = taps
        out += nodes + conv_over_taps(g, n, tap_names, length, grid)
        count += 1
    del g.node[:]
    g.node.extend(out)
    tidy_and_save(m, path)
    return count


def stride_one_taps(g, n, shape, kernel, pads):
    """A stride-1 convolution's taps: its input padded (one more row at the bottom, as
    the last tap's slice runs kw - 1 elements past the padded rows) and flattened, one
    slice per tap. Returns (nodes, taps, tap length, output grid) for conv_over_taps()."""
    from onnx import helper
    (kh, kw), (top, left, bottom, right), (_, c, h, wd) = kernel, pads, shape
    ho, wo, wp = h + top + bottom - kh + 1, wd + left + right - kw + 1, wd + left + right
    name = n.name
    padded, rows = f"{name}_padded", f"{name}_rows"
    nodes = [helper.make_node("Pad", [n.input[0], int64_const(g, f"{padded}_pads", [0, 0, top, left, 0, 0, bottom + 1, right]),
                                      n.input[2]], [padded], name=padded, mode="constant"),
             helper.make_node("Reshape", [padded, int64_const(g, f"{rows}_shape", [1, c, (h + top + bottom + 1) * wp])],
                              [rows], name=rows)]
    taps, length = [], ho * wp
    for ky in range(kh):
        for kx in range(kw):
            nodes.append(tap_slice(g, f"{name}_tap{ky}{kx}", rows, ky * wp + kx, length))
            taps.append(nodes[-1].output[0])
    return nodes, taps, length, (ho, wp, wo)


def stride_two_taps(g, n, shape, kernel, pads):
    """A stride-2 convolution's taps, by way of its padded input's four phases (even or
    odd rows × even or odd columns): tap (ky, kx) of output (i, j) reads padded row
    2i + ky, column 2j + kx, which is row i + ky // 2, column j + kx // 2 of phase
    (ky % 2, kx % 2), so within a phase each tap is a plain 1-D slice of the flattened
    rows. The columns are split by two strided slices (one pass over the input), the
    rows by a reshape that pairs them and two plain slices. The output is computed on a
    phase's width, wh (its extra columns cut off after), and each phase has a row more
    than the taps reach, as the last taps' slices run (kw - 1) // 2 elements past their
    rows. Returns what stride_one_taps() does, or None where the convolution's own
    padding reaches past the phases."""
    from onnx import helper
    (kh, kw), (top, left, bottom, right), (_, c, h, wd) = kernel, pads, shape
    ho, wo = (h + top + bottom - kh) // 2 + 1, (wd + left + right - kw) // 2 + 1
    wh, hh = wo + (kw - 1) // 2, ho + (kh - 1) // 2 + 1
    full = [0, 0, top, left, 0, 0, 2 * hh - h - top, 2 * wh - wd - left]
    if min(full) < 0:
        return None
    name = n.name
    padded = f"{name}_padded"
    nodes = [helper.make_node("Pad", [n.input[0], int64_const(g, f"{padded}_pads", full), n.input[2]],
                              [padded], name=padded, mode="constant")]
    phases = {}
    for b in range(2):
        cols, pairs = f"{name}_cols{b}", f"{name}_pairs{b}"
        nodes.append(helper.make_node("Slice", [padded, int64_const(g, f"{cols}_starts", [b]),
                                                int64_const(g, f"{cols}_ends", [2 * wh]),
                                                int64_const(g, f"{cols}_axes", [3]),
                                                int64_const(g, f"{cols}_steps", [2])], [cols], name=cols))
        nodes.append(helper.make_node("Reshape", [cols, int64_const(g, f"{pairs}_shape", [1, c, hh, 2 * wh])],
                                      [pairs], name=pairs))
        for r in range(2):
            ph, flat = f"{name}_phase{r}{b}", f"{name}_phase{r}{b}_rows"
            nodes.append(helper.make_node("Slice", [pairs, int64_const(g, f"{ph}_starts", [r * wh]),
                                                    int64_const(g, f"{ph}_ends", [(r + 1) * wh]),
                                                    int64_const(g, f"{ph}_axes", [3])], [ph], name=ph))
            nodes.append(helper.make_node("Reshape", [ph, int64_const(g, f"{flat}_shape", [1, c, hh * wh])],
                                          [flat], name=flat))
            phases[r, b] = flat
    taps, length = [], ho * wh
    for ky in range(kh):
        for kx in range(kw):
            nodes.append(tap_slice(g, f"{name}_tap{ky}{kx}", phases[ky % 2, kx % 2], (ky // 2) * wh + kx // 2, length))
            taps.append(nodes[-1].output[0])
    return nodes, taps, length, (ho, wh, wo)


def tap_slice(g, tap, rows, start, length):
    """One tap: `length` elements of the flattened rows from `start`."""
    from onnx import helper
    return helper.make_node("Slice", [rows, int64_const(g, f"{tap}_starts", [start]),
                                      int64_const(g, f"{tap}_ends", [start + length]),
                                      int64_const(g, f"{tap}_axes", [2])], [tap], name=tap)


def same_outputs(a, b, photo_dir):
    """The largest difference between two models' outputs on the calibration photos (each
    photo as it is, not its variants)."""
    import onnxruntime as ort
    sa, sb = ort.InferenceSession(a), ort.InferenceSession(b)
    worst = 0.0
    for feed in list(Photos(photo_dir).items)[::5]:
        for x, y in zip(sa.run(None, feed), sb.run(None, feed)):
            if not np.array_equal(x, y):
                # (A NaN anywhere counts as infinitely different: max() would skip it.)
                d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                worst = max(worst, float("inf") if np.isnan(d).any() else float(d.max()))
    return worst


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
    # The bilinear resizes' gathers, products and sums (graph_rewrites.py) stay float in
    # the QDQ form too, as tract and onnxruntime run them in the QLinearConv form.
    import onnx
    exclude += [n.name for n in onnx.load(pre).graph.node if BILINEAR in n.name]
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
            pools = int8_max_pool(out)
            patched = explicit_patches(out)
            worst = same_outputs(plain, out, args[0])
        finally:
            os.remove(plain)
        print(f"int8 between convolutions: {concats} concatenations, {chains} LeakyReLU chains, "
              f"{pools} max-pool; {patched} convolutions over explicit patches; "
              f"largest output change {worst}", file=sys.stderr)
        if worst != 0.0:
            sys.exit("the int8 rewrites changed the model's outputs")
    digest = hashlib.sha256(open(out, "rb").read()).hexdigest()
    print(f"{digest}  {os.path.basename(out)}  ({os.path.getsize(out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
