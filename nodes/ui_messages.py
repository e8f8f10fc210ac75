"""What the last run did, sent to ComfyUI's frontend (web/comfyui/livecache.js shows it on the node).

Outside ComfyUI (the headless runner) there is no server and the message is only logged.
"""

from __future__ import annotations

import logging
from typing import Any

LOG = logging.getLogger("livecache")
EVENT = "livecache.stats"


def send_stats(node_id: str | None, text: str, data: dict[str, Any]) -> None:
    LOG.info("%s", text)
    if node_id is None:
        return
    try:
        from server import PromptServer  # ComfyUI's own server module
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(EVENT, {"node": str(node_id), "text": text, **data})
