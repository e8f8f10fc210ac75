"""Every file the pack writes is written whole or not at all and never over an existing file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from livecache import files
from livecache.accel.cache_schedule import CalibratedSchedule
from livecache.nodes.diffusers_nodes import SaveImages

ROOT = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_save_images_never_overwrites_a_kept_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVECACHE_OUTPUT", str(tmp_path))
    (tmp_path / "keep_00001.png").write_bytes(b"precious")
    result = SaveImages().save(torch.rand(2, 4, 4, 3), "keep", 1)
    assert (tmp_path / "keep_00001.png").read_bytes() == b"precious"
    assert [i["filename"] for i in result["ui"]["images"]] == ["keep_00002.png", "keep_00003.png"]
    assert listing(tmp_path) == ["keep_00001.png", "keep_00002.png", "keep_00003.png"]  # no temp files left


def test_a_name_another_writer_claims_first_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "x_00000.png").write_bytes(b"theirs")
    monkeypatch.setattr(files, "next_index", lambda *_: 0)  # as if the other writer claimed it after we looked
    assert files.write_numbered(tmp_path, "x", ".png", files.text_writer("ours")).name == "x_00001.png"
    assert (tmp_path / "x_00000.png").read_bytes() == b"theirs"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_would_give_them(tmp_path, umask):
    """Not mkstemp's private 0o600: a saved image must be as readable as any file the user's umask allows."""
    previous = os.umask(umask)
    try:
        new = files.write_new(tmp_path / "a.png", files.text_writer("x"))
        numbered = files.write_numbered(tmp_path, "b", ".png", files.text_writer("x"))
        replaced = files.write_replacing(tmp_path / "c.json", files.text_writer("x"))
    finally:
        os.umask(previous)
    for path in (new, numbered, replaced):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_write_new_refuses_an_existing_file_and_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "a.json"
    files.write_new(target, files.text_writer("first"))
    with pytest.raises(FileExistsError):
        files.write_new(target, files.text_writer("second"))
    assert target.read_text() == "first"

    def half_then_fail(stream):
        stream.write(b"half")
        raise OSError("disk full")

    for write in (lambda: files.write_new(tmp_path / "b.json", half_then_fail),
                  lambda: files.write_replacing(target, half_then_fail)):
        with pytest.raises(OSError, match="disk full"):
            write()
    assert listing(tmp_path) == ["a.json"] and target.read_text() == "first"


def tiny_schedule(model: str = "m") -> CalibratedSchedule:
    return CalibratedSchedule("f" * 16, model, 2, "ddim", (True, False), ((0.0, 0.5), (0.0, 0.0)), 0.5, 0.5)


def test_schedule_save_keeps_an_existing_file(tmp_path):
    path = tmp_path / "s.json"
    assert tiny_schedule().save(path) == path
    assert tiny_schedule().save(path) == path  # the same schedule again: kept as it is
    other = tiny_schedule("other").save(path)
    assert other == tmp_path / "s_00000.json" and CalibratedSchedule.load(other).model == "other"
    assert CalibratedSchedule.load(path).model == "m" and listing(tmp_path) == ["s.json", "s_00000.json"]


SLOW_SAVE = textwrap.dedent("""
    import signal, sys, time
    from PIL import Image
    from livecache.cli import main

    # Ctrl-C as a terminal delivers it: a test run started in the background (`cmd &` in a script) inherits
    # SIGINT ignored, and a child that ignores SIGINT would never see the interrupt under test
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow_save(self, fp, format=None, **kwargs):
        fp.write(b"\\x89PNG half an image")
        fp.flush()
        print("writing", flush=True)
        time.sleep(60)

    Image.Image.save = slow_save
    sys.exit(main(["run", sys.argv[1], "--output", sys.argv[2]]))
""")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_save_leaves_no_partial_file(tmp_path, signum, code):
    workflow = json.loads((ROOT / "workflows" / "deepcache_default_api.json").read_text())
    sampler = next(n for n in workflow.values() if n["class_type"] == "LiveCacheSampler")
    sampler["inputs"].update(steps=2, batch_size=1)
    (tmp_path / "w.json").write_text(json.dumps(workflow))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(tmp_path / "w.json"), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in process.stdout:  # bounded by the 60 s sleep and the timeout below
            if line.strip() == "writing":
                break
        assert any(p.name.endswith(".tmp") for p in out.rglob("*")), "the save did not start"
        process.send_signal(signum)
        assert process.wait(timeout=60) == code
    finally:
        process.kill()
        process.wait()
    assert [p.name for p in out.rglob("*") if p.is_file()] == []  # neither the temp file nor half an image

