"""flamefit command line: a thin click layer over the library (parse, call, print, exit code)."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from priors.errors import FlamefitError, UsageError

console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)
_WARNED: set[str] = set()  # warnings already shown in this run
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def handle_errors(fn):
    """Map flamefit errors to one coloured line and their exit code (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except FlamefitError as exc:
            if debug:
                traceback.print_exc()
            console.print(f"[bold red]error:[/] {escape(str(exc))}")  # e.g. ".[ray]" is no markup
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            sys.exit(130)

    return wrapper


class StageProgress:
    """A rich progress bar per stage with live losses; silent when quiet. The stage name, bar, count
    and time always show in full; the losses take what is left of the line (cut with '…')."""

    BAR_WIDTH = 20

    def __init__(self, quiet: bool, label: str = ""):
        self.quiet = quiet
        self.label = label
        self.progress = None
        self.tasks = {}

    def __enter__(self):
        if not self.quiet:
            keep = Column(no_wrap=True)
            self.progress = Progress(TextColumn("{task.description}", table_column=keep),
                                     BarColumn(bar_width=self.BAR_WIDTH), TextColumn(
                                         "{task.completed}/{task.total}", table_column=Column(no_wrap=True)),
                                     TimeElapsedColumn(), TextColumn("{task.fields[losses]}",
                                                                     table_column=Column(no_wrap=True)),
                                     console=console, transient=True)
            self.progress.__enter__()
        return self

    def _fit_losses(self, text: str) -> str:
        """The losses text cut to the room the other columns leave on the console's line."""
        tasks = self.progress.tasks
        name = max(len(t.description) for t in tasks)
        count = max(len(f"{t.total:g}") * 2 + 1 for t in tasks)
        room = console.width - (name + self.BAR_WIDTH + count + 7 + 4) - 1  # 7: 0:00:00; 4 column gaps
        if len(text) <= room:
            return text
        return text[:room - 1] + "…" if room > 1 else ""

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, stage: str, it: int, total: int, losses: dict):
        if self.progress is None:
            return
        key = (self.label, stage)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(f"{self.label} {stage}".strip(), total=total, losses="")
        if it % 5 == 0 or it == total:
            text = " ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:4])
            self.progress.update(self.tasks[key], completed=it, losses=self._fit_losses(text))


def expand_images(items) -> list[Path]:
    """Image arguments: files as given, directories expanded to their images (sorted)."""
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    if not paths:
        raise UsageError("no images given (a directory argument holds no .jpg/.png/.bmp/.webp files)")
    return paths


def report_outcome(path: Path, outcome, out_dir: Path | None, rows: list, quiet: bool):
    report_row(path, str(outcome) if isinstance(outcome, FlamefitError) else outcome.report, out_dir, rows, quiet)


def report_row(path: Path, outcome: dict | str, out_dir: Path, rows: list, quiet: bool):
    """One image's console line and summary row: its fit.json report (fitted) or its failure reason."""
    if isinstance(outcome, str):
        console.print(f"[bold red]failed:[/] {escape(outcome)}")
        rows.append({"image": str(path), "status": "failed", "error": outcome})
        return
    for warning in outcome.get("warnings", []):
        if warning not in _WARNED:
            _WARNED.add(warning)
            console.print(f"[yellow]warning:[/] {warning}")
    rows.append({"image": str(path), "status": "ok", "out": str(out_dir), "seconds": outcome["seconds"],
                 "landmark_rmse_px": outcome["landmark_rmse_px"]})
    if not quiet:
        console.print(f"[green]fitted[/] {path.name} -> {out_dir}  ({outcome['seconds']:.1f} s, landmark RMSE "
                      f"{outcome['landmark_rmse_px']:.2f} px)")


def with_options(opts, fn):
    """Apply click option decorators in the order they are listed."""
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def fit_options(fn):
    """Options shared by `fit` and `fit-set`."""
    opts = [
        click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder."),
        click.option("--model", default=None, help="FLAME model file or folder (default: resolved)."),
        click.option("--recipe", default="default", show_default=True, help="Recipe name or .toml path."),
        click.option("--landmarks", default=None, type=click.Path(exists=True),
                     help="Landmark file (one image) or folder of <stem>.pts/.npy/.json."),
        click.option("--detector", type=click.Choice(["auto", "fan", "mediapipe", "file"]), default="auto",
                     show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--batch-size", type=click.IntRange(1, 256), default=None,
                     help="Images per batched optimisation (fit: 8, each its own parameters; "
                          "fit-set: mini-batch, 16)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--init", "init", type=click.Choice(["zero", "deca"]), default="zero", show_default=True),
        click.option("--face-index", type=click.IntRange(0), default=None,
                     help="Which face when several are found (0 = largest)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe field, e.g. stages.photometric.weights.photo=4"),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout."),
    ]
    return with_options(opts, fn)


def source_options(fn):
    """Options of commands whose inputs are photos (fitted on the fly) or fit.npz files."""
    opts = [
        click.option("--model", default=None),
        click.option("--recipe", default="default", show_default=True, help="Recipe for photos fitted on the fly."),
        click.option("--detector", type=click.Choice(["auto", "fan", "mediapipe"]), default="auto",
                     show_default=True),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--quiet", is_flag=True),
    ]
    return with_options(opts, fn)


def check_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; fix: use --device cpu")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine).")
def main(debug, threads):
    """flamefit: fit the FLAME head model to photos by analysis-by-synthesis."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@main.command()
@click.argument("images", nargs=-1, required=True)
@fit_options
@click.option("--resume", is_flag=True, help="Skip images already fitted in OUT with the same model, recipe, options.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: in this process; ray: a pool of Ray workers (pip install \".[ray]\").")
@click.option("--workers", type=click.IntRange(1), default=None, help="Ray workers (default: one per CPU).")
@click.option("--address", default=None, help="Ray cluster to join: auto or HOST:PORT (default: start one here).")
@handle_errors
def fit(images, out, model, recipe, landmarks, detector, device, batch_size, seed, init, face_index,
        overrides, quiet, as_json, resume, engine, workers, address):
    """Fit one FLAME head per IMAGE; writes OUT/<stem>/ (fit.npz, mesh.obj, overlay.png, fit.json)
    and appends a line per image to OUT/manifest.jsonl."""
    from fitter.dataset import FitOptions, fit_dataset
    from fitter.fit import FIT_BATCH, load_flame

    check_device(device)
    if init == "deca":
        from fitter.deca import require_deca_compatible

        require_deca_compatible(model)
    paths = expand_images(images)
    out_dir = Path(out)
    flame = load_flame(model, device)
    opts = FitOptions(model=model, recipe=recipe, overrides=tuple(overrides), detector=detector,
                      landmarks=landmarks, device=device, batch_size=batch_size or FIT_BATCH, seed=seed, init=init,
                      face_index=face_index)
    rows: list = []

    def on_row(r, report):
        if r["status"] == "skipped":
            rows.append({"image": r["image"], "status": "skipped"})
            return
        outcome = report if r["status"] == "done" else r["reason"]
        report_row(Path(r["image"]), outcome, out_dir / Path(r["image"]).stem, rows, quiet)

    with StageProgress(quiet or as_json or engine != "local") as progress:
        run = fit_dataset(paths, out_dir, opts, engine=engine, workers=workers, address=address, resume=resume,
                          on_row=on_row, progress=progress, flame=flame)
    counts = run.summary
    if as_json:
        out_console.print_json(json.dumps({"results": rows, **counts, "manifest": str(out_dir / "manifest.jsonl")}))
    elif not quiet and (counts["skipped"] or len(paths) > 1):
        console.print(f"done {counts['done']}, failed {counts['failed']}, skipped {counts['skipped']} "
                      f"(run {counts['run']}; {out_dir / 'manifest.jsonl'})")
    if counts["failed"]:
        console.print(f"[bold red]{counts['failed']} of {len(rows)} image(s) failed[/]")
        sys.exit(1)


@main.command("fit-set")
@click.argument("images", nargs=-1, required=True)
@fit_options
@click.option("--shape-mode", type=click.Choice(["shared", "consistency"]), default=None,
              help="One shared shape (default), or per-image shapes tied by the consistency loss.")
@click.option("--negatives", multiple=True, type=click.Path(exists=True),
              help="fit.npz / identity.npz files or folders of other identities (consistency hinge).")
@handle_errors
def fit_set(images, out, model, recipe, landmarks, detector, device, batch_size, seed, init, face_index,
            overrides, quiet, as_json, shape_mode, negatives):
    """Fit photos of ONE person into one identity; writes OUT/identity.npz and OUT/<stem>/ per image."""
    from fitter.fit import load_flame
    from fitter.fitset import fit_set as run_fit_set
    from fitter.fitset import write_identity
    from fitter.outputs import write_fit_outputs

    check_device(device)
    if init == "deca":
        from priors.deca import require_deca_compatible

        require_deca_compatible(model)
    if recipe == "default":
        recipe = "identity-set"
    paths = expand_images(images)
    out_dir = Path(out)
    flame = load_flame(model, device)
    rows: list = []
    with StageProgress(quiet or as_json, label="set") as progress:
        identity, results = run_fit_set(
            paths, recipe=recipe, model=flame, detector=detector, landmarks=landmarks, device=device,
            batch_size=batch_size or 16, seed=seed, overrides=overrides, shape_mode=shape_mode, negatives=negatives,
            face_index=face_index, progress=progress, init=init,
            on_error=lambda p, exc: report_outcome(p, exc, None, rows, quiet))
    for r in results:
        try:
            report_outcome(r.target.path, r, write_fit_outputs(out_dir, r, flame), rows, quiet)
        except FlamefitError as exc:
            report_outcome(r.target.path, exc, None, rows, quiet)
    identity_path = write_identity(out_dir, identity)
    failed = sum(r["status"] != "ok" for r in rows)
    if not quiet:
        console.print(f"[green]identity[/] ({identity.shape_mode}, {len(identity.images)} images, shape spread "
                      f"{identity.spread:.3f}) -> {identity_path}")
    if as_json:
        out_console.print_json(json.dumps({"results": rows, "failed": failed, "identity": str(identity_path),
                                           "shape_mode": identity.shape_mode, "shape_spread": identity.spread}))
    if failed:
        console.print(f"[bold red]{failed} of {len(rows)} image(s) failed[/]")
        sys.exit(1)


@main.command()
@click.option("--source", "source", required=True, help="Source photo or fit.npz (gives the expression).")
@click.option("--target", "target", required=True, help="Target photo or fit.npz (keeps its identity).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(["swap", "mix", "optimize"]), default="swap", show_default=True)
@click.option("--mix", "mix_spec", default=None, help='Layer weights, e.g. "exp.coarse=1,exp.mid=0.5,jaw=1".')
@click.option("--regions", default=None, help="Restrict the expression to regions: mouth,eyes,brows,nose,jaw.")
@click.option("--eyes", is_flag=True, help="swap: take the source's eye pose too.")
@source_options
@handle_errors
def transfer(source, target, out, mode, mix_spec, regions, eyes, model, recipe, detector, device, quiet):
    """Put SOURCE's expression on TARGET (swap, layer mix, or optimised mix)."""
    from fitter.edits import load_source, run_transfer, write_transfer
    from fitter.fit import load_flame
    from fitter.transfer import parse_mix_spec

    check_device(device)
    if mix_spec:
        parse_mix_spec(mix_spec)  # fail before any fitting
    flame = load_flame(model, device)
    with StageProgress(quiet) as progress:
        src = load_source(source, flame, recipe, detector, device, progress)
        tgt = load_source(target, flame, recipe, detector, device, progress)
    result = run_transfer(flame, src, tgt, mode=mode, mix_spec=mix_spec, regions=regions, eyes=eyes)
    folder = write_transfer(out, flame, src, tgt, result)
    if result.alphas is not None and not quiet:
        console.print("alphas: " + ", ".join(f"{k}={v:g}" for k, v in result.alphas.items()))
    console.print(f"[green]wrote[/] {folder}/transfer.npz, mesh.obj, transfer.png")


class ManyValuesOption(click.Option):
    """A repeatable option that also takes the plain words after it, so `--expressions a b c` is
    `--expressions a --expressions b --expressions c` (it stops at the next word starting with '-')."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        option = next(parser._long_opt.get(o) or parser._short_opt.get(o) for o in self.opts)
        take_one = option.process

        def process(value, state):
            take_one(value, state)
            while state.rargs and not state.rargs[0].startswith("-"):
                state.opts[option.dest].append(state.rargs.pop(0))

        option.process = process


@main.command()
@click.argument("target")
@click.option("--expressions", cls=ManyValuesOption, multiple=True, metavar="DIR|FILES...",
              help="A folder, or photos / fit.npz files (several after one flag, or the flag repeated).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--yaw-sweep", is_flag=True, help="Add a head turn from -30 to 30 degrees.")
@click.option("--jaw-sweep", is_flag=True, help="Add a jaw opening from 0 to 30 degrees.")
@click.option("--fps", type=click.IntRange(1, 60), default=10, show_default=True)
@source_options
@handle_errors
def animate(target, expressions, out, yaw_sweep, jaw_sweep, fps, model, recipe, detector, device, quiet):
    """Drive TARGET with each expression (and optional sweeps); writes OUT/frames/ and OUT/animation.gif."""
    from fitter.edits import animation_params, load_source, write_animation
    from fitter.fit import load_flame

    check_device(device)
    flame = load_flame(model, device)
    items = []
    for e in expressions:
        p = Path(e)
        if p.is_dir():
            items += sorted(q for q in p.rglob("*") if q.name == "fit.npz" or q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            items.append(p)
    with StageProgress(quiet) as progress:
        tgt = load_source(target, flame, recipe, detector, device, progress)
        sources = [load_source(p, flame, recipe, detector, device, progress) for p in items]
        frames = animation_params(tgt, sources, yaw_sweep, jaw_sweep)
        folder = write_animation(out, flame, tgt, frames, fps, progress)
    console.print(f"[green]wrote[/] {len(frames)} frames -> {folder}/frames/, {folder}/animation.gif")


@main.command()
@click.argument("fit_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
@click.option("--yaw", type=float, default=0.0, show_default=True, help="Extra head yaw in degrees.")
@click.option("--size", type=click.IntRange(32, 4096), default=512, show_default=True)
@click.option("--background", type=click.Choice(["none", "photo"]), default="none", show_default=True)
@click.option("--model", default=None)
@handle_errors
def render(fit_file, out, yaw, size, background, model):
    """Render a fit.npz (grey shaded geometry, or its fitted appearance over the photo)."""
    from fitter.views import render_fit_file

    render_fit_file(fit_file, out, yaw=yaw, size=size, background=background, model=model)
    console.print(f"[green]wrote[/] {out}")


@main.group(invoke_without_command=True)
@click.pass_context
@handle_errors
def recipes(ctx):
    """List the built-in recipes (or `recipes show NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    from fitter.recipe import builtin_names, load_recipe

    table = Table("recipe", "stages", "iterations", "description")
    for name in builtin_names():
        r = load_recipe(name)
        table.add_row(name, ", ".join(s.name for s in r.stages), str(r.total_iterations), r.description)
    out_console.print(table)


@recipes.command("show")
@click.argument("name")
@handle_errors
def recipes_show(name):
    """Print a recipe file."""
    from fitter.recipe import load_recipe, recipe_path

    load_recipe(name)  # validates
    click.echo(recipe_path(name).read_text(encoding="utf-8"), nl=False)


def wrap_whole_words(text: str, width: int, indent: str = "") -> list[str]:
    """Lines of at most `width` characters broken between words only: a path, URL or `quoted command`
    is never split or shortened (one longer than the line stands alone on its own line)."""
    tokens: list[str] = []
    for word in text.split():
        if tokens and tokens[-1].count("`") % 2:  # inside a `command`: keep it one token
            tokens[-1] += " " + word
        else:
            tokens.append(word)
    lines, line = [], ""
    for token in tokens:
        if line and len(indent) + len(line) + 1 + len(token) > width:
            lines.append(indent + line)
            line = token
        else:
            line = f"{line} {token}" if line else token
    return lines + [indent + line] if line else lines


@main.command()
@click.option("--model", default=None)
@handle_errors
def doctor(model):
    """What is installed and usable, with the fix for anything missing."""
    from rich import box
    from rich.markup import escape

    from priors.doctor import doctor_items

    items = doctor_items(model)
    table = Table("item", "status", "", box=box.SIMPLE_HEAD)
    for item in items:
        status = f"[{'green' if item.ok else 'yellow'}]{item.status or ('ok' if item.ok else 'missing')}[/]"
        table.add_row(item.name, status, "" if item.required else "optional")
    out_console.print(table)
    width = max(40, out_console.width)
    for item in items:  # the full details and fixes, wrapped between words only
        out_console.print(f"[bold]{escape(item.name)}[/]", soft_wrap=True)
        for line in wrap_whole_words(item.detail, width, "  "):
            out_console.print(escape(line), soft_wrap=True)
        if not item.ok:
            for k, line in enumerate(wrap_whole_words("fix: " + item.fix, width, "  ")):
                out_console.print(f"[yellow]{escape(line)}[/]" if k == 0 else escape(line), soft_wrap=True)


@main.group()
def assets():
    """Install model assets into the flamefit cache."""


@assets.command("install")
@click.argument("path", type=click.Path(exists=True))
@handle_errors
def assets_install(path):
    """Convert/copy a FLAME model, texture space, masks or DECA weights into the cache."""
    from priors.assets import install_asset

    kind, installed = install_asset(path)
    console.print(f"[green]installed[/] {kind}: {installed}")


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["glb", "obj", "ply"]), default="glb", show_default=True)
@click.option("--out", "out", required=True, type=click.Path(),
              help="Output file (glb; obj/ply of a fit) or folder (obj/ply of a track: frame_0000.obj ...).")
@click.option("--model", default=None, help="The model the fit/track was made with (default: resolved).")
@click.option("--morph", type=click.Choice(["signed", "split"]), default="split", show_default=True,
              help="glb morph targets: one per expression coefficient (signed weights), or a +/- pair each "
              "with weights in [0, 1] (for Blender, which clamps shape-key values).")
@click.option("--correctives", type=click.Choice(["bake", "drop"]), default="bake", show_default=True,
              help="glb pose correctives: baked as animated morph targets (exact playback), or left out.")
@handle_errors
def export(source, fmt, out, model, morph, correctives):
    """Export a fit.npz or track.npz as GLB (skin + expression morph targets + animation) or OBJ/PLY meshes."""
    from fitter.export import export_file

    r = export_file(source, fmt, out, model=model, morph=morph, correctives=correctives)
    what = f"{r.frames} frame(s) at {r.fps:g} fps, {r.vertices} vertices"
    if r.format == "glb":
        what += f", {r.joints} joints, {r.morph_targets} morph targets; pose correctives {r.correctives}"
        if r.correctives == "dropped":
            what += f" (lost: max {r.corrective_max_mm:.3f} mm, mean {r.corrective_mean_mm:.3f} mm)"
    console.print(f"[green]wrote[/] {r.path} ({what})")
    if r.format == "glb" and morph == "signed":
        console.print("note: Blender clamps shape-key values to [0, 1]; for Blender keep the default --morph split")


@main.command()
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--model", default=None, help="FLAME model file or folder (default: resolved).")
@click.option("--recipe", default="track", show_default=True, help="Recipe name or .toml path.")
@click.option("--landmarks", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of <frame>.pts/.npy/.json (frame file stems; 000012 for a video's frame 12).")
@click.option("--detector", type=click.Choice(["auto", "fan", "mediapipe"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--start", type=click.IntRange(0), default=0, show_default=True, help="First frame (0-based).")
@click.option("--end", type=click.IntRange(1), default=None, help="Stop before this frame.")
@click.option("--every", type=click.IntRange(1), default=1, show_default=True, help="Take every K-th frame.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--no-overlay", is_flag=True, help="Skip overlay.mp4.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@handle_errors
def track(source, out, model, recipe, landmarks, detector, device, start, end, every, overrides, no_overlay, quiet):
    """Track a VIDEO or FRAMES_DIR: writes OUT/track.npz, OUT/track.json, OUT/overlay.mp4 (resumable)."""
    from fitter.fit import load_flame
    from fitter.io import FrameSource
    from fitter.track import track_video, write_track_outputs

    check_device(device)
    flame = load_flame(model, device)
    frames = FrameSource(source, start, end, every)
    with TrackProgress(quiet) as progress:
        result = track_video(frames, out, recipe=recipe, model=flame, landmarks=landmarks, detector=detector,
                             device=device, progress=progress, overrides=overrides)
        folder = write_track_outputs(out, result, flame, frames, overlay=not no_overlay, progress=progress)
    rep = result.report
    for warning in result.warnings[:5]:
        console.print(f"[yellow]warning:[/] {warning}")
    if len(result.warnings) > 5:
        console.print(f"[yellow]warning:[/] ... and {len(result.warnings) - 5} more, see {folder}/track.json")
    if not quiet:
        resumed = f", {rep['frames'] - result.fitted_frames} resumed" if rep["resumed"] else ""
        console.print(f"[green]tracked[/] {rep['frames']} frames ({rep['frames_ok']} with a face{resumed}) -> "
                      f"{folder}  ({rep['seconds']:.1f} s, mean landmark RMSE {rep['landmark_rmse_px_mean']} px)")


class TrackProgress(StageProgress):
    """StageProgress that redraws every frame (tracking and overlay steps are slow, and few)."""

    def __call__(self, stage: str, it: int, total: int, losses: dict):
        if stage in ("read", "track", "overlay") and self.progress is not None:
            key = (self.label, stage)
            if key not in self.tasks:
                self.tasks[key] = self.progress.add_task(stage, total=total, losses="")
            text = " ".join(f"{k}={v:.3g}" for k, v in losses.items())
            self.progress.update(self.tasks[key], completed=it, total=total)  # 'read' learns its total as it goes
            self.progress.update(self.tasks[key], losses=self._fit_losses(text))
            return
        super().__call__(stage, it, total, losses)


if __name__ == "__main__":
    main()
