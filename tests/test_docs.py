"""Every command in README.md and docs/*.md works as written: each `advgkl ...` line (also under
torchrun) parses with the real argument parser, its config file exists and resolves with its
overrides (or stops as the line's comment says), study files load, scripts exist and take the
options shown, and Python snippets compile."""

import re
import shlex
from pathlib import Path

import pytest

from advgkl.cli import build_parser
from advgkl.config import load_config
from advgkl.errors import UserError
from advgkl.studies.study import load_study

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.S)


def blocks(kind):
    for page in PAGES:
        for match in BLOCK.finditer(page.read_text()):
            if match.group(1) == kind:
                yield page, match.group(2)


def command_lines():
    """(page, command words, the line's comment) for every command line of the bash blocks."""
    for page, text in blocks("bash"):
        for line in text.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition("  #")
            if code.strip() and not code.lstrip().startswith("#"):
                yield page.name, shlex.split(code), comment.strip()


COMMANDS = list(command_lines())


def advgkl_args(words):
    if words[0] == "advgkl":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "advgkl":
        return words[words.index("-m") + 2:]
    return None


def test_the_pages_hold_commands():
    assert len(COMMANDS) > 30 and sum(advgkl_args(w) is not None for _, w, _ in COMMANDS) > 25
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


@pytest.mark.parametrize("page, words, comment", COMMANDS,
                         ids=lambda v: " ".join(v)[:70] if isinstance(v, list) else None)
def test_each_command_works_as_written(page, words, comment):
    args = advgkl_args(words)
    if args is None:
        if words[0] == "python":
            script = ROOT / words[1]
            assert script.is_file(), f"{page}: {words[1]} does not exist"
            source = script.read_text()
            for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert f'"{option}"' in source, f"{page}: {script.name} has no {option}"
        elif words[0] == "sbatch":
            script = next(w for w in words if w.endswith(".sh"))
            assert (ROOT / script).is_file(), f"{page}: {script} does not exist"
        else:
            assert words[0] in ("make", "torchrun", "bash"), f"{page}: unknown command {words}"
        return
    parsed = build_parser().parse_args(args)      # exits (fails the test) on a wrong option
    paths = [w for w in args if w.startswith("configs/")]
    for path in paths:
        assert (ROOT / path).is_file(), f"{page}: {path} does not exist"
    if parsed.command in ("train", "config") and getattr(parsed, "config", None) in paths:
        if comment.startswith("stops"):
            with pytest.raises(UserError, match=re.escape(comment.split(":", 1)[1].split(";")[0]
                                                          .strip())):
                load_config(ROOT / parsed.config, parsed.overrides)
        else:
            load_config(ROOT / parsed.config, parsed.overrides)
    if parsed.command == "study" and parsed.study in paths:
        load_study(ROOT / parsed.study)


@pytest.mark.parametrize("page, code", list(blocks("python")), ids=lambda v: getattr(v, "name", ""))
def test_python_snippets_compile(page, code):
    compile(code, str(page), "exec")


@pytest.mark.parametrize("page, code", list(blocks("python")), ids=lambda v: getattr(v, "name", ""))
def test_python_snippets_import_what_they_name(page, code):
    """The snippets' advgkl imports run: the documented paths are the real ones."""
    imports = [line for line in code.splitlines()
               if line.startswith(("from advgkl", "import advgkl"))]
    exec("\n".join(imports), {})
