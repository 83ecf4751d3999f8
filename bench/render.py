"""Renderer benchmark: `python -m bench.render [--json] [--device cpu|cuda] [--repeats N]`.

Renders the stand-in head (the model `resolve_model_path(None)` finds) facing the camera,
projected orthographically to fill about 80% of the image, with per-vertex colours. One
timed step is what a fitting iteration pays for rendering: `render_mesh` forward, an L1 loss
of the composited image and of the alpha mask against fixed random targets, and backward to
the vertex positions and colours. Reports the median over `--repeats` steps after warm-up,
for image sizes 224 and 512 and batch sizes 1 and 8 (change with --sizes / --batches);
`--forward` times forward passes only (under torch.no_grad) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from fitter.render import render_mesh
from priors.assets import load_model, resolve_model_path


def screen_vertices(v_template: np.ndarray, size: int, fill: float = 0.8) -> torch.Tensor:
    """Orthographic, face towards the camera: V x 3 model space (m, y up, +z to the viewer)
    -> V x 3 screen space (x right, y down in pixels; depth = -z, smaller nearer)."""
    v = torch.as_tensor(v_template, dtype=torch.float32)
    lo, hi = v.min(dim=0).values, v.max(dim=0).values
    centre = (lo + hi) / 2
    scale = fill * size / float((hi - lo)[:2].max())
    x = (v[:, 0] - centre[0]) * scale + size / 2
    y = size / 2 - (v[:, 1] - centre[1]) * scale
    return torch.stack([x, y, -v[:, 2] * scale], dim=-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(v_template, faces, size: int, batch: int, device: torch.device, repeats: int,
              forward_only: bool = False, seed: int = 0) -> tuple[float, float]:
    """(median, fastest) milliseconds of one render step (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    base = screen_vertices(v_template, size)
    verts = base[None].repeat(batch, 1, 1).to(device).requires_grad_(not forward_only)
    colors = torch.rand(batch, base.shape[0], 3, generator=gen).to(device)
    colors.requires_grad_(not forward_only)
    target = torch.rand(batch, 3, size, size, generator=gen).to(device)
    target_mask = (torch.rand(batch, 1, size, size, generator=gen) > 0.5).float().to(device)
    faces = faces.to(device)

    def step() -> None:
        out = render_mesh(verts, faces, colors, size, size)
        loss = (out["image"] - target).abs().mean() + (out["alpha"] - target_mask).abs().mean()
        loss.backward()

    def forward() -> None:
        with torch.no_grad():
            render_mesh(verts, faces, colors, size, size)

    fn = forward if forward_only else step
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times)


def run(device: str = "cpu", repeats: int = 20, sizes=(224, 512), batches=(1, 8),
        forward_only: bool = False) -> dict:
    """All cases; returns the benchmark record (see the contract's Benchmarks section)."""
    dev = torch.device(device)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model = load_model(resolve_model_path(None), require_landmarks=False)
    faces = torch.as_tensor(model.faces, dtype=torch.int64)
    results, fastest_ms = [], []
    for size in sizes:
        for batch in batches:
            ms, fastest = time_case(model.v_template, faces, size, batch, dev, repeats,
                                    forward_only)
            key = "fwd_ms" if forward_only else "fwd_bwd_ms"
            results.append({"size": size, "batch": batch, key: round(ms, 2),
                            "faces": int(faces.shape[0])})
            fastest_ms.append(round(fastest, 2))
    return {"results": results, "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "model": model.name, "repeats": repeats,
            "fastest_ms": fastest_ms, "loadavg_1min_before": load_before}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per case")
    parser.add_argument("--sizes", type=_ints, default=(224, 512), help="e.g. 224,512")
    parser.add_argument("--batches", type=_ints, default=(1, 8), help="e.g. 1,8")
    parser.add_argument("--forward", action="store_true", help="time forward passes only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    record = run(args.device, args.repeats, args.sizes, args.batches, args.forward)
    if args.json:
        print(json.dumps(record))
        return

    from rich.console import Console
    from rich.table import Table

    key = "fwd_ms" if args.forward else "fwd_bwd_ms"
    title = (f"render_mesh {'forward' if args.forward else 'forward + backward'}, "
             f"{record['model']}, {args.device}, {record['threads']} threads, "
             f"torch {record['torch']}, median of {args.repeats}, "
             f"1-min load average before: {record['loadavg_1min_before']}")
    table = Table(title=title)
    for col in ("size", "batch", "faces", "ms / step (median)", "ms / image", "fastest ms"):
        table.add_column(col, justify="right")
    for r, fastest in zip(record["results"], record["fastest_ms"], strict=True):
        table.add_row(str(r["size"]), str(r["batch"]), str(r["faces"]), f"{r[key]:.1f}",
                      f"{r[key] / r['batch']:.1f}", f"{fastest:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
