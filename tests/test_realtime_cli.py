"""`livecache serve` and `livecache bench realtime` as commands: arguments, clean Ctrl-C, bench output."""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import re
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from livecache.bench import realtime_bench as bench
from livecache.bench.loopback import spawn_server, ws_url
from livecache.examples.ws_client import stream
from livecache.realtime import cli


def parse(module, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(list(argv))


def test_serve_defaults_to_localhost_and_rejects_unknown_engines(capsys):
    args = parse(cli)
    assert (args.host, args.port, args.engine) == ("127.0.0.1", 8765, "embedded")
    assert cli.main(parse(cli, "--engine", "nope")) == 2
    assert "available: diffusion, embedded" in capsys.readouterr().err
    assert cli.main(parse(cli, "--weights", "somewhere")) == 2  # --weights belongs to the weighted engines
    assert "--engine diffusion or musetalk only" in capsys.readouterr().err
    assert cli.main(parse(cli, "--engine", "musetalk")) == 2  # no weights ship for MuseTalk
    assert "--engine musetalk needs --weights DIR" in capsys.readouterr().err
    assert cli.main(parse(cli, "--bbox-shift", "4")) == 2
    assert "--engine musetalk only" in capsys.readouterr().err
    assert cli.main(parse(cli, "--resolution", "64")) == 2
    assert "--engine musetalk only" in capsys.readouterr().err
    assert cli.main(parse(cli, "--engine", "musetalk", "--weights", "somewhere", "--resolution", "60")) == 2
    assert "--resolution must be a multiple of 8" in capsys.readouterr().err
    for bad in (["--port", "70000"], ["--max-sessions", "0"]):
        with pytest.raises(SystemExit):
            parse(cli, *bad)
    assert "must be between" in capsys.readouterr().err


def test_command_modules_import_only_the_standard_library_at_top_level():
    """`livecache --help` builds every subparser: aiortc, OpenCV and friends must load only in main()."""
    for module in (cli, bench):
        tree = ast.parse(Path(module.__file__).read_text())
        names = [alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0]
        assert names and all(n.split(".")[0] in sys.stdlib_module_names | {"__future__"} for n in names), names


def test_ctrl_c_closes_live_sessions_and_exits_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "livecache.realtime.cli", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(http://[\d.]+:\d+)/", proc.stdout.readline()).group(1)

        async def session_then_interrupt():
            task = asyncio.create_task(stream(ws_url(url), np.zeros(48000, np.int16), 16000, 3))
            await asyncio.sleep(1.5)  # the session is live and streaming
            proc.send_signal(signal.SIGINT)
            return await asyncio.wait_for(task, 10)

        result = asyncio.run(session_then_interrupt())
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "stopping" in out
    assert "Traceback" not in err and "Task was destroyed" not in err and "never awaited" not in err, err
    assert result.frames  # the client got frames until the server closed it


def test_bench_prints_the_four_numbers_as_json(capsys):
    args = parse(bench, "--sessions", "1", "2", "--seconds", "3", "--json")
    assert bench.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["transport"], r["sessions"]): r for r in report["results"]}
    assert set(rows) == {("ws", 1), ("ws", 2), ("webrtc", 1), ("webrtc", 2)}
    # what the bench measures depends on the machine's load; what it must report does not: every number is
    # there, and frames are paced by the media clock, so no session ever runs faster than the target rate
    assert report["fps_target"] == 25
    for row in rows.values():
        assert row["ttff_ms"] is not None and row["ttff_ms"] > 0
        assert 0 < row["fps"] <= 1.1 * report["fps_target"]
        assert row["audio_to_mouth_ms"] is not None and row["server_audio_to_mouth_ms"] is not None
        assert row["dropped_frames"] >= 0
    for n in (1, 2):  # interruption: measured on websocket sessions, within one frame period plus transport
        row = rows[("ws", n)]
        assert row["interrupt_ms"] is not None and 0 < row["server_interrupt_ms"] <= row["interrupt_ms"] + 5
        assert rows[("webrtc", n)]["interrupt_ms"] is None


def test_bench_url_labels_the_remote_engine_from_its_info(capsys, monkeypatch):
    """Old behaviour: `--url` labelled the remote server with this command's own `--engine` (embedded)."""

    async def no_sessions(args, url):
        return []

    monkeypatch.setattr(bench, "_run", no_sessions)
    with spawn_server("--engine", "video") as url:
        assert bench.main(parse(bench, "--url", url, "--json")) == 0
        report = json.loads(capsys.readouterr().out)
        assert bench.main(parse(bench, "--url", url, "--transport", "ws")) == 0
        header = capsys.readouterr().out.splitlines()[0]
    assert report["engine"] == "video" and report["url"] == url and report["cpu_cores"] is None
    assert header.startswith("realtime bench: engine video,") and "a remote server" in header


def test_bench_table_has_a_row_per_level(capsys):
    assert bench.main(parse(bench, "--sessions", "1", "--seconds", "2", "--transport", "ws")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "audio_to_mouth_ms" in lines[1] and lines[2].split()[:2] == ["ws", "1"]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (cryptography comes with aiortc)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


def test_tls_serves_https_and_wss(tmp_path):
    certfile, keyfile = self_signed(tmp_path)
    context = ssl.create_default_context(cafile=str(certfile))
    with spawn_server("--certfile", str(certfile), "--keyfile", str(keyfile)) as url:
        assert url.startswith("https://")
        with urllib.request.urlopen(url + "/api/info", context=context, timeout=10) as res:
            assert json.load(res)["engine"] == "embedded"
        result = asyncio.run(stream(ws_url(url), np.zeros(8000, np.int16), 16000, 0.5,
                                    connect={"ssl": context}))
    assert result.frames and not result.errors
    assert cli.main(parse(cli, "--certfile", str(certfile))) == 2
