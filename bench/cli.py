"""`livecache bench WHAT`: each benchmark is a module with `configure(parser)` and `main(args)`."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "deepcache": (".deepcache_bench", "uncached vs our DeepCache vs the authors' helper, ToMe and T-GATE"),
    "ilf": (".ilf_bench", "uncached vs ILF vs DeepCache at the same full passes: speed, PSNR, SSIM, FID*, training"),
    "video": (".video_bench", "causal AR video: time per clip vs AR step, cache shared vs recompute, memory"),
    "comfy": (".comfy_bench", "inside a real ComfyUI: uncached vs ComfyUI's EasyCache vs our DeepCache on one MODEL"),
    "avatar": (".avatar_bench", "diffusion avatar: stage costs, FPS, first frame, lip sync; each speed-up on/off"),
    "suite": (".suite_bench", "CacheQuant, DP cache schedule, W8A8, DGQ and diffusers' cache hooks in one table"),
    "slicing": (".slicing_bench", "feature slicing: peak memory, speed, max |Δ| (U-Net, VAE decoder, 16-frame video)"),
    "rehash": (".rehash_bench", "step rehash on LCM 4-step and DDIM 20-step: skipped steps, speed, PSNR/SSIM"),
    "realtime": (".realtime_bench", "live sessions over loopback: first frame, FPS, audio-to-mouth latency"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module, help_text) in BENCHES.items():
        bench_parser = sub.add_parser(name, help=help_text, description=help_text)
        bench_parser.set_defaults(_bench_module=module)
        _load(module).configure(bench_parser)


def _load(module: str):
    return importlib.import_module(module, package=__package__)


def main(args: argparse.Namespace) -> int:
    return int(_load(args._bench_module).main(args) or 0)
