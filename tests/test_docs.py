"""The README and docs/ stay true: code blocks run or parse, named paths and links exist.

Rules (the README says what a block is by its fence language):
- ```python blocks in README.md run as written, in a subprocess, bounded;
- ```bash / ```sh blocks in README.md: cheap `livecache` commands (`--help`, `info`) run for real; every
  other command is checked without running it: `livecache` subcommands and flags parse with the real
  argument parser, named repository files exist, pip extras exist in pyproject.toml, `git clone` names the
  repository URL of pyproject.toml. A command with no rule here fails, so a new kind of command gets one;
- in docs/*.md the `livecache` commands parse and the files they name exist;
- blocks that are output or layouts carry another language (```text, ```json), never none.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib.util import find_spec
from io import StringIO
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from livecache.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHELL = {"bash", "sh", "shell", "console"}
CHEAP_LIVECACHE = (["--help"], ["info"])  # also `livecache SUB --help`
OUTPUT_FLAGS = {"--output", "--json", "--plot", "--out"}  # written, not read: they need not exist yet


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line number, language, body) of every fenced block, indented ones (inside list items) included."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = lines[i].strip()
        if opening.startswith("```"):
            start, lang, body = i + 1, opening[3:].strip(), []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            indent = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
            blocks.append((start, lang, "\n".join(x[indent:] for x in body) + "\n"))
        i += 1
    return blocks


def shell_commands(body: str) -> list[str]:
    """Commands of a shell block: comments dropped, continuations joined, split on newlines, && , || and ;."""
    text = re.sub(r"\\\n", " ", body)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        commands += [c.strip() for c in re.split(r"&&|\|\||;", line) if c.strip()]
    return commands


def _blocks(path: Path, languages: set[str]) -> list[tuple[str, str]]:
    return [(f"{path.name}:{line}", body) for line, lang, body in fenced_blocks(path) if lang in languages]


def _readme_commands() -> list[tuple[str, str]]:
    return [(where, c) for where, body in _blocks(README, SHELL) for c in shell_commands(body)]


def _docs_commands() -> list[tuple[str, str]]:
    return [(where, c) for doc in DOCS for where, body in _blocks(doc, SHELL) for c in shell_commands(body)]


def _tracked_top_level() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("/")[0] for line in out.splitlines()} | {p.name for p in ROOT.iterdir() if p.name == "docs"}


TRACKED = _tracked_top_level()


def repo_path_missing(token: str, clone_dir: str | None = None) -> bool:
    """True if `token` names a file or folder of this repository (by its first component) that is absent."""
    token = token.split(":")[0].rstrip(",.")
    if clone_dir and token.startswith(clone_dir + "/"):
        token = token[len(clone_dir) + 1 :]
    if "/" not in token and "." not in token:
        return False
    if token.split("/")[0] not in TRACKED:
        return False
    return not any(ROOT.glob(token.rstrip("/"))) if any(c in token for c in "*?[") else \
        not (ROOT / token).exists()


def check_livecache(argv: list[str], run_cheap: bool) -> None:
    """Cheap invocations run for real; the rest must parse with the real parser and name existing files."""
    if run_cheap and (argv in CHEAP_LIVECACHE or argv[-1:] == ["--help"]):
        out = subprocess.run([sys.executable, "-m", "livecache.cli", *argv], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert out.returncode == 0, f"livecache {' '.join(argv)} failed:\n{out.stderr[-2000:]}"
        return
    err = StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(StringIO()):
            build_parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"livecache {' '.join(argv)} does not parse:\n{err.getvalue()}") from None
    for flag, value in zip(["", *argv], argv, strict=False):
        if flag not in OUTPUT_FLAGS and repo_path_missing(value):
            raise AssertionError(f"livecache {' '.join(argv)}: {value} does not exist in the repository")


def check_pip(args: list[str], clone_dir: str | None) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    known = {Requirement(r).name.lower() for group in [PYPROJECT["project"]["dependencies"], *extras.values()]
             for r in group}
    args = args[args.index("install") + 1 :]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-e", "--editable"):
            target = args[i + 1]
            match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
            assert match, f"pip install -e {target}: only this repository ('.' or '.[extras]') is documented"
            unknown = set((match.group(1) or "").split(",")) - set(extras) - {""}
            assert not unknown, f"pip extras {sorted(unknown)} are not in pyproject.toml"
            i += 2
        elif arg in ("-r", "--requirement"):
            assert not repo_path_missing(args[i + 1], clone_dir), f"{args[i + 1]} does not exist"
            i += 2
        elif arg in ("--index-url", "--extra-index-url"):
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            name = Requirement(arg).name.lower()
            assert name == "torch" or name in known, f"pip install {arg}: not a dependency in pyproject.toml"
            i += 1


def check_readme_command(command: str, clone_dir: str | None) -> str | None:
    """Check one README shell command; returns the clone folder a `git clone` creates, else `clone_dir`."""
    argv = shlex.split(command)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    tool, args = (argv[0] if argv[0] in (".", "source") else Path(argv[0]).name), argv[1:]
    if tool == "livecache":
        check_livecache(args, run_cheap=True)
    elif tool in ("bash", "sh"):
        script = args[0]
        assert (ROOT / script).is_file(), f"{script} does not exist"
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    elif tool in (".", "source"):
        assert args[0].endswith("/bin/activate"), f"{command}: only virtual environments are sourced"
    elif tool in ("python", "python3") and args[:2] == ["-m", "venv"]:
        pass
    elif tool in ("python", "python3") and args[:2] == ["-m", "pip"] or tool == "pip":
        check_pip(args, clone_dir)
    elif tool in ("python", "python3") and args[:1] == ["-m"]:
        assert find_spec(args[1]) is not None, f"python -m {args[1]}: no such module"
    elif tool == "git" and args[:1] == ["clone"]:
        url = PYPROJECT["project"]["urls"]["Repository"]
        assert args[1] == url, f"git clone {args[1]}: pyproject.toml names the repository {url}"
        return args[2] if len(args) > 2 else Path(url).stem
    elif tool == "cd":
        pass  # moving into the user's own folders (ComfyUI/custom_nodes, the clone)
    elif tool in ("apt-get", "apt"):
        assert args[:1] == ["install"], f"{command}: only installs are documented"
    else:
        raise AssertionError(f"README command with no rule in tests/test_docs.py: {command}")
    return clone_dir


def test_readme_is_a_users_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; measured and reference material goes to docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_fenced_block_names_its_language(path):
    bare = [line for line, lang, _ in fenced_blocks(path) if not lang]
    assert not bare, f"{path.name}: blocks at lines {bare} have no language (output examples are ```text)"


@pytest.mark.parametrize(("where", "body"), _blocks(README, {"python"}), ids=lambda v: v if ":" in v else "")
def test_readme_python_blocks_run(where, body, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(body)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, f"{where} failed:\n{out.stderr[-3000:]}"


def test_readme_shell_blocks_are_checked():
    """Every README shell command has a rule and passes it (a block's `git clone` folder carries on)."""
    commands = _readme_commands()
    assert any(shlex.split(c)[:1] == ["livecache"] for _, c in commands), "README lost its livecache commands"
    clone_dir = None
    for where, command in commands:
        try:
            clone_dir = check_readme_command(command, clone_dir)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {command}\n{exc}") from None


def test_readme_keeps_the_two_set_up_commands():
    """The main job and the test command, exactly as CI and a new user run them."""
    commands = [c for _, c in _readme_commands()]
    assert "bash scripts/test.sh" in commands
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "livecache run workflows/deepcache_default.json" in commands


def test_docs_livecache_commands_parse():
    checked = 0
    for where, command in _docs_commands():
        argv = shlex.split(command)
        while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
            argv = argv[1:]
        if argv and Path(argv[0]).name == "livecache":
            try:
                check_livecache(argv[1:], run_cheap=False)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {command}\n{exc}") from None
            checked += 1
        elif argv[:2] in (["python", "-m"], ["python3", "-m"]) and argv[2] not in ("pip", "pytest", "venv"):
            assert find_spec(argv[2]) is not None, f"{where}: python -m {argv[2]}: no such module"
    assert checked >= 10, "the docs lost their livecache commands (or this test stopped finding them)"


def _inline_code(path: Path) -> list[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(), flags=re.M | re.S)
    return re.findall(r"`([^`\s]+)`", text)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_paths_named_in_the_docs_exist(path):
    missing = sorted({t for t in _inline_code(path) if re.fullmatch(r"[\w.-]+(/[\w.*{}-]*)+", t)
                      and repo_path_missing(t)})
    assert not missing, f"{path.name} names files that are not in the repository: {missing}"


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_between_pages_resolve(path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        page = (path.parent / file).resolve() if file else path
        if not page.is_file():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{path.name} has broken links: {broken}"
