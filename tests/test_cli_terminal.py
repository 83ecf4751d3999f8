"""What a user's terminal shows (issue 13, points 3 and 6): doctor at 80 columns never cuts a path,
URL or command, and progress bars name every stage in full."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import cli
from priors.doctor import doctor_items

REPO = Path(__file__).resolve().parent.parent


def _copyable(text: str) -> list[str]:
    """What a user copies out of a detail or fix: paths, URLs and `commands`, as whole strings."""
    commands = re.findall(r"`[^`]+`", text)
    rest = re.sub(r"`[^`]+`", " ", text)
    paths = [w.strip(",;:()") for w in rest.split() if "/" in w]
    return commands + [p for p in paths if p]


def test_wrap_whole_words_hand_checked():
    text = "fix: copy https://example.org/a/very/long/url/that/does/not/fit.pth into /x/y; then `run this command`"
    lines = cli.wrap_whole_words(text, 30, "  ")
    assert lines == ["  fix: copy",
                     "  https://example.org/a/very/long/url/that/does/not/fit.pth",
                     "  into /x/y; then",
                     "  `run this command`"]
    assert " ".join(line.strip() for line in lines) == text  # nothing dropped or shortened
    assert cli.wrap_whole_words("a b c", 80) == ["a b c"] and cli.wrap_whole_words("", 80) == []


def test_doctor_at_80_columns_prints_every_path_url_and_command_whole(tmp_path, monkeypatch):
    home = tmp_path / "a-flamefit-home-folder-with-a-long-name" / "nested-deeper-than-eighty-columns-allow"
    torch_home = tmp_path / "torch-home-with-a-long-name-so-the-checkpoint-paths-pass-eighty-columns"
    env = {**os.environ, "COLUMNS": "80", "FLAMEFIT_HOME": str(home), "TORCH_HOME": str(torch_home),
           "OMP_NUM_THREADS": "1"}
    env.pop("FLAMEFIT_MODEL", None)
    r = subprocess.run([sys.executable, "cli.py", "doctor"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "…" not in out, out
    monkeypatch.setenv("FLAMEFIT_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    items = doctor_items()
    missing = [i for i in items if not i.ok]
    assert missing and any(len(i.fix) > 80 for i in missing)  # the case that used to be cut
    lines = out.splitlines()
    for item in items:
        assert item.name in out
        for text in (item.detail, *([item.fix] if not item.ok else [])):
            for piece in _copyable(text):
                assert any(piece in line for line in lines), f"{piece!r} not whole on one line:\n{out}"
    for line in lines:  # wrapped at 80, except one unbreakable word standing alone
        assert len(line.rstrip()) <= 80 or len(line.split()) == 1 or line.strip().startswith("`"), line


# ----------------------------------------------------------------------------- progress
def test_fit_set_progress_hears_preparation_and_every_stage_with_losses(photo_set, standin_model):
    from fitter.fitset import fit_set
    from fitter.recipe import load_recipe

    folder, cases = photo_set
    overrides = ["resolution=96", "stages.photometric.iterations=0", "stages.rigid.iterations=12",
                 "stages.landmarks.iterations=25", "stages.rigid.patience=0", "stages.landmarks.patience=0"]
    events = []
    fit_set([c[0] for c in cases], model=standin_model, detector="file", landmarks=folder, overrides=overrides,
            progress=lambda stage, it, total, losses: events.append((stage, it, total, dict(losses))))
    assert events[:2] == [("prepare", 1, 2, {}), ("prepare", 2, 2, {})]  # one tick per image, before fitting
    stages = [s.name for s in load_recipe("identity-set", overrides).stages if s.iterations > 0]
    assert stages == ["rigid", "landmarks"]
    seen = [e[0] for e in events[2:]]
    assert sorted(set(seen), key=seen.index) == stages  # stage after stage, in recipe order
    for name, n in (("rigid", 12), ("landmarks", 25)):
        mine = [e for e in events if e[0] == name]
        assert [e[1] for e in mine] == list(range(1, n + 1)) and {e[2] for e in mine} == {n}
        assert all(e[3] and all(np.isfinite(v) for v in e[3].values()) for e in mine)
        assert "landmark" in mine[0][3]
    landmarks = [e[3]["landmark"] for e in events if e[0] == "landmarks"]
    assert landmarks[-1] < landmarks[0]  # live values: the loss falls as the stage runs


def test_stage_progress_bars_keep_stage_names_and_counts_whole_at_80_columns(monkeypatch):
    from io import StringIO

    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(file=StringIO(), width=80, force_terminal=True))
    long_losses = {"landmark": 0.0949, "eye_closure": 0.00596, "lip_distance": 0.02584, "shape_prior": 0.1234}
    with cli.StageProgress(False, label="set") as progress:
        progress("prepare", 3, 3, {})
        progress("rigid", 60, 60, {"landmark": 0.1177})
        progress("landmarks", 120, 250, long_losses)
        shown = Console(file=StringIO(), width=80, record=True)
        shown.print(progress.progress.make_tasks_table(progress.progress.tasks))
    lines = shown.export_text().splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith("set prepare ") and "3/3" in lines[0]
    assert lines[1].startswith("set rigid ") and "60/60" in lines[1] and "landmark=0.1177" in lines[1]
    assert lines[2].startswith("set landmarks ") and "120/250" in lines[2] and "landmark=0.0949" in lines[2]
