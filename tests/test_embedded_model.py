"""The shipped digits model draws the digit it is asked for (judged by the shipped classifier)."""

import torch

from livecache.models.embedded import FEATURES_FILE
from livecache.models.features import DigitFeatures
from livecache.models.loading import load_state_into
from livecache.models.pipeline import load_model
from livecache.models.sampling import make_scheduler, sample


def test_generated_digits_are_recognised_as_the_prompted_class():
    model = load_model(None)
    labels = torch.arange(10).repeat(3)
    cond = torch.cat([model.encode_prompt(str(int(d))) for d in labels])
    uncond = model.encode_prompt("").repeat(len(labels), 1, 1)
    noise = torch.randn((len(labels), *model.sample_shape), generator=torch.Generator().manual_seed(0))
    images = sample(model, make_scheduler("ddim", model.scheduler_config), cond, uncond, noise, 20,
                    model.default_guidance, progress=False)
    classifier = load_state_into(DigitFeatures(), FEATURES_FILE).eval()
    with torch.no_grad():
        predicted = classifier(images.clamp(-1, 1)).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy >= 0.9, f"only {accuracy:.0%} of generated digits were recognised as the prompted class"
