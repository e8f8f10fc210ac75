"""`livecache run --ray`: many workflows (files, a folder, or one workflow over many seeds) as Ray tasks.

Each task is the local runner on one workflow (`runner.execute`, the same save nodes writing the same files
to the same output folder, claimed exclusively so parallel tasks never overwrite each other), so its results are
exactly what `livecache run FILE` writes. The output folder must be one every worker sees: the local machine,
or a volume shared by the cluster's pods (docs/ray.md). A failing workflow is reported with the node that failed
and the others go on; the exit code is 1 when any failed.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from .errors import WorkflowError


@dataclass(frozen=True)
class Job:
    """One workflow to run: its file and, for a seed sweep, the seed every `seed` input gets."""

    path: Path
    seed: int | None = None

    @property
    def label(self) -> str:
        return str(self.path) if self.seed is None else f"{self.path} (seed {self.seed})"


def parse_seeds(text: str) -> list[int]:
    """`0-7` or `1,5,9` (or both: `0-3,10`) as a list of seeds; ValueError naming the bad part."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range such as 0-7") from None
        if first < 0 or last < first:
            raise ValueError(f"--seeds: {part.strip()!r} must be non-negative and ascending")
        seeds.extend(range(first, last + 1))
    return seeds


def jobs(paths: Iterable[Path], seeds: list[int] | None) -> list[Job]:
    """The workflows to run: files as given, a folder's *.json files in name order, each once per seed."""
    files: list[Path] = []
    for path in paths:
        path = path.resolve()  # a worker's current folder is not this one
        if path.is_dir():
            found = sorted(path.glob("*.json"))
            if not found:
                raise WorkflowError(f"{path}: no workflow (*.json) in this folder")
            files.extend(found)
        else:
            files.append(path)
    return [Job(f, s) for f in files for s in (seeds or [None])]


def _with_seed(api: dict[str, dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    seeded = json.loads(json.dumps(api))
    touched = [node for node in seeded.values() if "seed" in node.get("inputs", {})]
    if not touched:
        raise WorkflowError("--seeds: this workflow has no node with a seed input")
    for node in touched:
        node["inputs"]["seed"] = seed
    return seeded


@ray.remote(num_cpus=1)
def run_job(job: Job, env: dict[str, str]) -> tuple[str, list[str]]:
    """The local runner on one workflow, in a Ray worker: ("ok", saved files) or ("invalid"/"failed", message)."""
    from .. import NODE_CLASS_MAPPINGS
    from ..nodes.context import output_dir
    from .runner import NodeFailure, execute, load_workflow

    os.environ.update(env)
    try:
        api = load_workflow(job.path, NODE_CLASS_MAPPINGS)
        ui = execute(api if job.seed is None else _with_seed(api, job.seed), NODE_CLASS_MAPPINGS)
    except WorkflowError as err:
        return "invalid", [" ".join(str(err).split())]
    except NodeFailure as err:
        return "failed", [" ".join(str(err).split())]
    saved = [str(output_dir() / image["subfolder"] / image["filename"]) for result in ui.values()
             for image in result.get("images", []) if image.get("type", "output") == "output"]
    return "ok", saved


def run_batch(batch: list[Job], env: dict[str, str], address: str | None) -> int:
    """Run `batch` on the cluster at `address` (a local one when None) with a progress bar; 0 when every workflow
    ran, 1 when any failed or was invalid (each named with its node)."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 **({} if address else {"_node_ip_address": "127.0.0.1"}))
    try:
        pending = {run_job.remote(job, env): job for job in batch}
        failures = 0
        with tqdm(total=len(batch), desc="workflows", unit="wf", file=sys.stderr) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done[0])
                try:
                    status, lines = ray.get(done[0])
                except ray.exceptions.RayError as err:  # the worker itself died (out of memory, a killed node)
                    status, lines = "failed", [f"the Ray task died: {' '.join(str(err).split())[:300]}"]
                bar.update()
                if status == "ok":
                    for line in lines:
                        tqdm.write(f"{job.label}: saved {line}")
                else:
                    failures += 1
                    tqdm.write(f"{job.label}: error: {lines[0]}", file=sys.stderr)
        print(f"{len(batch) - failures} of {len(batch)} workflows ran; {failures} failed", file=sys.stderr)
        return 1 if failures else 0
    finally:
        if started:
            ray.shutdown()
