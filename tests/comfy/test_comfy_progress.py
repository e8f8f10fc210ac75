"""Inside real ComfyUI our long loops move its progress bar and obey its interrupt flag (Cancel).

The flag is the one `POST /interrupt` sets (`comfy.model_management.interrupt_current_processing`);
here the progress-bar hook sets it mid-calibration, as a user pressing Cancel at that moment would.
"""

from __future__ import annotations

import comfy.model_management as management
import comfy.utils
import pytest

from livecache.nodes.cachequant_nodes import CalibrateSchedule
from livecache.nodes.context import host_progress
from livecache.nodes.diffusers_nodes import LoadDiffusersModel


class CancelAt:
    """A progress-bar hook that records each report and presses Cancel once `value` steps are done."""

    def __init__(self, value: int | None) -> None:
        self.value = value
        self.reports: list[tuple[int, int]] = []
        self.cancelled = False
        self.calls_after = 0  # U-Net calls after Cancel

    def __call__(self, value, total, preview=None, prompt_id=None, node_id=None) -> None:
        self.reports.append((value, total))
        if self.value is not None and value >= self.value and not self.cancelled:
            self.cancelled = True
            management.interrupt_current_processing(True)

    def count(self, *_args) -> None:
        self.calls_after += self.cancelled


@pytest.fixture()
def hook():
    previous = comfy.utils.PROGRESS_BAR_HOOK
    yield lambda h: comfy.utils.set_progress_bar_global_hook(h)
    comfy.utils.set_progress_bar_global_hook(previous)
    management.interrupt_current_processing(False)


@pytest.fixture(scope="module")
def digits():
    return LoadDiffusersModel().load("embedded:digits")[0]


def test_cancel_stops_a_calibration_within_one_step_and_writes_nothing(hook, digits, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVECACHE_OUTPUT", str(tmp_path))
    cancel = CancelAt(value=1)
    hook(cancel)
    handle = digits.unet.register_forward_pre_hook(cancel.count)
    try:
        with pytest.raises(management.InterruptProcessingException):
            CalibrateSchedule().calibrate(digits, 3, 0, "1, 7", 1, 6, "ddim", 2.0, "output", save_as="s/digits")
    finally:
        handle.remove()
    assert cancel.cancelled and cancel.calls_after == 0
    assert cancel.reports == [(0, 2), (1, 2)]  # the first calibration run of two, then nothing
    assert not list(tmp_path.rglob("*"))
    with management.interrupt_processing_mutex:
        assert not management.interrupt_processing  # raising consumed the flag, as ComfyUI's samplers do


def test_progress_reaches_comfyuis_bar_step_by_step(hook, digits):
    bar = CancelAt(value=None)
    hook(bar)
    progress = host_progress()
    assert list(progress.loop(range(5), "test", "item")) == list(range(5))
    assert bar.reports == [(k, 5) for k in range(6)]


def test_cancel_mid_loop_stops_before_the_next_item(hook):
    cancel = CancelAt(value=2)
    hook(cancel)
    ran = []
    with pytest.raises(management.InterruptProcessingException):
        for item in host_progress().loop(range(10), "test", "item"):
            ran.append(item)
    assert ran == [0, 1]
