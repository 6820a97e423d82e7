"""Checks graph_rewrites.py's rewrites, and quantize.py's convolutions over explicit
patches, against onnxruntime (scripts/check-models, in scripts/test): one-node models of
Resize, MaxPool and QLinearConv on random tensors, of odd and even sizes and several
scales, kernels, strides and paddings, run before and after the rewrite in
onnxruntime's plain kernels; the outputs must be identical to the last bit, and a node
the rewrite must refuse must be left as it is. Exits non-zero on any difference."""
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from graph_rewrites import exact_bilinear_resizes, plain_outputs, stride_one_max_pools, tidy  # noqa: E402
from quantize import explicit_patches  # noqa: E402


def model(node, shape, inits=(), dtype=TensorProto.FLOAT):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, list(shape))],
                          [helper.make_tensor_value_info("y", dtype, None)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8  # what onnxruntime 1.17 reads
    return m


def run(m, x):
    return plain_outputs(m.SerializeToString(), {"x": x})[0]


def resize(shape, scale, **attrs):
    inits = [numpy_helper.from_array(np.array([], np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales")]
    attrs = {"mode": "linear", "coordinate_transformation_mode": "half_pixel", **attrs}
    return model(helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="resize", **attrs), shape, inits)


def qlinear_conv(shape, o, kernel, rng, **attrs):
    """A one-node int8 QLinearConv (int8 input and weights, as the int8 model's), its
    input zero point not zero (a padded tap must add nothing)."""
    c = shape[1] // attrs.get("group", 1)
    weight = rng.integers(-127, 128, (o, c, *kernel), dtype=np.int8)
    inits = [numpy_helper.from_array(np.array(v, t), name) for name, v, t in
             (("xs", 0.02, np.float32), ("xz", -14, np.int8), ("ws", 0.01, np.float32), ("wz", 0, np.int8),
              ("ys", 0.5, np.float32), ("yz", 3, np.int8))]
    inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.integers(-900, 900, o, dtype=np.int32), "b")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"], name="conv",
                            kernel_shape=list(kernel), **attrs)
    return model(node, shape, inits, TensorProto.INT8)


def main():
    rng = np.random.default_rng(7)
    failures, checked = [], 0

    def same(label, m, rewrite, shape, expect, int8=False):
        nonlocal checked
        x = (rng.integers(-128, 128, shape, dtype=np.int8) if int8
             else (rng.standard_normal(shape) * 20).astype(np.float32))
        before = run(m, x)
        count = rewrite(m)
        after = run(m, x)
        checked += 1
        if count != expect:
            failures.append(f"{label}: rewrote {count} nodes, expected {expect}")
        elif before.shape != after.shape or not np.array_equal(before, after):
            worst = (np.abs(before.astype(np.float64) - after).max()
                     if before.shape == after.shape else "shape")
            failures.append(f"{label}: outputs differ ({worst})")

    for shape, scale in (((1, 128, 13, 13), 2), ((1, 128, 26, 26), 2), ((1, 8, 52, 52), 0.5),
                         ((1, 8, 26, 26), 0.5), ((1, 3, 5, 7), 2), ((1, 4, 7, 9), 0.5),
                         ((1, 4, 6, 10), 3), ((1, 2, 10, 10), 0.7), ((1, 2, 9, 13), 1.7)):
        same(f"Resize {shape} x{scale}", resize(shape, scale), exact_bilinear_resizes, shape, 1)
    # Left alone: another mode, another coordinate transformation.
    same("Resize nearest", resize((1, 2, 6, 6), 2, mode="nearest"), exact_bilinear_resizes, (1, 2, 6, 6), 0)
    same("Resize align_corners", resize((1, 2, 6, 6), 2, coordinate_transformation_mode="align_corners"),
         exact_bilinear_resizes, (1, 2, 6, 6), 0)

    def pools(m):
        n = stride_one_max_pools(m.graph)
        tidy(m.graph)
        return n
    for shape, kernel, strides in (((1, 32, 105, 105), [3, 3], [2, 2]), ((1, 4, 16, 17), [2, 2], [2, 2]),
                                   ((1, 4, 15, 20), [3, 3], [3, 3]), ((1, 4, 12, 12), [3, 2], [1, 2])):
        node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=kernel, strides=strides)
        same(f"MaxPool {shape} k{kernel} s{strides}", model(node, shape), pools, shape, 1)
    # Left alone: its own padding, and a stride of 1 across already.
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    same("MaxPool padded", model(node, (1, 2, 9, 9)), pools, (1, 2, 9, 9), 0)
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 1])
    same("MaxPool stride 1 across", model(node, (1, 2, 9, 9)), pools, (1, 2, 9, 9), 0)

    def patches(m):
        # quantize.py's rewrites work on files.
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.onnx")
            onnx.save(m, path)
            n = explicit_patches(path)
            m.CopyFrom(onnx.load(path))
        return n

    for shape, o, kernel, strides, pads in (
            ((1, 4, 9, 11), 5, (3, 3), [1, 1], [1, 1, 1, 1]), ((1, 3, 7, 6), 4, (3, 3), [1, 1], [0, 0, 0, 0]),
            ((1, 2, 8, 9), 3, (5, 3), [1, 1], [2, 1, 2, 1]),
            ((1, 4, 9, 11), 5, (3, 3), [2, 2], [1, 1, 1, 1]), ((1, 3, 8, 8), 6, (3, 3), [2, 2], [1, 1, 1, 1]),
            ((1, 5, 7, 6), 4, (3, 3), [2, 2], [0, 0, 0, 0]), ((1, 4, 10, 9), 3, (3, 3), [2, 2], [1, 0, 0, 1]),
            ((1, 4, 8, 10), 3, (2, 2), [2, 2], [0, 0, 0, 0]), ((1, 3, 9, 7), 2, (1, 1), [2, 2], [0, 0, 0, 0]),
            ((1, 3, 20, 20), 8, (3, 3), [2, 2], [1, 1, 1, 1])):
        same(f"QLinearConv {shape} k{kernel} s{strides} p{pads}",
             qlinear_conv(shape, o, kernel, rng, strides=strides, pads=pads), patches, shape, 1, int8=True)
    # Left alone: a 1×1 at stride 1 (already a product over pixels), groups, dilation,
    # stride 3.
    for label, shape, kernel, attrs in (("1x1", (1, 4, 6, 6), (1, 1), {}),
                                        ("grouped", (1, 4, 6, 6), (3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
                                        ("dilated", (1, 4, 9, 9), (3, 3), {"dilations": [2, 2]}),
                                        ("stride 3", (1, 4, 9, 9), (3, 3), {"strides": [3, 3]}),
                                        # (an even kernel at stride 2 whose last column
                                        # would need the input cut, not padded)
                                        ("stride 2, 2x2 past the phases", (1, 4, 8, 9), (2, 2), {"strides": [2, 2]})):
        same(f"QLinearConv {label}", qlinear_conv(shape, 4, kernel, rng, **attrs), patches, shape, 0, int8=True)

    for f in failures:
        print(f"check_rewrites: FAIL: {f}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"check_rewrites: ok ({checked} one-node models, identical outputs in onnxruntime's plain kernels)")


if __name__ == "__main__":
    main()
