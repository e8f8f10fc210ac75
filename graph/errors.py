"""The one error type a workflow can fail with: its message is the single line the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence

COMFY_HINT = "ComfyUI's own nodes run inside ComfyUI: add --comfy-root DIR (the ComfyUI folder)"


class WorkflowError(ValueError):
    """A workflow cannot run; the message names the node and the problem."""


def unknown_types(nodes: Sequence[tuple[str, str]], hint: str = COMFY_HINT) -> str:
    """One line naming every node whose type the runner lacks (not only the first), and what to do."""
    named = ", ".join(f"node {node_id[:60]} ({kind[:80]})" for node_id, kind in nodes[:12])
    more = f" and {len(nodes) - 12} more" if len(nodes) > 12 else ""
    plural = "s" if len(nodes) > 1 else ""
    return f"{named}{more}: unknown node type{plural}; {hint}"


MAX_LISTED = 20  # problems named in one message; a generated workflow can have thousands


def all_problems(problems: Sequence[str]) -> str:
    """One line naming every problem found (up to MAX_LISTED, then how many more), not only the first."""
    if len(problems) == 1:
        return problems[0]
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{len(problems)} problems: " + "; ".join(problems[:MAX_LISTED]) + more
