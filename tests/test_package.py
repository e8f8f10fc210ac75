"""The repository root works both as the pip package `livecache` and as a ComfyUI custom-node folder."""

import importlib.util
import sys
from pathlib import Path

import livecache

ROOT = Path(__file__).resolve().parents[1]


def load_as_custom_node(name: str = "comfyui-livecache"):
    """What ComfyUI's loader does: import the folder's __init__.py under the folder's own name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_pip_package_exports_the_comfyui_entry_points():
    assert Path(livecache.__file__).resolve().parent == ROOT
    assert livecache.WEB_DIRECTORY == "./web/comfyui"
    assert set(livecache.NODE_CLASS_MAPPINGS) == set(livecache.NODE_DISPLAY_NAME_MAPPINGS)


def test_root_imports_as_a_custom_node_folder():
    module = load_as_custom_node()
    assert set(module.NODE_CLASS_MAPPINGS) == set(livecache.NODE_CLASS_MAPPINGS)
    assert (ROOT / module.WEB_DIRECTORY).is_dir()


def test_every_node_schema_is_complete():
    for key, cls in livecache.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("LiveCache/"), key
        assert callable(getattr(cls, cls.FUNCTION)), key
        declared = cls.INPUT_TYPES()
        for name, spec in {**declared.get("required", {}), **declared.get("optional", {})}.items():
            options = spec[1] if len(spec) > 1 else {}
            if spec[0] in ("INT", "FLOAT"):
                assert {"min", "max", "step", "default", "tooltip"} <= set(options), f"{key}.{name}"
            if spec[0] in ("INT", "FLOAT", "STRING") or isinstance(spec[0], list):
                assert "tooltip" in options or spec[0] == "STRING" and "default" in options, f"{key}.{name}"


def test_pyproject_never_pins_torch():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=' in text and '"torch==' not in text


def test_requirements_txt_matches_pyproject_without_torch():
    import re

    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    declared = re.findall(r'"([^"]+)"', block)
    listed = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == [d for d in declared if not d.startswith("torch")]


def test_the_command_line_starts_without_torch_or_the_node_classes():
    """Old behaviour: `livecache --help` took 3.8 s, 2.7 s of it importing the node classes (the package root)
    and the rest importing every bench module (torch) to build their parsers."""
    import subprocess

    probe = ("import sys; from livecache.cli import build_parser; parser = build_parser(); "
             "args = parser.parse_args(['bench', 'realtime', '--sessions', '1']); "
             "print(sorted(m for m in ('torch', 'livecache.nodes', 'livecache.bench.avatar_bench') "
             "if m in sys.modules), "
             "args.sessions)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["[]", "[1]"], out.stdout + out.stderr
    helped = subprocess.run([sys.executable, "-m", "livecache.cli", "bench", "avatar", "--help"],
                            capture_output=True, text=True, timeout=120, check=True)
    # a bench's own options load when its help is asked for
    assert "--weights" in helped.stdout and "musetalk" in helped.stdout
