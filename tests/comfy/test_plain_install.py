"""A plain install makes every node work: in ComfyUI's environment, with nothing importable but what
ComfyUI's requirements.txt and the pack's base `[project] dependencies` bring (and what those require,
extras excluded), the pack loads and every shipped workflow runs.

Why an import guard rather than a second environment: ComfyUI keeps its own torch, which must never be
reinstalled, so a fresh venv would have to share site-packages; instead each distribution installed
here that neither list reaches is made unimportable (an optional extra such as `[realtime]`, the test
tools), which is what a bare `pip install -e` into a ComfyUI environment leaves a user with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

GUARDED_RUN = r"""
import importlib.abc, importlib.machinery, importlib.metadata as md, json, re, sys, tomllib
from pathlib import Path
from packaging.requirements import Requirement

repo, comfy_root, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
roots = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
roots += [line for line in (comfy_root / "requirements.txt").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
allowed, pending = {"comfyui-livecache"}, [Requirement(r) for r in roots]  # the pack itself, without extras
while pending:
    requirement = pending.pop()
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    if norm(requirement.name) in allowed:
        continue
    allowed.add(norm(requirement.name))
    try:
        pending += [Requirement(r) for r in md.requires(requirement.name) or []]
    except md.PackageNotFoundError:
        pass  # declared but not installed here (e.g. torchaudio): nothing to allow
blocked = {top for top, dists in md.packages_distributions().items()
           if top.isidentifier() and not any(norm(d) in allowed for d in dists)}

# The path finder, blind to what a plain install lacks: `import x` fails as for a missing package and
# `importlib.util.find_spec(x)` answers None, so libraries that probe for optional packages (diffusers,
# transformers) see them absent, as they would be, instead of failing on an import they were told works.
class Absent(importlib.abc.MetaPathFinder):

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in blocked:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, path, target)

    def find_distributions(self, *args, **kwargs):  # package metadata stays readable (version checks)
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

assert importlib.machinery.PathFinder in sys.meta_path
sys.meta_path[:] = [Absent() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from livecache.cli import main
results = {}
for workflow in sorted((repo / "workflows").glob("*.json")):
    results[workflow.name] = main(["run", str(workflow), "--output", str(out / workflow.stem)])
print("RESULTS " + json.dumps({"results": results, "blocked": sorted(blocked)}))
"""


@pytest.mark.slow  # every shipped workflow in full: about 7 minutes on 2 shared CPU cores
def test_every_shipped_workflow_runs_with_only_the_base_dependencies(comfy_root, repo, tmp_path):
    result = subprocess.run([sys.executable, "-P", "-c", GUARDED_RUN, str(repo), str(comfy_root), str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULTS "):])
    # the guard is real: what this environment has beyond a plain install (the test tools) is unimportable
    assert {"pytest", "playwright"} <= set(report["blocked"]), report["blocked"]
    shipped = {p.name for p in (repo / "workflows").glob("*.json")}
    assert set(report["results"]) == shipped and len(shipped) >= 18
    failed = {name: code for name, code in report["results"].items() if code != 0}
    assert not failed, f"{failed}\n{result.stderr[-4000:]}"
    assert all(any(Path(tmp_path, Path(name).stem).iterdir()) for name in shipped), "a workflow wrote nothing"
