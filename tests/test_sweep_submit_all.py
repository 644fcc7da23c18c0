"""The README's `make submit-all` line with every dataset outside ~/data: the command make expands
it to runs dry, and the evaluate cells point at the overridden folders (the [[evaluate]] entries
that name a dataset follow --data; brain-tumor-mri takes --evaluate btm=PATH)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dataset
from PIL import Image

from brainhpc.errors import BrainhpcError
from brainhpc.sweep.config import load_sweep
from brainhpc.sweep.plan import expand

REPO = Path(__file__).resolve().parent.parent


def _png(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24), value, np.uint8)).save(path)


def tiny_datasets(root: Path) -> dict[str, Path]:
    """A few tiny images in each layout: br35h (yes/ no/), lgg (kaggle_3m/ case folders with
    masks), brain-tumor-mri (Training/ four class folders)."""
    br35h, lgg, btm = root / "br35h", root / "lgg-flair", root / "btm" / "Training"
    for i in range(2):
        _png(br35h / "yes" / f"y{i}.png", 120)
        _png(br35h / "no" / f"no{i}.png", 60)
        case = "TCGA_CS_4941_19960909"
        _png(lgg / "kaggle_3m" / case / f"{case}_{i + 1}.png")
        _png(lgg / "kaggle_3m" / case / f"{case}_{i + 1}_mask.png", 255 * i)
        for cls in ("glioma", "meningioma", "pituitary", "notumor"):
            _png(btm / cls / f"{cls}{i}.png")
    return {"br35h": br35h, "lgg": lgg, "btm": btm}


def readme_command() -> str:
    """The README's `make submit-all ...` line (comment dropped)."""
    text = (REPO / "README.md").read_text()
    lines = [x for x in text.splitlines() if x.startswith("make submit-all ")]
    assert len(lines) == 1, "README.md should show one `make submit-all` line"
    return lines[0].split("  #")[0].strip()


def expanded(line: str, paths: dict[str, Path], run_dir: Path) -> list[str]:
    """The python command `make` runs for the README's line, PATHs filled in order, --dry-run,
    into ``run_dir`` (make -n, installation step left out; .venv's python -> this one)."""
    for name in ("br35h", "lgg", "btm"):
        line = line.replace(f"{name}=PATH", f"{name}={paths[name]}")
    assert "PATH" not in line, f"a PATH of the README's line is not filled: {line}"
    args = shlex.split(line)[1:] + [f"RUN_DIR={run_dir}"]
    assert "SUBMIT_ARGS=--dry-run" in args
    if shutil.which("make") is None:
        pytest.skip("no make here (README: the project needs it)")
    out = subprocess.run([shutil.which("make"), "-s", "-n", "-o", ".venv/.installed", *args],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PATH": "/nonexistent"}).stdout
    cmd = shlex.split(out.replace("\\\n", " "))
    assert cmd[:3] == [".venv/bin/python", "-m", "brainhpc.sweep"], out
    return [sys.executable, *cmd[1:]]


def run_dry(cmd: list[str], home: Path, tmp_path: Path) -> str:
    """Run it with an empty $HOME (no ~/data) and no SLURM client on PATH (the dry run then
    checks nothing against a cluster, whatever this machine runs)."""
    nobin = tmp_path / "nobin"
    nobin.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "PATH": str(nobin),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def evaluate_cells(out: str) -> dict[str, str]:
    """cell id -> data=... of the evaluate cells the dry run lists."""
    part = out.split("== evaluate:")[1].split("resources:")[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^  (\S+)\s+\[\w+\] .*?data=([^,\s]+)",
                                                        part, re.M)}


def _check(out: str, paths: dict[str, Path]) -> None:
    cells = evaluate_cells(out)
    assert cells == {"br35h/lgg": str(paths["lgg"].resolve()),
                     "br35h/btm": str(paths["btm"].resolve()),
                     "lgg/br35h": str(paths["br35h"].resolve()),
                     "lgg/btm": str(paths["btm"].resolve())}, cells
    assert "~/data" not in out and "/data/br35h" not in out
    for name in ("br35h", "lgg", "btm"):  # bound read-only into the container
        path = str(paths[name].resolve())
        assert f"{path}:{path}:ro" in out, name


def test_readme_submit_all_with_data_elsewhere(tmp_path):
    paths = tiny_datasets(tmp_path / "elsewhere")
    home = tmp_path / "home"
    home.mkdir()
    cmd = expanded(readme_command(), paths, tmp_path / "run")
    out = run_dry(cmd, home, tmp_path)
    _check(out, paths)
    assert "not checked against a cluster: no SLURM client here" in out


def test_readme_submit_all_with_the_shared_real_datasets(tmp_path):
    paths = {"br35h": shared_dataset("br35h"), "lgg": shared_dataset("lgg-flair"),
             "btm": shared_dataset("brain-tumor-mri")}
    if None in paths.values():
        pytest.skip("the shared real datasets (../shared/datasets) are not here")
    paths["btm"] = paths["btm"] / "Training"
    home = tmp_path / "home"
    home.mkdir()
    _check(run_dry(expanded(readme_command(), paths, tmp_path / "run"), home, tmp_path), paths)


def test_evaluate_entries_follow_data_or_their_own_override(tmp_path, monkeypatch):
    """dataset = "X" follows --data X=PATH and inherits X's labels; --evaluate NAME=PATH moves
    any entry with a folder; unknown names and phantom entries are refused, naming them."""
    paths = tiny_datasets(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    text = ('name = "x"\nprofile = "local"\n[data.a]\npath = "~/data/a"\n'
            'labels = "tumour=yes healthy=no"\n[data.b]\nphantom = 40\n'
            '[[classify.cells]]\nmodel = "cnn"\ntrain_data = ["real"]\n'
            '[[evaluate]]\nname = "a"\ndataset = "a"\ndatasets = ["b"]\n'
            '[[evaluate]]\nname = "far"\npath = "~/data/far"\n')
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(BrainhpcError, match=r"data\.a.*--data a=PATH"):
        load_sweep(path)
    with pytest.raises(BrainhpcError, match=r"evaluate\[1\]\.path .*override with --evaluate "
                                            r"far=PATH"):
        load_sweep(path, data=[f"a={paths['br35h']}"])
    s = load_sweep(path, data=[f"a={paths['br35h']}"], evaluate=[f"far={paths['btm']}"])
    a, far = s.evaluate
    assert a.path == paths["br35h"].resolve() and a.labels == "tumour=yes healthy=no"
    assert far.path == paths["btm"].resolve() and far.labels is None
    plan = expand(s, tmp_path / "run")
    assert {c.id: c.params["data"] for c in plan["evaluate"]} == {
        "b/a": str(paths["br35h"].resolve()), "a/far": str(paths["btm"].resolve()),
        "b/far": str(paths["btm"].resolve())}
    again = load_sweep(path, data=[f"a={paths['br35h']}"],
                       evaluate=[f"far={paths['btm']}", f"a={paths['lgg']}"])
    assert again.evaluate[0].path == paths["lgg"].resolve()  # --evaluate wins over dataset
    for bad, match in ((["nope=/x"], "has no \\[\\[evaluate\\]\\] entry 'nope'; its entries: "
                                     "a, far"), (["far"], "expected NAME=PATH")):
        with pytest.raises(BrainhpcError, match=match):
            load_sweep(path, data=[f"a={paths['br35h']}"], evaluate=bad)
    for entry, match in (('dataset = "b"', "dataset 'b' is phantom slices"),
                         ('dataset = "z"', "unknown dataset 'z'; datasets of this sweep: a, b"),
                         ('dataset = "a"\npath = "/x"', "exactly one of path .*dataset")):
        path.write_text(text.replace('dataset = "a"', entry))
        with pytest.raises(BrainhpcError, match=match):
            load_sweep(path, data=[f"a={paths['br35h']}"], evaluate=[f"far={paths['btm']}"])
