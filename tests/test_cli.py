"""The command line in daily use: --version, --debug after the subcommand, eval's options (help and defaults that
match the function they call), methods --option, and --help that loads no torch."""

from __future__ import annotations

import argparse
import inspect
import json
import re
import subprocess
import sys

import pytest
import yaml

from advtransfer import __version__
from advtransfer.cli import main, parser
from advtransfer.errors import UserError

COMMANDS = ["demo", "run", "pretrain", "eval", "methods", "report", "sweep", "fetch-data"]
TINY = ["img_size=28", "patch_size=7", "in_chans=1", "embed_dim=32", "depth=2", "num_heads=2", "mlp_ratio=2.0"]


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("where", [[], ["run"], ["eval"]])
def test_version_before_or_after_the_subcommand(capsys, where):
    assert main([*where, "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"advtransfer {__version__}"


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"attack": {"eps": 0}}))
    argv = ["run", str(cfg), "--out", str(tmp_path / "run")]
    assert main(argv) == 2 and "attack.eps" in capsys.readouterr().err
    with pytest.raises(UserError, match="attack.eps"):
        main([*argv, "--debug"])
    with pytest.raises(UserError, match="attack.eps"):
        main(["--debug", *argv])


def test_every_option_has_help_and_shows_its_default():
    for name in COMMANDS:
        sub = subcommand(name)
        text = sub.format_help()
        for action in sub._actions:
            assert action.help, (name, action.dest)
            shown = action.default not in (None, "", [], False, argparse.SUPPRESS)
            if shown and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()) or "default" in action.help, action


def test_eval_defaults_are_the_functions_defaults():
    """Each ``eval`` option defaults to what ``eval_checkpoint`` does when called without it."""
    from advtransfer.evalrun import eval_checkpoint

    params = inspect.signature(eval_checkpoint).parameters
    args = subcommand("eval").parse_args(["--checkpoint", "x", "--data", "y"])
    for key, value in vars(args).items():
        if key in ("checkpoint", "data", "kwargs", "debug"):
            continue
        default = params[key].default
        if key in ("attacks", "aa_attacks"):
            value = tuple(v for v in value.split(",") if v)
        elif key in ("mean", "std"):
            value = tuple(float(v) for v in value.split(",") if v)
        assert value == (tuple(default) if isinstance(default, tuple | list) else default), key


def _counts(capsys, *options: str) -> dict[str, int]:
    assert main(["methods", "--backbone", "vit_tiny_patch16_224", *TINY, "--num-classes", "10", *options]) == 0
    rows = re.findall(r"^\| (\S+) \| ([\d,]+) \|", capsys.readouterr().out, re.M)
    return {k: int(v.replace(",", "")) for k, v in rows}


def test_methods_option_reaches_the_methods_that_take_it(capsys):
    r2, r4 = _counts(capsys, "--option", "rank=2"), _counts(capsys, "--option", "rank=4")
    head = r2["linear"]
    assert r4["lora"] - head == 2 * (r2["lora"] - head) > 0  # LoRA's parameters grow linearly with its rank
    assert {k: v for k, v in r2.items() if k != "lora"} == {k: v for k, v in r4.items() if k != "lora"}
    vpt = _counts(capsys, "--option", "num_prompts=3")["vpt"]
    assert vpt - head == 3 * 32 * 2  # three 32-dim prompt tokens in each of the 2 blocks (deep VPT)


def test_help_loads_no_torch_and_every_command_has_it():
    code = (
        "import contextlib, io, json, sys\n"
        "from advtransfer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    codes = [main([*c, '--help']) for c in [[], *[[n] for n in {COMMANDS!r}]]]\n"
        "heavy = {'torch', 'timm', 'peft', 'torchvision', 'pyautoattack', 'safetensors', 'matplotlib'}\n"
        "print(json.dumps([codes, sorted(heavy & {m.split('.')[0] for m in sys.modules}), out.getvalue()]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    codes, heavy, text = json.loads(p.stdout)
    assert codes == [0] * (len(COMMANDS) + 1) and heavy == []
    assert text.count("usage: advtransfer") == len(COMMANDS) + 1
    # the console entry point too, seen by the interpreter's own import log
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "advtransfer", "run", "--help"], capture_output=True, text=True
    )
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in p.stderr.splitlines() if "|" in line}
    assert p.returncode == 0 and "advtransfer" in imported and not imported & {"torch", "timm", "peft"}


def test_fetch_data_verifies_the_embedded_datasets(capsys):
    """What ``make data`` runs: with the data in place (the suite's $ADVTRANSFER_DATA) it verifies both checksums."""
    assert main(["fetch-data"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["mnist", "fashion-mnist"]
    assert all(ln.endswith("(sha256 verified)") for ln in lines)
