"""Dataset jobs: fit a folder of images in batches, resumable, in this process or on a Ray pool.

The driver holds nothing but the list of work. It hashes the options that change a fit
(model, recipe content, detector, seed, batch size, init, ...), skips images whose
OUT/<stem>/fit.json carries the same hash (resume), cuts the rest into batches of
`batch_size` and hands them to `FitWorker`s: one in this process (engine "local") or a pool
of Ray actors (engine "ray"). A worker loads the model, recipe and detector once, fits each
batch with `fit_images` and writes OUT/<stem>/ itself, atomically. The driver appends one
line per image to OUT/manifest.jsonl.

Both engines cut the same batches and seed each the same way, so they give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from priors.errors import FlamefitError, UsageError

from . import io
from .fit import FIT_BATCH

MANIFEST = "manifest.jsonl"
HASH_KEY = "options_hash"
#: test hook: "STEM:MARKER_FILE": the worker that is about to write STEM dies mid-write
#: (os._exit) once, the first time (while MARKER_FILE does not exist yet)
FAULT_ENV = "FLAMEFIT_FAULT_EXIT"
RAY_RETRIES = 3  # actor restarts and method retries before a batch counts as failed
RAY_INSTALL_HINT = '--engine ray: Ray is not installed; fix: pip install ".[ray]" (or pip install ray==2.60.0)'
PASSED_ENV = ("FLAMEFIT_HOME", "FLAMEFIT_MODEL", FAULT_ENV)  # driver variables the workers see too


@dataclass(frozen=True)
class FitOptions:
    """Everything a worker needs to fit like the driver would (plain values, picklable)."""

    model: str | None = None  # path; None: the resolved default
    recipe: str = "default"
    overrides: tuple[str, ...] = ()
    detector: str = "auto"
    landmarks: str | None = None
    device: str = "cpu"
    batch_size: int = FIT_BATCH
    seed: int = 0
    init: str = "zero"
    face_index: int | None = None


@dataclass
class DatasetRun:
    """The outcome of one command: its id and one manifest row per image (in completion order)."""

    run: str
    options_hash: str
    rows: list[dict] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def summary(self) -> dict:
        return {"run": self.run, "options_hash": self.options_hash, "done": self.count("done"),
                "failed": self.count("failed"), "skipped": self.count("skipped")}


# ----------------------------------------------------------------------------- pure helpers
def options_hash(model_tag: str, recipe, opts: FitOptions, detector: str | None = None) -> str:
    """Short sha256 of what changes a fit's numbers: the model tag, the recipe's content (after
    --set overrides; its file name does not matter), the detector (resolved when 'auto'),
    whether landmark files are given, device, seed, batch size, init and face index."""
    content = {"model": model_tag, "recipe": recipe.raw, "detector": detector or opts.detector,
               "landmark_files": opts.landmarks is not None, "device": opts.device, "seed": opts.seed,
               "batch_size": opts.batch_size, "init": opts.init, "face_index": opts.face_index}
    text = json.dumps(content, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def make_batches(items: list, size: int) -> list[list]:
    """Consecutive chunks of `size` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fitted_hash(out: Path, stem: str) -> str | None:
    """The options hash of a finished OUT/<stem>/ (None when absent, unreadable or without one)."""
    folder = Path(out) / stem
    if not (folder / "fit.npz").is_file():
        return None
    try:
        return json.loads((folder / "fit.json").read_text(encoding="utf-8")).get(HASH_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def remove_stale(out: Path, stems: set[str]) -> list[Path]:
    """Remove the temporary folders (.STEM.tmp-*, .STEM.old-*) a killed writer left for these stems."""
    removed = []
    if not Path(out).is_dir():
        return removed
    for entry in Path(out).iterdir():
        name = entry.name
        if not name.startswith(".") or not entry.is_dir():
            continue
        for mark in (".tmp-", ".old-"):
            cut = name.rfind(mark)
            if cut > 1 and name[1:cut] in stems:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
                break
    return removed


def check_unique_stems(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen and seen[p.stem] != p:
            raise UsageError(f"{seen[p.stem]} and {p} would both be written to OUT/{p.stem}/; fix: rename one "
                             "or fit them into different --out folders")
        seen[p.stem] = p


def row(image, status: str, reason: str | None, seconds: float, worker: str, run: str) -> dict:
    """One manifest line (the contract's keys)."""
    return {"image": str(image), "status": status, "reason": reason, "seconds": round(seconds, 3),
            "worker": worker, "run": run}


def _fault_hook(out: Path, stem: str) -> None:
    """FAULT_ENV test hook: die in the middle of writing OUT/<stem>/, once."""
    spec = os.environ.get(FAULT_ENV, "")
    target, _, marker = spec.partition(":")
    if not spec or target != stem or not marker or Path(marker).exists():
        return
    Path(marker).write_text(f"{worker_name()}\n")
    with io.atomic_dir(Path(out) / stem) as tmp:
        (tmp / "fit.npz").write_bytes(b"cut short")  # a write in progress
        os._exit(70)  # no cleanup runs: as if the machine lost the process


# ----------------------------------------------------------------------------- the worker
class FitWorker:
    """Holds the model, recipe and detector; fits batches and writes their outputs into OUT.

    The same class runs in this process (engine "local") and as a Ray actor (engine "ray")."""

    def __init__(self, opts: FitOptions, out: str, run: str, expected_hash: str | None = None,
                 threads: int | None = None, flame=None):
        import torch

        from .detect import resolve_detector
        from .fit import load_flame
        from .recipe import load_recipe

        if threads:
            torch.set_num_threads(threads)
        self.opts, self.out, self.run = opts, Path(out), run
        self.name = worker_name()
        self.error: FlamefitError | None = None  # raised by every call (a Ray actor must not die of it)
        try:
            self.flame = flame if flame is not None else load_flame(opts.model, opts.device)
            self.recipe = load_recipe(opts.recipe, opts.overrides)
            self.detector = opts.detector
            if opts.detector != "file":
                try:
                    self.detector = resolve_detector(opts.detector)
                except FlamefitError:
                    self.detector = opts.detector  # reported per image if an image needs detection
            self.hash = options_hash(self.flame.tag, self.recipe, opts, self.detector)
            if expected_hash is not None and self.hash != expected_hash:
                raise UsageError(f"worker {self.name} sees a different model, recipe or detector than the driver "
                                 f"(options hash {self.hash} != {expected_hash}); fix: give every node the same "
                                 "files")
        except FlamefitError as exc:
            self.error = exc
            return
        if opts.landmarks is None and self.detector in ("fan", "mediapipe"):
            self._warm_detector()

    def _warm_detector(self) -> None:
        """Load the detector now, once, rather than inside the first batch."""
        from . import detect

        try:
            detect._fan(self.opts.device) if self.detector == "fan" else detect._mediapipe()
        except FlamefitError:
            pass  # each image then reports the problem

    def ready(self) -> str:
        if self.error is not None:
            raise self.error
        return self.name

    def fit_batch(self, images: list[str], progress=None) -> list[tuple[dict, dict | None]]:
        """Fit one batch (one batched optimisation) and write OUT/<stem>/ for each fitted image.
        Returns per image (manifest row, fit.json report or None), in input order."""
        from .fit import fit_images
        from .outputs import write_fit_outputs

        if self.error is not None:
            raise self.error
        paths = [Path(p) for p in images]
        start = time.perf_counter()
        outcomes: dict[int, tuple[str, str | None, dict | None]] = {}

        def on_target(i, outcome):
            if not isinstance(outcome, FlamefitError):
                _fault_hook(self.out, paths[i].stem)
                outcome.report[HASH_KEY] = self.hash
                outcome.report["run"] = self.run
                try:
                    write_fit_outputs(self.out, outcome, self.flame)
                except FlamefitError as exc:
                    outcome = exc
            if isinstance(outcome, FlamefitError):
                outcomes[i] = ("failed", str(outcome), None)
            else:
                outcomes[i] = ("done", None, outcome.report)

        o = self.opts
        try:
            fit_images(paths, recipe=self.recipe, model=self.flame, detector=o.detector, landmarks=o.landmarks,
                       device=o.device, batch_size=len(paths), seed=o.seed, face_index=o.face_index,
                       progress=progress, on_target=on_target, init=o.init)
        except UsageError:
            raise  # a setting that fails every batch: stop the run
        except Exception as exc:  # noqa: BLE001  one bad batch must not end a dataset job
            if isinstance(exc, FlamefitError) and not outcomes:
                raise
            reason = f"{type(exc).__name__}: {exc}"
            for i in range(len(paths)):
                outcomes.setdefault(i, ("failed", f"{paths[i]}: fit stopped ({reason})", None))
        share = (time.perf_counter() - start) / max(1, len(paths))
        return [(row(paths[i], status, reason, share, self.name, self.run), report)
                for i, (status, reason, report) in sorted(outcomes.items())]


# ----------------------------------------------------------------------------- engines
def _run_local(worker: FitWorker, batches, record, progress) -> None:
    for batch in batches:
        for r, report in worker.fit_batch([str(p) for p in batch], progress):
            record(r, report)


def import_ray():
    """The ray module, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_INSTALL_HINT) from None
    return ray


def ray_runtime_env(threads: int) -> dict:
    """Environment of the Ray workers: this checkout first on the import path (so they run the
    driver's code), the driver's flamefit variables, and one BLAS/OpenMP pool of `threads`."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.update({k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)})
    return {"env_vars": env}


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: address None/"local" starts a local instance (num_cpus, default all cores);
    "auto" or HOST:PORT joins a running cluster. Returns whether this call started it (then the
    caller shuts it down). An already initialised Ray is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default, 15, yields to anything else running
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address in (None, "", "local"):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **common)  # always a new one
    else:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(f"--address {address}: cannot join a Ray cluster ({str(exc).splitlines()[0]}); "
                             "fix: start one with `ray start --head` or leave --address out") from None
    return True


def absolute_options(opts: FitOptions) -> FitOptions:
    """The options with every path absolute and the model resolved here, so that workers started
    in other folders (or on other nodes of a shared filesystem) read the driver's files."""
    from priors.assets import resolve_model_path

    from .recipe import recipe_path

    return replace(opts, model=str(Path(resolve_model_path(opts.model)).absolute()),
                   recipe=str(recipe_path(opts.recipe).absolute()),
                   landmarks=str(Path(opts.landmarks).absolute()) if opts.landmarks is not None else None)


def worker_threads(cpus: int, workers: int) -> int:
    """Each worker's share of the cores: cores // workers, at least 1."""
    return max(1, cpus // max(1, workers))


def _run_ray(opts: FitOptions, out: Path, run: str, expected_hash: str, batches, record,
             workers: int | None, address: str | None) -> None:
    ray = import_ray()
    started = start_ray(address)
    actors: list = []
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers or cpus, max(1, len(batches)))
        threads = worker_threads(cpus, workers)
        actor_cls = ray.remote(FitWorker).options(num_cpus=threads, num_gpus=1 if opts.device == "cuda" else 0,
                                                  max_restarts=RAY_RETRIES,
                                                  max_task_retries=RAY_RETRIES,
                                                  runtime_env=ray_runtime_env(threads))
        spawn = lambda: actor_cls.remote(opts, str(out), run, expected_hash, threads)  # noqa: E731
        actors = [spawn() for _ in range(workers)]
        queue = deque(batches)
        inflight: dict = {}
        replaced: dict = {}  # a lost actor -> the one that took its place

        def submit(actor):
            if queue:
                batch = queue.popleft()
                inflight[actor.fit_batch.remote([str(p) for p in batch])] = (actor, batch)

        for _ in range(2):  # two batches each: the next one waits on the worker, not on the driver
            for actor in actors:
                submit(actor)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            actor, batch = inflight.pop(done[0])
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, FlamefitError):
                    raise exc.cause from None
                raise
            except ray.exceptions.RayActorError as exc:  # lost more often than Ray retries
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                for p in batch:
                    record(row(p, "failed", f"{p}: worker lost after {RAY_RETRIES} retries ({reason})", 0.0,
                               "?", run), None)
                if actor not in replaced:
                    actors.remove(actor)
                    ray.kill(actor, no_restart=True)
                    replaced[actor] = spawn()
                    actors.append(replaced[actor])
                actor = replaced[actor]
                results = []
            for r, report in results:
                record(r, report)
            submit(actor)
    finally:
        if started:
            ray.shutdown()  # ends the instance and its workers
        else:
            for actor in actors:
                ray.kill(actor, no_restart=True)


def fit_dataset(paths, out, opts: FitOptions, engine: str = "local", workers: int | None = None,
                address: str | None = None, resume: bool = False, on_row=None, progress=None,
                flame=None) -> DatasetRun:
    """Fit every image into OUT/<stem>/, in batches of opts.batch_size, on `engine` ("local" or
    "ray"). resume: skip images already fitted with the same options hash. Appends one line per
    image to OUT/manifest.jsonl; `on_row(row, report)` is called as each image is settled
    (report: its fit.json dict, or None). Ray's `workers` default to one per CPU of the instance."""
    from .detect import resolve_detector
    from .fit import load_flame
    from .recipe import load_recipe

    if engine not in ("local", "ray"):
        raise UsageError(f"--engine {engine!r}: unknown; fix: use local or ray")
    if engine == "local" and (workers or 1) > 1:
        raise UsageError("--workers: the local engine fits in this process; fix: add --engine ray")
    if engine == "ray":
        import_ray()  # fail before any work
    paths = [Path(p) for p in paths]
    check_unique_stems(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flame = flame if flame is not None else load_flame(opts.model, opts.device)
    if engine == "ray":
        paths = [p.absolute() for p in paths]
        opts = absolute_options(opts)
    recipe = load_recipe(opts.recipe, opts.overrides)
    detector = opts.detector
    if detector != "file":
        try:
            detector = resolve_detector(detector)
        except FlamefitError:
            pass
    run = DatasetRun(new_run_id(), options_hash(flame.tag, recipe, opts, detector))
    manifest = out / MANIFEST
    me = worker_name()

    def record(r: dict, report: dict | None) -> None:
        io.append_line(manifest, json.dumps(r))
        run.rows.append(r)
        if on_row is not None:
            on_row(r, report)

    stems = {p.stem for p in paths}
    remove_stale(out, stems)
    pending = []
    for p in paths:
        if resume and fitted_hash(out, p.stem) == run.options_hash:
            record(row(p, "skipped", f"already fitted with options {run.options_hash}", 0.0, me, run.run), None)
        else:
            pending.append(p)
    batches = make_batches(pending, opts.batch_size)
    try:
        if engine == "local":
            worker = FitWorker(opts, str(out), run.run, run.options_hash, flame=flame)
            worker.ready()
            _run_local(worker, batches, record, progress)
        elif batches:
            _run_ray(opts, out, run.run, run.options_hash, batches, record, workers, address)
    finally:
        remove_stale(out, stems)  # what a killed worker left half-written
    return run
