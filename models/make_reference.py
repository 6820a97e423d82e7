"""Writes models/reference/nanodet_reference.json: what onnxruntime computes with the
committed model on the demo photos, for the Rust detector's tests.

Pre-processing is written out exactly as in firmware/vision/src/detector.rs (letterbox,
bilinear with half-pixel centres, BGR mean/std), in float32, so tract's outputs can be
compared to these to float precision. For each photo it stores the sha256 of the photo,
the raw head outputs of the strongest cells of every level, and the detections after
decoding and NMS.

    python models/make_reference.py PHOTO_DIR      (photos from scripts/fetch-demo-photos)
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "nanodet.onnx")
OUT = os.path.join(HERE, "reference", "nanodet_reference.json")
PHOTOS = ["astronaut.png", "basketball1.png", "camera.png", "left06.jpg"]
SIZE = 416
MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
STD_BGR = np.array([57.375, 57.12, 58.395], np.float32)
MIN_SCORE, NMS_IOU, TOP_CELLS = 0.3, 0.5, 5


def short(values):
    """Six significant digits: plenty for a tolerance of 1e-3, and a small file."""
    return [float(f"{v:.6g}") for v in values]


def taps(n_out, n_in):
    s = np.clip((np.arange(n_out, dtype=np.float32) + 0.5) * np.float32(n_in / n_out) - 0.5, 0, n_in - 1)
    i0 = np.floor(s).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), (s - i0).astype(np.float32)


def preprocess(rgb):
    h, w, _ = rgb.shape
    scale = min(np.float32(SIZE) / np.float32(w), np.float32(SIZE) / np.float32(h))
    nw = int(min(max(round(float(np.float32(w) * scale)), 1), SIZE))
    nh = int(min(max(round(float(np.float32(h) * scale)), 1), SIZE))
    px, py = (SIZE - nw) // 2, (SIZE - nh) // 2
    x0, x1, fx = taps(nw, w)
    y0, y1, fy = taps(nh, h)
    src = rgb.astype(np.float32)
    fx = fx[None, :, None]
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bot = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    v = top * (1 - fy[:, None, None]) + bot * fy[:, None, None]
    bgr = v[:, :, ::-1]
    out = np.zeros((SIZE, SIZE, 3), np.float32)
    out[py:py + nh, px:px + nw] = (bgr - MEAN_BGR) / STD_BGR
    return out.transpose(2, 0, 1)[None], (float(scale), px, py)


def decode(levels):
    dets = []
    for stride, sc, bx in levels:
        side = SIZE // stride
        for i in range(sc.shape[0]):
            cls = np.nonzero(sc[i] >= MIN_SCORE)[0]
            if len(cls) == 0:
                continue
            d = bx[i].reshape(4, 11).astype(np.float64)
            e = np.exp(d - d.max(1, keepdims=True))
            dist = (e * np.arange(11)).sum(1) / e.sum(1) * stride
            cx, cy = (i % side + 0.5) * stride, (i // side + 0.5) * stride
            box = [cx - dist[0], cy - dist[1], cx + dist[2], cy + dist[3]]
            dets += [(int(c), float(sc[i, c]), box, (stride, i)) for c in cls]
    return dets


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(dets):
    kept = []
    for d in sorted(dets, key=lambda d: (-d[1], d[0])):
        if all(k[0] != d[0] or iou(k[2], d[2]) <= NMS_IOU for k in kept):
            kept.append(d)
    return kept


def main():
    photo_dir = sys.argv[1]
    sess = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    model_sha = hashlib.sha256(open(MODEL, "rb").read()).hexdigest()
    photos = []
    for name in PHOTOS:
        path = os.path.join(photo_dir, name)
        raw = open(path, "rb").read()
        rgb = np.asarray(Image.open(path).convert("RGB"))
        x, (scale, px, py) = preprocess(rgb)
        res = dict(zip(names, sess.run(names, {"input": x})))
        levels = []
        for stride in (8, 16, 32):
            levels.append((stride, res[f"scores_s{stride}"][0], res[f"boxes_s{stride}"][0]))
        kept = nms(decode(levels))
        # The strongest cells of each level, and every cell a kept detection came from.
        wanted = {(stride, int(i)) for stride, sc, _ in levels for i in np.argsort(-sc.max(1))[:TOP_CELLS]}
        wanted |= {d[3] for d in kept}
        cells = []
        for stride, sc, bx in levels:
            for i in sorted(i for s, i in wanted if s == stride):
                cells.append({"stride": stride, "cell": i, "scores": short(sc[i]), "boxes": short(bx[i])})
        h, w = rgb.shape[:2]
        dets = []
        for c, s, b, _ in kept:
            f = lambda v, pad, m: min(max((v - pad) / scale, 0.0), float(m))
            dets.append({"class_id": c, "score": s, "input_bbox": b,
                         "bbox": [f(b[0], px, w), f(b[1], py, h), f(b[2], px, w), f(b[3], py, h)]})
        photos.append({"file": name, "sha256": hashlib.sha256(raw).hexdigest(), "cells": cells, "detections": dets})
        print(f"{name}: {len(dets)} detections", file=sys.stderr)
    ref = {"model_sha256": model_sha, "min_score": MIN_SCORE, "nms_iou": NMS_IOU, "photos": photos}
    with open(OUT, "w") as f:
        json.dump(ref, f, separators=(",", ":"))
    print(OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
