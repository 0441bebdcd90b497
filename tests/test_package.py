"""The package as a user installs it: a wheel, outside the checkout, with and without the train extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wsi", "pipeline", "models")


def _env_without_checkout() -> dict:
    """The environment minus anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _copy_source(dst: Path) -> Path:
    """What the wheel is built from, copied so that the build leaves nothing in the checkout."""
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in (*PACKAGES, "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _fresh_venv(path: Path) -> tuple[Path, Path]:
    """A venv that sees this environment's dependencies through a .pth file (a plain path line:
    the .pth files there, such as the checkout's editable install, are not run) and has nothing
    of its own; returns its python and its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    vpy = path / "bin" / "python"
    vsite = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (vsite / "_deps_of_the_test_environment.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return vpy, vsite


def _pip_install(vpy: Path, *args: str) -> None:
    """This environment's pip installing into the venv of ``vpy``, offline, without dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q",
                    *args], check=True, env=_env_without_checkout())


_PROBE = (
    "import json, pipeline, wsi, models\n"
    "from pipeline.config import builtin_configs, load_config\n"
    "cfg = load_config('tiny')\n"
    "print(json.dumps({'files': [pipeline.__file__, wsi.__file__, models.__file__],\n"
    "                  'configs': str(builtin_configs()), 'tile_px': cfg.tiling.tile_px,\n"
    "                  'seg_arch': cfg.model.seg_arch}))\n"
)


def _probe(vpy: Path, cwd: Path) -> dict:
    """Where the venv's packages and built-in configs come from, and tiny.yaml's values."""
    r = subprocess.run([str(vpy), "-c", _PROBE], cwd=cwd, env=_env_without_checkout(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert (got["tile_px"], got["seg_arch"]) == (128, "dla34_up_tiny")  # tiny.yaml's values, not the defaults
    return got


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    """A wheel holds every module and the built-in configs; installed into a fresh venv it runs
    `wsi-pipeline --help`, `load_config("tiny")` and `--config tiny` from another folder."""
    (tmp_path / "src").mkdir()
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    # No build isolation: the build uses this environment's setuptools (no registry needed).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(src)], check=True, env=_env_without_checkout())
    (wheel,) = dist.glob("wsi_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules and modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    configs = {f"pipeline/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert {"pipeline/configs/default.yaml", "pipeline/configs/tiny.yaml"} <= configs <= names

    venv = tmp_path / "venv"
    vpy, vsite = _fresh_venv(venv)
    _pip_install(vpy, str(wheel))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env_without_checkout()
    r = subprocess.run([str(venv / "bin" / "wsi-pipeline"), "--help"], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wsi-pipeline demo demo-out" in r.stdout

    got = _probe(vpy, elsewhere)
    for f in got["files"]:  # the wheel's code, not the checkout's editable install
        assert Path(f).resolve().is_relative_to(vsite.resolve()), f
    assert Path(got["configs"]).resolve() == (vsite / "pipeline" / "configs").resolve()

    # --config tiny through the command line of the installed package
    r = subprocess.run([str(venv / "bin" / "wsi-pipeline"), "tile", "nowhere", "--out", "stores", "--config", "tiny"],
                       cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: nowhere: no such file or folder", r.stderr
    r = subprocess.run([str(venv / "bin" / "wsi-pipeline"), "tile", "nowhere", "--out", "stores", "--config", "tinny"],
                       cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "built-in names [" in r.stderr and "'tiny'" in r.stderr, r.stderr


def test_editable_install_reads_the_checkouts_configs_folder(tmp_path):
    """`pip install -e` (what `make setup` does) maps pipeline.configs to the top-level configs/."""
    (tmp_path / "src").mkdir()
    src = _copy_source(tmp_path / "src")
    vpy, _ = _fresh_venv(tmp_path / "venv")
    _pip_install(vpy, "--no-build-isolation", "-e", str(src))
    (tmp_path / "elsewhere").mkdir()
    got = _probe(vpy, tmp_path / "elsewhere")
    assert Path(got["files"][0]).resolve() == (src / "pipeline" / "__init__.py").resolve()
    assert Path(got["configs"]).resolve() == (src / "configs").resolve()


@pytest.mark.parametrize(
    "argv",
    [
        ["em-round", "--stores", "s", "--labels", "l.csv", "--run", "r"],
        ["classify", "slides", "--run", "r", "--out", "o"],
        ["demo", "d"],
    ],
    ids=lambda a: a[0],
)
def test_training_commands_without_torch_name_the_extra(tmp_path, argv):
    """Without PyTorch (an install without the train extra) the commands that run the networks
    stop in one line that says what to install, exit code 2, before doing any work."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # what an environment without PyTorch looks like to import\n"
        "from pipeline.cli import main\n"
        "main(sys.argv[1:], prog_name='wsi-pipeline')\n"
    )
    env = {**_env_without_checkout(), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: wsi-pipeline {argv[0]} needs PyTorch (torch is not installed): pip install 'wsi-pipeline[train]'"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_other_commands_run_without_torch(tmp_path):
    """synth, tile and evaluate need no PyTorch (the first two run here), and every command's
    --help works without it."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from click.testing import CliRunner\n"
        "from pipeline.cli import main\n"
        "for cmd in ([], *([c] for c in main.commands)):\n"
        "    r = CliRunner().invoke(main, [*cmd, '--help'])\n"
        "    assert r.exit_code == 0, (cmd, r.output)\n"
        "r = CliRunner().invoke(main, ['synth', 'cohort', '--positives', '1', '--negatives', '0', '--size-px', '1024',\n"
        "                              '--annotated', '0', '--quiet'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(main, ['tile', 'cohort', '--out', 'stores', '--config', 'tiny', '--workers', '0', '-q'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import pipeline.evaluate\n"
        "assert sys.modules['torch'] is None\n"
    )
    env = {**_env_without_checkout(), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "stores").glob("*.zarr"))) == 1
