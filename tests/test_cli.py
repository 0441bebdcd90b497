"""The command contract: examples in --help that parse, the shared options, --workers, the batch skeleton."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.batch import BatchRun, UsageError, record_matches
from pipeline.cli import build_config, main
from pipeline.config import ConfigError, load_config
from pipeline.executor import available_cores, make_executor, resolve_workers

ROOT = Path(__file__).resolve().parents[1]
#: Commands without --config/--set, and the README says why.
NO_CONFIG = {"synth", "classify", "export"}


def _help(args: list[str]) -> str:
    r = CliRunner().invoke(main, [*args, "--help"], prog_name="wsi-pipeline")
    assert r.exit_code == 0, r.output
    return r.output


def help_examples() -> list[tuple[str, str]]:
    """``(where, command line)`` of every example in the top-level and every command's --help
    (lines starting ``wsi-pipeline``, or the ``wsi-pipeline`` part of a ``torchrun`` line, with ``\\``
    continuations joined)."""
    out = []
    for args in ([], *([name] for name in sorted(main.commands))):
        lines = iter(_help(args).splitlines())
        for line in lines:
            line = line.strip()
            if line.startswith("torchrun ") and " wsi-pipeline -- " in line:  # the command torchrun starts
                line = "wsi-pipeline " + line[line.index(" wsi-pipeline -- ") + len(" wsi-pipeline -- "):]
            if not line.startswith("wsi-pipeline "):
                continue
            while line.endswith("\\"):
                line = line[:-1] + " " + next(lines).strip()
            out.append((" ".join(args) or "top-level", line))
    return out


def parse_only(argv: list[str]) -> click.Context:
    """Parse a command line as ``wsi-pipeline`` would, without running the command."""
    parent = main.make_context("wsi-pipeline", argv[:1])
    cmd = main.get_command(parent, argv[0])
    assert cmd is not None, f"no command {argv[0]!r}"
    return cmd.make_context(argv[0], argv[1:], parent=parent)


def test_every_help_example_parses(tmp_path, monkeypatch):
    """Each example in the help texts is a valid command line (a wrong flag or a missing
    required option fails here); files an option requires to exist are created first."""
    examples = help_examples()
    where = {w for w, _ in examples}
    assert where == {"top-level", *main.commands}, f"commands without examples: {set(main.commands) - where}"
    monkeypatch.chdir(tmp_path)
    for w, line in examples:
        argv = shlex.split(line, comments=True)[1:]
        cmd = main.commands[argv[0]]
        for p in cmd.params:
            if isinstance(p.type, click.Path) and p.type.exists:
                for opt in p.opts:
                    if opt in argv:
                        Path(argv[argv.index(opt) + 1]).touch()
        try:
            ctx = parse_only(argv)
            if "set_items" in ctx.params:  # the config and --set values are checked too
                build_config(ctx.params["config_path"], ctx.params["set_items"], {})
        except (click.ClickException, ConfigError) as exc:
            msg = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
            pytest.fail(f"example in the help of {w} does not parse: {line}\n  {msg}")


def test_a_wrong_example_would_fail():
    with pytest.raises(click.UsageError, match="No such option"):
        parse_only(["demo", "--out", "demo-out"])  # the old top-level example
    with pytest.raises(click.UsageError, match="run_dir"):
        parse_only(["em-round", "--stores", "s", "--labels", "l.csv"])


def test_every_command_keeps_the_contract():
    """--quiet everywhere; --config/--set wherever a command has settings, and the README names
    the commands that don't and says why."""
    for name, cmd in main.commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        assert "--quiet" in opts, name
        assert ("--config" in opts and "--set" in opts) == (name not in NO_CONFIG), name
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"takes `--config FILE\|NAME`.*?`--set section.key=value`.*?\n\n", readme, re.S)
    assert m, "README: the paragraph on the options every command takes"
    for name in NO_CONFIG:
        assert f"`{name}`" in m.group(0), f"README does not say why {name} takes no --config"


def test_evaluate_and_synth_options_do_something(tmp_path):
    cfg_ctx = parse_only(["evaluate", "--predictions", "p.csv", "--labels", "l.csv", "--config", "tiny",
                          "--set", "em.positive_classes=[Metastasis]"])
    assert cfg_ctx.params["config_path"] == "tiny" and cfg_ctx.params["set_items"] == ("em.positive_classes=[Metastasis]",)
    # synth: --quiet silences the progress line, the summary stays
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--positives", "1", "--negatives", "0",
                                  "--size-px", "1024", "--annotated", "0"])
    assert r.exit_code == 0, r.output
    assert "generating 1 slides" in r.output and "wrote 1 slides" in r.output
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "c"), "--positives", "1", "--negatives", "0",
                                  "--size-px", "1024", "--annotated", "0", "--quiet"])
    assert r.exit_code == 0 and "generating" not in r.output and "wrote 1 slides" in r.output


# --------------------------------------------------------------------------- --workers


@pytest.mark.parametrize("command", ["tile", "classify", "demo"])
def test_workers_minus_one_is_all_cores(command):
    argv = {"tile": ["tile", "s", "--out", "o"], "classify": ["classify", "s", "--run", "r", "--out", "o"],
            "demo": ["demo"]}[command]
    assert parse_only([*argv, "--workers", "-1"]).params["workers"] == available_cores()
    assert parse_only([*argv, "--workers", "3"]).params["workers"] == 3
    r = CliRunner().invoke(main, [*argv, "--workers", "-2"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: --workers -2: use -1 (all cores), 0 (one task at a time in this thread) or a number >= 1"
    ]


def test_runtime_workers_minus_one_in_config_and_executor():
    assert load_config(None, {"runtime.workers": -1}).runtime.workers == -1
    with pytest.raises(ConfigError, match="runtime.workers must be >= -1"):
        load_config(None, {"runtime.workers": -2})
    assert resolve_workers(-1) == available_cores() >= 1
    assert resolve_workers(0) == 0
    with pytest.raises(UsageError):
        resolve_workers(-5)
    with make_executor(-1) as ex:
        assert ex.n_workers == available_cores()


# --------------------------------------------------------------------------- batch skeleton


def test_batch_run_skeleton(tmp_path):
    out = tmp_path / "out"
    (out / "slides").mkdir(parents=True)
    (out / ".tmp-a-1-ff.zarr").mkdir()
    (out / "slides" / ".tmp-x.json").write_text("{}")
    (out / "slides" / "kept.json").write_text("{}")
    with BatchRun("classify", out, {"k": 1}, progress=False) as run:
        assert run.claim("a").ok
        with BatchRun("classify", out, {}, progress=False) as other:  # a second job shares the folder
            assert other.clean() == [] and not other.claim("a").ok
            other.outcome("a", "a.svs", "busy", "being processed by another job")
        run.release("a")
        assert [p.name for p in run.clean("slides")] == [".tmp-x.json"]
        assert [p.name for p in run.clean()] == [".tmp-a-1-ff.zarr"]
        run.start(3)
        run.outcome("b", "b.svs", "done", seconds=1.23456, n_tiles=4)
        run.outcome("a", "a.svs", "failed", "a.svs: damaged")
        run.outcome("c", "c.svs", "skipped", "current")
    assert (out / "slides" / "kept.json").exists()
    rep = json.loads((out / "classify-report.json").read_text())
    assert [s["slide_id"] for s in rep["slides"]] == ["a", "b", "c"]
    assert rep["counts"] == {"done": 1, "skipped": 1, "failed": 1}  # the other job's 'busy' a gives way
    assert len(rep["runs"]) == 2
    assert rep["slides"][1]["seconds"] == 1.235 and rep["slides"][1]["details"] == {"n_tiles": 4}
    assert rep["settings"] == {"k": 1} and rep["finished_utc"]
    assert len(list((out / "reports").glob("classify-*.json"))) == 2
    # a run that raises writes no report and releases its leases
    with pytest.raises(RuntimeError):
        with BatchRun("tile", out, {}, progress=False) as run:
            assert run.claim("a").ok
            raise RuntimeError("boom")
    assert not (out / "tile-report.json").exists() and not (out / ".wsi-pipeline.leases").exists()


def test_record_matches():
    rec = {"format": "f", "format_version": 2, "hash": "h", "complete": True}
    assert record_matches(rec, "f", (1, 2), hash="h", complete=True)
    assert not record_matches(rec, "f", (1,), hash="h")
    assert not record_matches(rec, "g", (2,))
    assert not record_matches(rec, "f", (2,), hash="other")
    assert not record_matches(None, "f", (2,))
