"""What the weights fingerprint costs on an SD1.5-size ComfyUI U-Net: a full hash against a remembered one.

`python -m livecache.bench.fingerprint_cost --comfy-root DIR` builds ComfyUI's SD1.5 model with random
weights (860M parameters, fp32, on the CPU), loads it as ComfyUI loads a model for sampling, and times
`model_fingerprint` three times without a weights version (every call hashes, as each CacheQuant run did
before fingerprints were remembered) and twice with ComfyUI's patch-set token (a miss, then a hit).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m livecache.bench.fingerprint_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfy-root", required=True, help="a ComfyUI checkout (its folder holding comfy/)")
    args = parser.parse_args(argv)
    from ..accel.cache_schedule import model_fingerprint
    from ..adapters.comfy_layers import weights_version
    from .comfy_workloads import sd15_model, use_comfyui

    use_comfyui(args.comfy_root)
    import comfy.model_management

    patcher = sd15_model()
    comfy.model_management.load_models_gpu([patcher])
    unet = patcher.model.diffusion_model
    version = weights_version(patcher)
    timed = []
    for token in (None, None, None, version, version):
        start = time.perf_counter()
        model_fingerprint(unet, token)
        timed.append(time.perf_counter() - start)
    params = sum(p.numel() for p in unet.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {params / 1e6:.0f}M parameters")
    print("full hash: " + ", ".join(f"{t:.2f} s" for t in timed[:3]))
    print(f"remembered: miss {timed[3]:.2f} s, hit {timed[4] * 1e3:.1f} ms ({timed[2] / timed[4]:.0f}× less)")


if __name__ == "__main__":
    main()
