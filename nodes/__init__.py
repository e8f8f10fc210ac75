"""ComfyUI node classes (V1 schema): schemas and one call into the cores; no algorithm lives here."""

from .diffusers_nodes import ApplyDeepCache, DecodeImages, DiffusersSampler, LoadDiffusersModel, SaveImages
from .streamlined_nodes import ApplySlicing, ApplyStepRehash

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LiveCacheLoadDiffusers": LoadDiffusersModel,
    "LiveCacheDeepCache": ApplyDeepCache,
    "LiveCacheStepRehash": ApplyStepRehash,
    "LiveCacheSlicing": ApplySlicing,
    "LiveCacheSampler": DiffusersSampler,
    "LiveCacheDecode": DecodeImages,
    "LiveCacheSaveImages": SaveImages,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LiveCacheLoadDiffusers": "Load Diffusers Model (LiveCache)",
    "LiveCacheDeepCache": "DeepCache (LiveCache)",
    "LiveCacheStepRehash": "Step Rehash (LiveCache)",
    "LiveCacheSlicing": "Feature Slicing (LiveCache)",
    "LiveCacheSampler": "Sampler (LiveCache)",
    "LiveCacheDecode": "Decode (LiveCache)",
    "LiveCacheSaveImages": "Save Images (LiveCache)",
}
