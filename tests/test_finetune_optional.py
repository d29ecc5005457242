"""The core package and the command line never import torch (it is the optional extra [finetune])."""
import subprocess
import sys

CORE = ["bowretrieval", "bowretrieval.config", "bowretrieval.imageio", "bowretrieval.revisited",
        "bowretrieval.pipeline", "bowretrieval.cli_finetune"]


def test_core_modules_and_cli_do_not_load_torch():
    code = (
        "import importlib, importlib.util, sys\n"
        f"for m in {CORE!r} + ['bowretrieval.cli']:\n"
        "    if importlib.util.find_spec(m) is not None:\n"
        "        importlib.import_module(m)\n"
        "if importlib.util.find_spec('bowretrieval.cli') is not None:\n"
        "    import bowretrieval.cli as c\n"
        "    c.build_parser()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_finetune_parser_registers_without_torch():
    code = (
        "import argparse, sys\n"
        "from bowretrieval import cli_finetune\n"
        "p = argparse.ArgumentParser(); cli_finetune.register(p.add_subparsers())\n"
        "a = p.parse_args(['finetune', 'train', '--tuples', 'x', '--workdir', 'y', '--set', 'train.epochs=2'])\n"
        "print(a.set, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['train.epochs=2'] False"
