"""`livecache bench WHAT`: each benchmark is a module with `configure(parser)` and `main(args)`."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "deepcache": (".deepcache_bench", "uncached vs our DeepCache vs the authors' helper, ToMe and T-GATE"),
    "ilf": (".ilf_bench", "both embedded models: uncached vs ILF vs DeepCache/block cache vs forecasting at the "
                         "same full passes: speed, PSNR, SSIM, FID*, training cost"),
    "video": (".video_bench", "causal AR video: time per clip vs AR step, cache shared vs recompute, memory"),
    "comfy": (".comfy_bench", "inside a real ComfyUI: every technique on one MODEL vs ComfyUI's EasyCache, LazyCache"),
    "avatar": (".avatar_bench", "diffusion avatar: stage costs, FPS, first frame, lip sync; each speed-up on/off"),
    "suite": (".suite_bench", "CacheQuant, DP cache schedule, W8A8, DGQ and diffusers' cache hooks in one table"),
    "slicing": (".slicing_bench", "feature slicing: peak memory, speed, max |Δ| (U-Net, VAE decoder, 16-frame video)"),
    "rehash": (".rehash_bench", "step rehash on LCM 4-step and DDIM 20-step: skipped steps, speed, PSNR/SSIM"),
    "dit": (".dit_cli", "diffusion transformers (Flux-shaped, the embedded DiT): block cache, forecasting, W8A8 "
                          "vs diffusers' cache hooks"),
    "realtime": (".realtime_bench", "live sessions over loopback: first frame, FPS, audio-to-mouth latency"),
}


class _LazyBenchParser(argparse.ArgumentParser):
    """A bench's parser that imports its module (torch, models) only when that bench is chosen or its help is
    asked for, so `livecache --help` and every other command start without importing eight benches."""

    def __init__(self, *args, module: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending = module

    def _configure(self) -> None:
        if self._pending is not None:
            module, self._pending = self._pending, None
            _load(module).configure(self)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override] - same signature
        self._configure()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._configure()
        return super().format_help()


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True, parser_class=_LazyBenchParser)
    for name, (module, help_text) in BENCHES.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text, module=module)
        bench_parser.set_defaults(_bench_module=module)


def _load(module: str):
    return importlib.import_module(module, package=__package__)


def main(args: argparse.Namespace) -> int:
    return int(_load(args._bench_module).main(args) or 0)
