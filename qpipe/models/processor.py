"""A VLM's processor (image tiling + image tokens + tokenizer) for folders that lack one.

Downloaded InternVL folders ship their processor. Random-weight folders are built from an
inline config and borrow a tokenizer: qpipe saves that tokenizer with InternVL's image tokens
into them and builds the processor around it in code, the way the real checkpoint's is made
(without torchvision where it is missing): transformers' ``InternVLProcessor`` = GotOcr2
image processor (``image_size`` px tiles, dynamic tiling of 1..12 tiles plus a thumbnail,
ImageNet mean/std, bicubic) + the tokenizer with InternVL's image tokens ``<img>``, ``</img>``, ``<IMG_CONTEXT>``
+ ``image_seq_length`` = (image_size / patch_size)² × downsample_ratio² tokens a tile.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, PreTrainedTokenizerBase

from qpipe.errors import ConfigError
from qpipe.memory import VisionDims

# InternVL's tokenizer_config names these; the processor reads them as tokenizer attributes.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MAX_TILES = 12  # InternVL3.5's preprocessor_config


def is_vlm(config: PretrainedConfig) -> bool:
    """Whether the architecture takes images (has a vision tower config)."""
    return getattr(config, "vision_config", None) is not None


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def tile_size(config: PretrainedConfig) -> int:
    return _side(config.vision_config.image_size)


def tokens_per_tile(config: PretrainedConfig) -> int:
    """Image tokens the language model sees for one tile (256 for InternVL's 448 px / 14)."""
    patches = tile_size(config) // _side(config.vision_config.patch_size)
    ratio = float(getattr(config, "downsample_ratio", 1.0))
    return int(patches * patches * ratio * ratio)


def image_tiles(config: PretrainedConfig, width: int, height: int) -> int:
    """Tiles InternVL's dynamic tiling cuts a ``width`` × ``height`` picture into (the grid
    whose aspect ratio is closest, at most 12 tiles, plus a thumbnail when there are several)."""
    return int(_image_processor(config).get_number_of_image_patches(height, width, {}))


def vision_dims(config: PretrainedConfig, width: int, height: int) -> VisionDims:
    """What one ``width`` × ``height`` image costs this VLM, for the memory estimate."""
    vision = config.vision_config
    patches = (tile_size(config) // _side(vision.patch_size)) ** 2
    ratio = float(getattr(config, "downsample_ratio", 1.0))
    return VisionDims(
        tiles=image_tiles(config, width, height),
        tokens_per_tile=tokens_per_tile(config),
        patches_per_tile=patches,
        hidden=int(vision.hidden_size),
        intermediate=int(vision.intermediate_size),
        tile_side=tile_size(config),
        projector_in=int(vision.hidden_size / (ratio * ratio)),
        lm_hidden=int(config.get_text_config().hidden_size),
    )


def with_image_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer with InternVL's image tokens as special tokens (kept where it has them:
    a real InternVL tokenizer already places them at the model's ids)."""
    if all(getattr(tokenizer, k, None) == v for k, v in IMAGE_TOKENS.items()):
        return tokenizer
    from transformers import AutoTokenizer

    # Named special tokens (tokenizer.context_image_token, ..._id) are set at load time only:
    # reload with them. New ids follow the order <img>, </img>, <IMG_CONTEXT>, as InternVL's.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, extra_special_tokens=dict(IMAGE_TOKENS))


def check_image_token(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> None:
    """The model finds image positions by ``config.image_token_id``: the tokenizer must put
    ``<IMG_CONTEXT>`` exactly there, inside the vocabulary."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])
    expected = getattr(config, "image_token_id", None)
    vocab = config.get_text_config().vocab_size
    if token_id != expected or token_id >= vocab:
        raise ConfigError(
            f"the tokenizer puts <IMG_CONTEXT> at id {token_id}, but the model's "
            f"image_token_id is {expected} (vocab {vocab}); set model.config.image_token_id="
            f"{token_id} (and a vocab_size above it) or use a tokenizer that matches "
            "(model.tokenizer=qwen for InternVL's Qwen3 ids)"
        )


def _image_processor(config: PretrainedConfig) -> Any:
    # The torchvision backend where torchvision is installed (the GPU image); PIL otherwise.
    import transformers

    name = "GotOcr2ImageProcessor"
    if importlib.util.find_spec("torchvision") is None:
        name = "GotOcr2ImageProcessorPil"
    side = tile_size(config)
    return getattr(transformers, name)(
        size={"height": side, "width": side},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=3,  # bicubic
    )


def build_processor(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    """InternVL's processor for ``config`` around ``tokenizer`` (image tokens added)."""
    if config.model_type != "internvl":
        raise ConfigError(
            f"qpipe builds image processors for InternVL only (model_type={config.model_type!r});"
            " use model.path with a folder that ships its processor"
        )
    tokenizer = with_image_tokens(tokenizer)
    check_image_token(tokenizer, config)
    return _processor_class()(
        image_processor=_image_processor(config),
        tokenizer=tokenizer,
        video_processor=_video_processor(),
        image_seq_length=tokens_per_tile(config),
    )


def _video_processor() -> Any:
    if importlib.util.find_spec("torchvision") is None:
        return None
    from transformers import InternVLVideoProcessor

    return InternVLVideoProcessor()


def _processor_class() -> type:
    """InternVLProcessor; without torchvision (which InternVL's video processor needs) a
    subclass that accepts no video processor: qpipe feeds images only, and the image path is
    InternVLProcessor's own."""
    from transformers import InternVLProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return InternVLProcessor

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyInternVLProcessor


def load_processor(folder: Path, config: PretrainedConfig) -> Any:
    """The processor of a model folder: the one it ships (a downloaded InternVL), else built
    in code around its tokenizer (random-weight folders, see ``build_processor``)."""
    from transformers import AutoProcessor, AutoTokenizer

    folder = Path(folder)
    if (folder / "processor_config.json").is_file():
        return AutoProcessor.from_pretrained(folder)
    if not (folder / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"{folder} has neither a processor nor a tokenizer: cannot feed it images "
            "(random weights need model.tokenizer)"
        )
    return build_processor(config, AutoTokenizer.from_pretrained(folder))
