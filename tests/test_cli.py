"""One voice across the stage scripts: each parses its `Config` dataclass with common.parse_config, so
`--help` shows the usage docstring and every flag with its help and default; choices are Literal and the
parser refuses a wrong one; config blocks stay within 100 columns; the same idea has the same flag name."""

import ast
import dataclasses
import os
import runpy
import sys
import typing

import pytest

from conftest import ROOT

SCRIPTS = ["sft.py", "rl.py", "evaluate.py", "distill.py"]
# Old or drifted names of ideas that have one name everywhere now (the right one after the arrow):
# split -> dataset_split, epochs -> num_epochs, lr_schedule -> lr_scheduler, freeze_vision ->
# freeze_vision_tower, freeze_merger -> freeze_projector, vLLM-only options -> vllm_*, the batch of one
# hf `generate` call -> generation_batch_size, the work per flushed call -> items_per_call.
RETIRED = {"split", "epochs", "lr_schedule", "freeze_vision", "freeze_merger", "tensor_parallel_size",
           "gpu_memory_utilization", "max_model_len", "kv_cache_memory_bytes", "gen_batch_size",
           "questions_per_call", "batch_size"}
CHOICE_FIELDS = {"backend", "prompt_template", "lr_scheduler", "report_to", "on_bad_row", "overlong",
                 "attn_implementation", "save_dtype"}  # must be Literal where a script has them


def source(script: str) -> str:
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        return f.read()


def config_class(script: str):
    """The script's Config dataclass, read without running its main."""
    module = runpy.run_path(os.path.join(ROOT, script), run_name="config_only")
    assert "Config" in module, f"{script}: no dataclass named Config"
    return module["Config"], module.get("__doc__") or ""


def run_cli(script: str, args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the script's `if __name__ == "__main__"` block in this process (only parsing happens: every
    call here exits in the parser). Returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps help at the terminal width: one line per flag
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def option_blocks(help_text: str) -> dict:
    """`--flag` -> its help entry (the lines up to the next option), whitespace collapsed."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = []
        if current:
            blocks[current].append(line)
    return {k: " ".join(" ".join(v).split()) for k, v in blocks.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_usage_and_every_flag(script, monkeypatch, capsys):
    cls, doc = config_class(script)
    code, out, _ = run_cli(script, ["--help"], monkeypatch, capsys)
    assert code == 0
    first_line = doc.strip().splitlines()[0]
    assert first_line in out, f"{script} --help does not show its usage docstring"
    blocks = option_blocks(out)
    for f in dataclasses.fields(cls):
        block = blocks.get(f"--{f.name}")
        assert block is not None, f"{script}: --{f.name} missing from --help"
        help_text = " ".join(f.metadata.get("help", "").replace("%%", "%").split())
        assert help_text, f"{script}: field {f.name} has no help"
        assert help_text in block, f"{script}: --{f.name}'s help is not shown"
        default = f.default_factory() if f.default is dataclasses.MISSING and \
            f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING:
            shown = " ".join(f"(default: {default})".split())  # whitespace collapsed, as the block's
            assert shown in block, f"{script}: --{f.name}'s default is not shown"


@pytest.mark.parametrize("script", SCRIPTS)
def test_wrong_choice_is_refused_with_the_allowed_values(script, monkeypatch, capsys):
    cls, _ = config_class(script)
    hints = typing.get_type_hints(cls)
    choices = {name: typing.get_args(t) for name, t in hints.items() if typing.get_origin(t) is typing.Literal}
    not_literal = sorted(n for n in CHOICE_FIELDS & set(hints) if n not in choices)
    assert not not_literal, f"{script}: {not_literal} should be Literal[...] so the parser checks them"
    assert choices, f"{script}: no Literal choices"
    for name, allowed in choices.items():
        code, _, err = run_cli(script, [f"--{name}", "nope"], monkeypatch, capsys)
        assert code == 2 and "invalid choice: 'nope'" in err, (script, name, err)
        assert all(repr(a) in err or str(a) in err for a in allowed), (script, name, err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_block_fits_100_columns(script):
    tree = ast.parse(source(script))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"]
    assert classes, f"{script}: no class Config"
    lines = source(script).splitlines()[classes[0].lineno - 1:classes[0].end_lineno]
    long = [f"{script}:{classes[0].lineno + k}: {len(line)} columns" for k, line in enumerate(lines)
            if len(line) > 100]
    assert not long, "\n".join(long)


def test_one_name_for_one_idea():
    configs = {s: config_class(s)[0] for s in SCRIPTS}
    for script, cls in configs.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & RETIRED, f"{script}: retired flag names {sorted(names & RETIRED)}"
        seed = next((f for f in dataclasses.fields(cls) if f.name == "seed"), None)
        assert seed is not None and seed.default == 0, f"{script}: --seed must exist, default 0"
        british = [n for n in names if any(w in n for w in ("normalis", "summaris", "initialis", "honour"))]
        assert not british, f"{script}: American spelling for flags: {british}"
    # a flag that several scripts share has one type (Literal choices may differ per script)
    types: dict = {}
    for script, cls in configs.items():
        for name, t in typing.get_type_hints(cls).items():
            if typing.get_origin(t) is not typing.Literal:
                types.setdefault(name, {})[script] = t
    drift = {name: by_script for name, by_script in types.items() if len(set(by_script.values())) > 1}
    assert not drift, f"same flag, different types: {drift}"
