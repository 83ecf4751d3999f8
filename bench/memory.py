"""Peak memory of a big fit-set: `python -m bench.memory [--images 100] [--batch-size 16]`.

Renders N synthetic photos of one identity, fits them as one set (identity-set recipe, every
stage cut to a few iterations: memory does not grow with iterations) and reports the peak
resident set size of the process (ru_maxrss) and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from fitter.fit import load_flame
from fitter.fitset import fit_set

from .synthetic import random_params, render_photo, write_case


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args(argv)
    model = load_flame(None)
    rng = np.random.default_rng(0)
    shape = rng.normal(0, 1, model.n_shape)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for k in range(args.images):
            image, lmk = render_photo(model, random_params(model, rng, shape=shape), rng, size=320)
            paths.append(write_case(folder, f"img{k:03d}", image, lmk))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        its = [f"stages.{s}.iterations={args.iterations}" for s in ("rigid", "landmarks", "photometric")]
        identity, results = fit_set(paths, model=model, landmarks=folder, detector="file",
                                    batch_size=args.batch_size, overrides=its)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"results": [{"images": len(results), "batch_size": args.batch_size,
                                   "iterations_per_stage": args.iterations, "peak_rss_mb": round(peak),
                                   "rss_before_fit_mb": round(before), "seconds": round(seconds, 1)}]}))


if __name__ == "__main__":
    main()
