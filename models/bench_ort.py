"""onnxruntime's time per inference for the models deskcam ships, on the same input as
`deskcam bench` (the first demo photo, the same pre-processing), for comparison.

    python models/bench_ort.py PHOTO_DIR RUNS THREADS MODEL...   -> one JSON line
"""
import json
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import preprocess  # noqa: E402


def main():
    photo_dir, runs, threads, models = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    first = sorted(f for f in os.listdir(photo_dir) if f.lower().endswith((".png", ".jpg", ".jpeg")))[0]
    x = preprocess(np.asarray(Image.open(os.path.join(photo_dir, first)).convert("RGB")))[0]
    out = []
    for m in models:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        s = ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"])
        for _ in range(2):
            s.run(None, {"input": x})
        ms = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run(None, {"input": x})
            ms.append((time.perf_counter() - t) * 1e3)
        ms.sort()
        out.append({"model": m, "threads": threads, "median_ms": ms[len(ms) // 2],
                    "p95_ms": ms[min(len(ms) - 1, round((len(ms) - 1) * 0.95))]})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"results": out, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
