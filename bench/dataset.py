"""Dataset throughput: `python -m bench.dataset [--json] [--images 24] [--recipes fast,default] [--workers 1,2]`.

Fits the same N synthetic faces (bench.synthetic, exact landmark files, 512 px photos) with
`fitter.dataset.fit_dataset` and writes the full outputs, per recipe: the local engine (in this
process, torch's default threads) and the Ray engine with each worker count (cores // workers
threads each). Measures Ray's start-up (ray.init of a local instance; one worker's start:
import, model, recipe), the Ray engine's overhead per image against the local engine, and
projects a cluster: K workers x the measured per-worker throughput, plus the measured
start-up. R (bench.render: 224 px, batch 1, forward + backward) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fitter.dataset import FitOptions, FitWorker, fit_dataset, ray_runtime_env, worker_threads
from fitter.fit import load_flame
from priors.assets import resolve_model_path

from .render import time_case
from .synthetic import random_params, render_photo, write_case


def measure_r(model, repeats: int = 20) -> float:
    """R in milliseconds: median 224 px batch-1 render forward + backward (bench.render's case)."""
    faces = torch.as_tensor(model.faces.cpu().numpy(), dtype=torch.int64)
    return time_case(model.v_template.cpu().numpy(), faces, 224, 1, torch.device("cpu"), repeats)[0]


def make_images(model, n: int, folder: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        image, lmk = render_photo(model, random_params(model, rng), rng)
        paths.append(write_case(folder, f"img{k:03d}", image, lmk))
    return paths


def timed_fit(paths, opts: FitOptions, engine: str, workers: int | None, flame) -> dict:
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as out:
        if engine == "local":
            torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            run = fit_dataset(paths, out, opts, engine=engine, workers=workers,
                              flame=flame if engine == "local" else None)
        finally:
            wall = time.perf_counter() - start
            torch.set_num_threads(threads)
    if run.count("done") != len(paths):
        raise RuntimeError(f"{engine}: only {run.count('done')} of {len(paths)} fitted")
    return {"wall_s": round(wall, 2), "images_per_s": round(len(paths) / wall, 3),
            "workers_seen": len({r["worker"] for r in run.rows})}


def actor_start_s(ray, opts: FitOptions, workers: int) -> float:
    """Seconds until `workers` fresh Ray workers have loaded model, recipe and detector."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = worker_threads(cpus, workers)
    cls = ray.remote(FitWorker).options(num_cpus=threads, runtime_env=ray_runtime_env(threads))
    start = time.perf_counter()
    actors = [cls.remote(opts, tempfile.gettempdir(), "bench", None, threads) for _ in range(workers)]
    ray.get([a.ready.remote() for a in actors])
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return seconds


def run(n_images: int = 24, recipes=("fast", "default"), worker_counts=(1, 2), batch_size: int = 1,
        project_workers=(8, 32, 128), project_images: int = 30000) -> dict:
    import ray

    model_path = str(resolve_model_path(None))
    flame = load_flame(model_path)
    r_ms = measure_r(flame)
    cpus = os.cpu_count() or 1
    record = {"results": [], "images": n_images, "batch_size": batch_size, "cpus": cpus,
              "threads_local": 1, "threads_R": torch.get_num_threads(), "R_ms": round(r_ms, 2), "ray": ray.__version__,
              "loadavg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-dataset-in-") as folder:
        paths = make_images(flame, n_images, Path(folder))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_worker_niceness", "0")  # as fitter.dataset.start_ray: workers compete fairly
        start = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        record["ray_init_s"] = round(time.perf_counter() - start, 2)
        try:
            for recipe in recipes:
                opts = FitOptions(model=model_path, recipe=recipe, detector="file", landmarks=folder,
                                  batch_size=batch_size)
                local = timed_fit(paths, opts, "local", None, flame)
                row = {"recipe": recipe, "local": local, "ray": {}}
                for w in worker_counts:
                    row["ray"][str(w)] = {**timed_fit(paths, opts, "ray", w, None),
                                          "threads": worker_threads(cpus, w)}
                row["actor_start_s"] = round(actor_start_s(ray, opts, 1), 2)
                record["results"].append(row)
        finally:
            ray.shutdown()
    for row in record["results"]:
        row["projection"] = project(row, n_images, record["ray_init_s"], project_workers, project_images, r_ms)
    return record


def project(row: dict, n: int, ray_init_s: float, workers, images: int, r_ms: float) -> dict:
    """Per-worker throughput from the Ray run with the most workers (worker start-up taken off),
    times K workers, plus the start-up (instance + workers, in parallel) once. Ray's overhead per
    image: that run's seconds per image and worker against the local engine's (one thread each
    when the run has cores workers)."""
    w_max = max(row["ray"], key=int)
    run = row["ray"][w_max]
    busy = max(1e-6, run["wall_s"] - row["actor_start_s"])
    per_worker = n / busy / int(w_max)  # images/s of one worker with run["threads"] threads
    out = {"from_workers": int(w_max), "per_worker_images_per_s": round(per_worker, 3),
           "per_worker_threads": run["threads"], "s_per_image_per_worker": round(1 / per_worker, 2),
           "s_per_image_per_worker_in_R": round(1000 / per_worker / r_ms, 1),
           "ray_overhead_s_per_image": round(1 / per_worker - 1 / row["local"]["images_per_s"], 3)
           if run["threads"] == 1 else None, "clusters": []}
    for k in workers:
        rate = k * per_worker
        out["clusters"].append({"workers": k, "images_per_s": round(rate, 2), "hours_for": images,
                                "hours": round((ray_init_s + row["actor_start_s"] + images / rate) / 3600, 2)})
    return out


def _list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--recipes", type=_list, default=("fast", "default"), help="e.g. fast,default")
    parser.add_argument("--workers", type=lambda t: tuple(int(x) for x in _list(t)), default=(1, 2))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        parser.error('Ray is not installed; fix: pip install ".[ray]"')
    record = run(args.images, args.recipes, args.workers, args.batch_size)
    if args.json:
        print(json.dumps(record))
    else:
        print_tables(record)


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    r = record["R_ms"]
    table = Table(title=f"fit_dataset, {record['images']} images, batch {record['batch_size']}, {record['cpus']} "
                        f"cores, R = {r:.1f} ms, ray.init {record['ray_init_s']:.1f} s, load before "
                        f"{record['loadavg_1min_before']:.1f}")
    for col in ("recipe", "engine", "workers x threads", "wall s", "images/s", "s/image in R"):
        table.add_column(col, justify="right")
    for row in record["results"]:
        cases = [("local", f"1 x {record['threads_local']}", row["local"])]
        cases += [("ray", f"{w} x {v['threads']}", v) for w, v in row["ray"].items()]
        for engine, wt, v in cases:
            table.add_row(row["recipe"], engine, wt, f"{v['wall_s']:.1f}", f"{v['images_per_s']:.2f}",
                          f"{1000 / v['images_per_s'] / r:.0f}")
    console = Console()
    console.print(table)
    for row in record["results"]:
        p = row["projection"]
        console.print(f"{row['recipe']}: worker start {row['actor_start_s']:.1f} s; one worker "
                      f"({p['per_worker_threads']} thread(s), from the {p['from_workers']}-worker run) "
                      f"{p['per_worker_images_per_s']:.2f} images/s ({p['s_per_image_per_worker_in_R']:.0f} R per "
                      f"image); Ray overhead {p['ray_overhead_s_per_image']} s/image; "
                      + "; ".join(f"{c['workers']} workers: {c['images_per_s']:.0f} images/s, {c['hours']:.2f} h "
                                  f"for {c['hours_for']}" for c in p["clusters"]))


if __name__ == "__main__":
    main()
