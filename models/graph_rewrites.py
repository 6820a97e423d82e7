"""Graph helpers shared by the model scripts (finish_onnx.py, quantize.py,
check_rewrites.py), and the two exact rewrites both the fp32 and the int8 models carry:
bilinear Resize as gathers and elementwise ops, and the max-pool at stride 1 across."""
import numpy as np


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


def int64_const(g, name, values):
    """Adds an int64 initializer (the shapes, pads, indices and slice bounds the rewrites
    wire in); returns its name."""
    from onnx import numpy_helper
    g.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def tidy(g, what="the graph"):
    """Drops the nodes and initializers nothing uses any more and puts the rest in an
    order where inputs come first."""
    outputs = {o.name for o in g.output}
    while True:
        users = consumers(g)
        dead = [n for n in g.node if all(o not in users and o not in outputs for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = set(consumers(g))
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    known = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    ordered, waiting = [], list(g.node)
    while waiting:
        ready = [n for n in waiting if all(i in known for i in n.input)]
        if not ready:
            raise SystemExit(f"{what}: the graph has a cycle")
        for n in ready:
            known.update(n.output)
        ordered += ready
        waiting = [n for n in waiting if n not in ready]
    del g.node[:]
    g.node.extend(ordered)
    del g.value_info[:]


def tidy_and_save(m, path):
    """tidy(), then checks the model and writes it."""
    import onnx
    tidy(m.graph, path)
    onnx.checker.check_model(m)
    onnx.save(m, path)


def plain_outputs(model_bytes, feed):
    """A serialised model's outputs in onnxruntime's plain kernels, without its graph
    optimisations (its optimised Resize is another kernel): what the rewrites must
    reproduce to the last bit."""
    import onnxruntime as ort
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, plain, providers=["CPUExecutionProvider"]).run(None, feed)


def bilinear_taps(n_in, n_out, scale):
    """onnxruntime's set-up of a linear resize along one axis with half_pixel
    coordinates, in its float32 arithmetic: for each output index the two source indices
    and their weights (the source coordinate clamped to the input; at the last index,
    where both sources are the same, 0.5 each)."""
    f = np.float32
    first, second, w_first, w_second = [], [], [], []
    for o in range(n_out):
        x = (f(o) + f(0.5)) / f(scale) - f(0.5)
        x = min(max(x, f(0)), f(n_in - 1))
        a = min(int(x), n_in - 1)
        b = min(a + 1, n_in - 1)
        da, db = abs(x - f(a)), abs(x - f(b))
        if a == b:
            da = db = f(0.5)
        first.append(a)
        second.append(b)
        w_first.append(db)  # the nearer source weighs more: a's weight is b's distance
        w_second.append(da)
    return (np.array(first, np.int64), np.array(second, np.int64),
            np.array(w_first, np.float32), np.array(w_second, np.float32))


BILINEAR = "_bilinear_"  # in the names of the nodes the rewrite adds
STRIDE_COLUMNS = "_columns"  # ends the name of the Slice stride_one_max_pools adds


def stride_one_max_pools(g):
    """Each 2-D MaxPool with a column stride above 1 (and no padding, dilation or ceil
    mode of its own) pools at stride 1 across, then keeps every stride-th column (a
    Slice with a step): the same windows, so the same values. Why: tract's pool
    vectorises along a row only at stride 1; at stride 2 it compares element by element
    (the network's one max-pool: 35 M instructions on the Cortex-A76 in int8, 23 M more
    than this form in fp32). Returns how many were rewritten."""
    from onnx import helper
    out, count = [], 0
    for n in g.node:
        out.append(n)
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        strides = a.get("strides", [1, 1])
        if (n.op_type != "MaxPool" or len(n.output) != 1 or len(strides) != 2 or strides[1] == 1
                or a.get("pads", [0, 0, 0, 0]) != [0, 0, 0, 0] or a.get("dilations", [1, 1]) != [1, 1]
                or a.get("auto_pad", b"NOTSET") not in (b"", b"NOTSET") or a.get("ceil_mode", 0) != 0
                or a.get("storage_order", 0) != 0):
            continue
        n.attribute.remove(next(x for x in n.attribute if x.name == "strides"))
        n.attribute.append(helper.make_attribute("strides", [strides[0], 1]))
        pooled, wide = n.output[0], f"{n.name}_wide"
        n.output[0] = wide
        cols = f"{n.name}{STRIDE_COLUMNS}"
        bounds = [int64_const(g, f"{cols}_{key}", ints) for key, ints in
                  (("starts", [0]), ("ends", [np.iinfo(np.int64).max]), ("axes", [3]), ("steps", [strides[1]]))]
        out.append(helper.make_node("Slice", [wide] + bounds, [pooled], name=cols))
        count += 1
    del g.node[:]
    g.node.extend(out)
    return count


def exact_bilinear_resizes(m):
    """Each Resize (linear, half_pixel, constant scales on H and W of a float32 NCHW
    tensor of known shape; any other is left alone) becomes Gathers of the source rows and columns, four Muls by constant
    weight planes and three Adds, computed in the order onnxruntime's own kernel does
    (w11·X11 + w21·X21 + w12·X12 + w22·X22 from the left, each weight the product of
    the row's and the column's), so the outputs are identical to the last bit. Why:
    tract works out every output element's sources and weights as it goes (the 2x
    upsample to 52x52 was the slowest single node of the int8 model), while gathers and
    elementwise ops are block copies and vector loops. Returns how many were rewritten."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference
    g = m.graph
    inferred = shape_inference.infer_shapes(m).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    floats = {v.name for v in list(inferred.value_info) + list(inferred.input)
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    values = constants(g)
    out, count = [], 0
    for n in g.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        scales = values.get(n.input[2]) if n.op_type == "Resize" and len(n.input) == 3 else None
        shape = shapes.get(n.input[0], [])
        if (scales is None or scales.shape != (4,) or list(scales[:2]) != [1, 1]
                or a.get("mode") != b"linear" or a.get("coordinate_transformation_mode") != b"half_pixel"
                or a.get("antialias", 0) != 0 or "axes" in a or n.input[0] not in floats
                or len(shape) != 4 or 0 in shape):
            out.append(n)
            continue
        _, _, h, w = shape
        # The output size as onnxruntime works it out, in float32.
        oh, ow = (int(np.float32(d) * np.float32(sc)) for d, sc in ((h, scales[2]), (w, scales[3])))
        if shapes.get(n.output[0], [0, 0, oh, ow])[2:] != [oh, ow]:
            out.append(n)
            continue
        y1, y2, wy1, wy2 = bilinear_taps(h, oh, scales[2])
        x1, x2, wx1, wx2 = bilinear_taps(w, ow, scales[3])
        name = f"{n.name or n.output[0]}{BILINEAR}"

        def gather(src, index, axis, tag):
            o = f"{name}{tag}"
            out.append(helper.make_node("Gather", [src, int64_const(g, f"{o}_index", index)], [o], name=o, axis=axis))
            return o
        # Columns first, on the input's rows: tract gathers along the last axis element
        # by element, rows (whole runs) fast, so the column gathers go where they are
        # fewest.
        cols1, cols2 = gather(n.input[0], x1, 3, "cols1"), gather(n.input[0], x2, 3, "cols2")
        terms = []
        for tag, cols, y, wy, wx in (("11", cols1, y1, wy1, wx1), ("21", cols2, y1, wy1, wx2),
                                     ("12", cols1, y2, wy2, wx1), ("22", cols2, y2, wy2, wx2)):
            weight = f"{name}w{tag}"
            g.initializer.append(numpy_helper.from_array((wx[None, :] * wy[:, None]).reshape(1, 1, oh, ow), weight))
            term = f"{name}term{tag}"
            # (The weights second, where tract looks for a broadcast operand;
            # multiplication commutes exactly.)
            out.append(helper.make_node("Mul", [gather(cols, y, 2, f"y{tag}"), weight], [term], name=term))
            terms.append(term)
        total = terms[0]
        for k, term in enumerate(terms[1:]):
            last = k == len(terms) - 2
            nxt = n.output[0] if last else f"{name}sum{k}"
            out.append(helper.make_node("Add", [total, term], [nxt], name=f"{name}sum{k}"))
            total = nxt
        count += 1
    del g.node[:]
    g.node.extend(out)
    tidy(g)
    return count
