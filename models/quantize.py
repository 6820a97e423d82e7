"""Writes models/nanodet-int8.onnx: static int8 quantisation of nanodet.onnx in QDQ form
(QuantizeLinear/DequantizeLinear pairs around standard ops, which tract reads; tract
rejects the QOperator/com.microsoft ops), weights per channel, activations calibrated on
the demo photos (public-domain and BSD-licensed photos that scikit-image and OpenCV ship,
fetched by scripts/fetch-demo-photos) with flips, crops and exposure changes. Never
calibrated on ../shared: the result is committed.

    python models/quantize.py PHOTO_DIR        (tools pinned in requirements.txt)

Prints the sha256 of the result; nanodet-int8.onnx.sha256 pins it.
"""
import hashlib
import os
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
    from onnx import numpy_helper
    m = onnx.load(path)
    values = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in m.graph.node
                   if n.op_type == "Constant" and n.attribute})
    return [n.name for n in m.graph.node if n.op_type == "Pad" and len(n.input) > 2
            and n.input[2] in values and not np.all(np.isfinite(values[n.input[2]]))]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    pre = OUT + ".pre.onnx"
    # Shape inference and graph clean-up first, as onnxruntime recommends for QDQ.
    quant_pre_process(MODEL, pre, skip_symbolic_shape=True)
    exclude = infinite_pads(pre)
    print(f"kept in float: {exclude} and the max-pool after it", file=sys.stderr)
    try:
        quantize_static(
            pre, OUT, Photos(sys.argv[1]),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            op_types_to_quantize=["Conv", "LeakyRelu", "Add", "Concat", "Resize", "Sigmoid", "Pad", "MaxPool"],
        )
    finally:
        os.remove(pre)
    digest = hashlib.sha256(open(OUT, "rb").read()).hexdigest()
    print(f"{digest}  {os.path.basename(OUT)}  ({os.path.getsize(OUT) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
