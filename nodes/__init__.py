"""ComfyUI node classes (V1 schema): schemas and one call into the cores; no algorithm lives here."""

from .avatar_nodes import AvatarDiffusion, DefaultPortrait, LoadAudioFile
from .diffusers_nodes import ApplyDeepCache, DecodeImages, DiffusersSampler, LoadDiffusersModel, SaveImages

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LiveCacheLoadDiffusers": LoadDiffusersModel,
    "LiveCacheDeepCache": ApplyDeepCache,
    "LiveCacheSampler": DiffusersSampler,
    "LiveCacheDecode": DecodeImages,
    "LiveCacheSaveImages": SaveImages,
    "LiveCacheLoadAudio": LoadAudioFile,
    "LiveCacheDefaultPortrait": DefaultPortrait,
    "LiveCacheAvatarDiffusion": AvatarDiffusion,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LiveCacheLoadDiffusers": "Load Diffusers Model (LiveCache)",
    "LiveCacheDeepCache": "DeepCache (LiveCache)",
    "LiveCacheSampler": "Sampler (LiveCache)",
    "LiveCacheDecode": "Decode (LiveCache)",
    "LiveCacheSaveImages": "Save Images (LiveCache)",
    "LiveCacheLoadAudio": "Load Audio File (LiveCache)",
    "LiveCacheDefaultPortrait": "Default Portrait (LiveCache)",
    "LiveCacheAvatarDiffusion": "Diffusion Avatar (LiveCache)",
}
