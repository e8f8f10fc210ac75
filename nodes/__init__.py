"""ComfyUI node classes (V1 schema): schemas and one call into the cores; no algorithm lives here."""

from .avatar_nodes import AvatarDiffusion, DefaultPortrait, LoadAudioFile
from .cachequant_nodes import ApplyCacheQuant, CalibrateSchedule, LoadSchedule, Quantize
from .comfy_dit_nodes import BlockCacheModel, TokenSlicingModel
from .comfy_model_nodes import CacheQuantModel, CalibrateScheduleModel, LoadScheduleModel, QuantizeModel, SlicingModel
from .comfy_nodes import DeepCacheModel, StepRehashModel
from .diffusers_nodes import ApplyDeepCache, DecodeImages, DiffusersSampler, LoadDiffusersModel, SaveImages
from .dit_nodes import ApplyBlockCache
from .ilf_nodes import ApplyILF, ApplyILFModel, LoadILFModule, TrainILFModel
from .streamlined_nodes import ApplySlicing, ApplyStepRehash
from .video_nodes import CausalCache, LoadVideoModel, VideoSampler

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LiveCacheLoadDiffusers": LoadDiffusersModel,
    "LiveCacheDeepCache": ApplyDeepCache,
    "LiveCacheBlockCache": ApplyBlockCache,
    "LiveCacheLoadILF": LoadILFModule,
    "LiveCacheApplyILF": ApplyILF,
    "LiveCacheStepRehash": ApplyStepRehash,
    "LiveCacheSlicing": ApplySlicing,
    "LiveCacheSampler": DiffusersSampler,
    "LiveCacheDecode": DecodeImages,
    "LiveCacheSaveImages": SaveImages,
    "LiveCacheLoadVideoModel": LoadVideoModel,
    "LiveCacheCausalCache": CausalCache,
    "LiveCacheVideoSampler": VideoSampler,
    "LiveCacheDeepCacheModel": DeepCacheModel,
    "LiveCacheStepRehashModel": StepRehashModel,
    "LiveCacheQuantizeModel": QuantizeModel,
    "LiveCacheSlicingModel": SlicingModel,
    "LiveCacheBlockCacheModel": BlockCacheModel,
    "LiveCacheTokenSlicingModel": TokenSlicingModel,
    "LiveCacheCacheQuantModel": CacheQuantModel,
    "LiveCacheApplyILFModel": ApplyILFModel,
    "LiveCacheTrainILFModel": TrainILFModel,
    "LiveCacheCalibrateScheduleModel": CalibrateScheduleModel,
    "LiveCacheLoadScheduleModel": LoadScheduleModel,
    "LiveCacheLoadAudio": LoadAudioFile,
    "LiveCacheDefaultPortrait": DefaultPortrait,
    "LiveCacheAvatarDiffusion": AvatarDiffusion,
    "LiveCacheCalibrateSchedule": CalibrateSchedule,
    "LiveCacheLoadSchedule": LoadSchedule,
    "LiveCacheCacheQuant": ApplyCacheQuant,
    "LiveCacheQuantize": Quantize,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LiveCacheLoadDiffusers": "Load Diffusers Model (LiveCache)",
    "LiveCacheDeepCache": "DeepCache (LiveCache)",
    "LiveCacheBlockCache": "Block Cache (LiveCache)",
    "LiveCacheLoadILF": "Load ILF Module (LiveCache)",
    "LiveCacheApplyILF": "Apply ILF (LiveCache)",
    "LiveCacheStepRehash": "Step Rehash (LiveCache)",
    "LiveCacheSlicing": "Feature Slicing (LiveCache)",
    "LiveCacheSampler": "Sampler (LiveCache)",
    "LiveCacheDecode": "Decode (LiveCache)",
    "LiveCacheSaveImages": "Save Images (LiveCache)",
    "LiveCacheLoadVideoModel": "Load Video Model (LiveCache)",
    "LiveCacheCausalCache": "Causal Cache (LiveCache)",
    "LiveCacheVideoSampler": "AR Video Sampler (LiveCache)",
    "LiveCacheDeepCacheModel": "DeepCache for MODEL (LiveCache)",
    "LiveCacheStepRehashModel": "Step Rehash for MODEL (LiveCache)",
    "LiveCacheQuantizeModel": "Quantize MODEL W8A8 / DGQ (LiveCache)",
    "LiveCacheSlicingModel": "Slicing for MODEL (LiveCache)",
    "LiveCacheBlockCacheModel": "Block Cache for MODEL (LiveCache)",
    "LiveCacheTokenSlicingModel": "Token Slicing for DiT MODEL (LiveCache)",
    "LiveCacheCacheQuantModel": "CacheQuant for MODEL (LiveCache)",
    "LiveCacheApplyILFModel": "Apply ILF for MODEL (LiveCache)",
    "LiveCacheTrainILFModel": "Train ILF Module for MODEL (LiveCache)",
    "LiveCacheCalibrateScheduleModel": "Calibrate Cache Schedule for MODEL (LiveCache)",
    "LiveCacheLoadScheduleModel": "Load Cache Schedule for MODEL (LiveCache)",
    "LiveCacheLoadAudio": "Load Audio File (LiveCache)",
    "LiveCacheDefaultPortrait": "Default Portrait (LiveCache)",
    "LiveCacheAvatarDiffusion": "Diffusion Avatar (LiveCache)",
    "LiveCacheCalibrateSchedule": "Calibrate Cache Schedule (LiveCache)",
    "LiveCacheLoadSchedule": "Load Cache Schedule (LiveCache)",
    "LiveCacheCacheQuant": "CacheQuant (LiveCache)",
    "LiveCacheQuantize": "Quantize W8A8 / DGQ (LiveCache)",
}
