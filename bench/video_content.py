"""What the AR video shows, for `livecache bench video`: class share per condition, after a change, and motion.

Speed rows say the cache is cheap; these say the video is worth caching. One AR stream per condition
(cache shared, the window the model was trained with, the live engine's few steps) is scored frame by
frame by the content classifier (`models.video.load_video_classifier`: the FID-style feature network
with 12 classes, trained on the procedural data only, colour-blind so shape decides):

* class share: the fraction of a stream's frames classified as the class it was asked for;
* after a change: streams switch class after `switch_at` clips (every class to class + 5 mod 12, so
  digit to digit, digit to shapes or texture and back); the share of the new class per clip after it;
* temporal consistency: the mean absolute change between consecutive frames, against the same figure
  of the training data of that class (1.0 = moves as much as the data; near 0 = frozen; far above =
  flicker).

The classifier's share on the data itself is printed beside, so a low figure can be told apart from a
classifier that cannot read the class at all.
"""

from __future__ import annotations

import torch

from ..accel.causal_cache import CausalCacheConfig
from ..models.features import DigitFeatures, colour_blind
from ..models.video import CLASS_NAMES, FRESH_STEPS, CausalVideoDiT, generate
from ..train.video_data import make_clips

SHIFT = 5  # a condition change goes from class c to class (c + SHIFT) % 12


@torch.no_grad()
def classify(classifier: DigitFeatures, video: torch.Tensor) -> torch.Tensor:
    """Class ids `[B, F]` for frames `[B, F, 3, H, W]` in [-1, 1]."""
    frames = video.flatten(0, 1)
    logits = torch.cat([classifier(colour_blind(frames[i : i + 512])) for i in range(0, len(frames), 512)])
    return logits.argmax(dim=1).reshape(video.shape[:2])


def frame_change(video: torch.Tensor) -> torch.Tensor:
    """Mean |frame t+1 - frame t| per stream `[B]`, in [0, 1] pixel units."""
    return ((video[:, 1:] - video[:, :-1]).abs() / 2).mean(dim=(1, 2, 3, 4))


def content_report(model: CausalVideoDiT, classifier: DigitFeatures, clips: int, chunk_length: int, steps: int,
                   sampler: str, switch_at: int, seed: int = 0) -> dict:
    """The three content figures for every class; see the module docstring."""
    if not 1 <= switch_at < clips:
        raise ValueError(f"switch_at must be in 1..{clips - 1} (clips {clips}), got {switch_at}")
    classes = torch.arange(len(CLASS_NAMES))
    cache = CausalCacheConfig(enabled=True, window=model.config.context)
    fresh = max(steps, FRESH_STEPS)  # as the live engine: a step more on a fresh clip
    video = generate(model, cache, classes, clips, chunk_length, steps, sampler, seed, fresh_steps=fresh)
    predicted = classify(classifier, video)
    data = make_clips(classes, clips * chunk_length, torch.Generator().manual_seed(seed), model.config.resolution)
    data_predicted = classify(classifier, data)
    change_ratio = frame_change(video) / frame_change(data)

    after = (classes + SHIFT) % len(CLASS_NAMES)
    labels = torch.stack([classes if i < switch_at else after for i in range(clips)])
    switched = generate(model, cache, labels, clips, chunk_length, steps, sampler, seed + 1, fresh_steps=fresh)
    new_hits = (classify(classifier, switched) == after[:, None]).float()
    per_clip = new_hits[:, switch_at * chunk_length :].reshape(len(classes), clips - switch_at, chunk_length)
    share_per_clip = per_clip.mean(dim=2)  # [streams, clips after the change]
    return {
        "clips": clips, "chunk_length": chunk_length, "steps": steps, "fresh_steps": fresh, "sampler": sampler,
        "window": cache.window, "switch_at": switch_at,
        "per_class": {
            CLASS_NAMES[c]: {
                "share": float((predicted[c] == c).float().mean()),
                "data_share": float((data_predicted[c] == c).float().mean()),
                "frame_change": float(frame_change(video[c : c + 1])[0]),
                "data_frame_change": float(frame_change(data[c : c + 1])[0]),
                "change_vs_data": float(change_ratio[c]),
            } for c in range(len(CLASS_NAMES))
        },
        "after_change": {
            "pairs": [f"{CLASS_NAMES[c]} -> {CLASS_NAMES[int(after[c])]}" for c in range(len(CLASS_NAMES))],
            "share_per_clip": share_per_clip.mean(dim=0).tolist(),
            "per_pair_share_per_clip": share_per_clip.tolist(),
            "dominant_within_two_clips": int((share_per_clip[:, :2] > 0.5).any(dim=1).sum()),
        },
    }


def print_content(report: dict) -> None:
    print(f"\ncontent: one stream per condition, {report['clips']} clips x {report['chunk_length']} frames, "
          f"{report['steps']} {report['sampler']} steps ({report['fresh_steps']} on a fresh clip), "
          f"window {report['window']}, cache shared")
    print("| condition | asked class share | classifier on the data | frame change | data's | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in report["per_class"].items():
        print(f"| {name} | {100 * row['share']:.0f}% | {100 * row['data_share']:.0f}% | {row['frame_change']:.4f} | "
              f"{row['data_frame_change']:.4f} | {row['change_vs_data']:.2f} |")
    after = report["after_change"]
    shares = ", ".join(f"{100 * s:.0f}%" for s in after["share_per_clip"])
    print(f"after a change at clip {report['switch_at']} (c -> c+{SHIFT} mod 12), new-class share per clip: "
          f"{shares}; new class dominant within two clips in {after['dominant_within_two_clips']}/"
          f"{len(after['pairs'])} streams")
