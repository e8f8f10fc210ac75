"""ComfyUI node classes (V1 schema): schemas and one call into the cores; no algorithm lives here."""

from .comfy_nodes import DeepCacheModel
from .diffusers_nodes import ApplyDeepCache, DecodeImages, DiffusersSampler, LoadDiffusersModel, SaveImages
from .video_nodes import CausalCache, LoadVideoModel, VideoSampler

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LiveCacheLoadDiffusers": LoadDiffusersModel,
    "LiveCacheDeepCache": ApplyDeepCache,
    "LiveCacheSampler": DiffusersSampler,
    "LiveCacheDecode": DecodeImages,
    "LiveCacheSaveImages": SaveImages,
    "LiveCacheLoadVideoModel": LoadVideoModel,
    "LiveCacheCausalCache": CausalCache,
    "LiveCacheVideoSampler": VideoSampler,
    "LiveCacheDeepCacheModel": DeepCacheModel,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LiveCacheLoadDiffusers": "Load Diffusers Model (LiveCache)",
    "LiveCacheDeepCache": "DeepCache (LiveCache)",
    "LiveCacheSampler": "Sampler (LiveCache)",
    "LiveCacheDecode": "Decode (LiveCache)",
    "LiveCacheSaveImages": "Save Images (LiveCache)",
    "LiveCacheLoadVideoModel": "Load Video Model (LiveCache)",
    "LiveCacheCausalCache": "Causal Cache (LiveCache)",
    "LiveCacheVideoSampler": "AR Video Sampler (LiveCache)",
    "LiveCacheDeepCacheModel": "DeepCache for MODEL (LiveCache)",
}
