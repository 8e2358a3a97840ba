from dataclasses import dataclass, field

import pytest

from lmstack.cli.main import main
from lmstack.cli.options import Parser, add_options, build_options, from_dict
from lmstack.utils import LmstackError


@dataclass
class Opts:
    max_steps: int = 10
    lr: float = 1e-3
    name: str = field(default="x", metadata={"help": "run name"})
    compile: bool = False


def test_recipe_then_flags_override(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("max_steps: 50\nlr: 0.01\n")
    p = Parser()
    add_options(p, Opts)
    o = build_options(Opts, p.parse_args(["--recipe", str(r), "--lr", "0.5", "--compile", "true"]))
    assert o == Opts(max_steps=50, lr=0.5, name="x", compile=True)


def test_unknown_recipe_key_lists_valid(tmp_path):
    with pytest.raises(LmstackError, match=r"unknown recipe key 'max_step'.*did you mean 'max_steps'.*valid keys"):
        from_dict(Opts, {"max_step": 3})


def test_bad_value_names_key():
    with pytest.raises(LmstackError, match="option max_steps"):
        from_dict(Opts, {"max_steps": "many"})


def test_unknown_flag_lists_valid(capsys):
    p = Parser(prog="t")
    add_options(p, Opts)
    with pytest.raises(SystemExit):
        p.parse_args(["--max-step", "3"])
    err = capsys.readouterr().err
    assert "unknown option --max-step" in err and "--max-steps" in err


def test_every_subcommand_has_help(capsys):
    from lmstack.cli.main import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_unknown_flag_on_nested_subcommand_lists_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--vocab-sise", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --vocab-sise" in err and "did you mean --vocab-size" in err


def test_bare_boolean_flag_means_true():
    p = Parser()
    add_options(p, Opts)
    assert build_options(Opts, p.parse_args(["--compile"])).compile is True
    assert build_options(Opts, p.parse_args(["--compile", "false"])).compile is False


def test_output_closed_early_is_not_a_traceback(tmp_path):
    # `lmstack ... | head`: the reader goes away; the command must exit quietly.
    import subprocess
    import sys
    big = tmp_path / "big.txt"
    big.write_text("hello world, " * 20000)
    cmd = f"{sys.executable} -m lmstack.cli.main tokenizer viz --file {big} | head -c 10"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr
