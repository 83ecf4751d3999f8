"""What a user's terminal shows (issue 13, points 3 and 6): doctor at 80 columns never cuts a path,
URL or command, and progress bars name every stage in full."""

import os
import re
import subprocess
import sys
from pathlib import Path

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
