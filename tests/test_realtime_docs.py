"""The README's minimal websocket client runs as written against a live server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from livecache.bench.loopback import spawn_server

DOC = Path(__file__).resolve().parent.parent / "README.md"


def test_minimal_client_in_the_docs_runs(tmp_path):
    text = DOC.read_text()
    block = re.search(r"<!-- minimal-client[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its minimal client block"
    script = tmp_path / "client.py"
    script.write_text(block.group(1))
    with spawn_server() as url:
        out = subprocess.run([sys.executable, str(script), url.replace("http://", "ws://") + "/ws"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"type": "ready"' in out.stdout and '"type": "stopped"' in out.stdout
    frames, opened = map(int, re.search(r"(\d+) frames, mouth open in (\d+)", out.stdout).groups())
    assert frames > 40 and opened > 5
