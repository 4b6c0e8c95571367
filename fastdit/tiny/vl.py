"""Vision-language pieces shared by the tiny edit and Qwen-Image 2.1 pipeline folders.

- tokenizers: the Qwen2 byte-level BPE of `fastdit.tiny` plus the added tokens of the released
  Qwen2.5-VL (ids 151646..151664) and Qwen3-VL (..151668) tokenizers, at their released ids;
- processor folders (`Qwen2VLProcessor` / `Qwen3VLProcessor` layout): tokenizer files, the image
  processor's `preprocessor_config.json`, a `video_preprocessor_config.json` and a chat template;
- `allow_vl_processors_without_torchvision()`: transformers 5.x builds these processors only with a
  video processor, and its video processors need torchvision. Prompts here never carry videos, so
  where torchvision is missing the video slot gets `ImageOnlyVideoProcessor`, which refuses videos.
"""

from __future__ import annotations

from pathlib import Path

from transformers.video_processing_utils import VideoProcessorMixin

from fastdit.errors import ConfigError

# Added tokens after <|endoftext|> / <|im_start|> / <|im_end|> (151643..151645), in the released order,
# as (content, special). Qwen2.5-VL's tokenizer_config.json (added_tokens_decoder) lists 151646..151664;
# Qwen3-VL keeps those ids and appends 151665..151668.
QWEN25_VL_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN3_VL_ADDED_TOKENS = QWEN25_VL_ADDED_TOKENS + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
FIRST_ADDED_ID = 151646  # right after <|im_end|>

# ChatML with typed content lists: text items verbatim, image / video items as their vision span.
# Unlike Qwen2.5-VL's template it adds no default system prompt (Qwen3-VL's does not either).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'text' %}{{- item['text'] }}"
    "{%- elif item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_qwen_vl_tokenizer(added: tuple[tuple[str, bool], ...]):
    """The Qwen2 tokenizer of `fastdit.tiny` with `added` appended from id 151646, plus the chat template.

    `added` is QWEN25_VL_ADDED_TOKENS or QWEN3_VL_ADDED_TOKENS.
    """
    from transformers.tokenization_utils_base import AddedToken

    from fastdit.tiny.common import build_qwen2_tokenizer

    tok = build_qwen2_tokenizer()
    # One add_tokens call per token keeps the ids in list order whatever the special flag.
    for content, special in added:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    for offset, (content, _) in enumerate(added):
        if tok.convert_tokens_to_ids(content) != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"tokenizer: {content} did not land on id {FIRST_ADDED_ID + offset}")
    tok.eos_token = "<|im_end|>"  # as released; <|endoftext|> stays the pad token
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_vl_tokenizer(folder: Path, flavour: str) -> None:
    """Write the `flavour` ("qwen2.5-vl" or "qwen3-vl") tokenizer to `folder`, built once per cache."""
    from fastdit.tiny.common import TINY_VL_VERSION, save_cached_tokenizer

    added = {"qwen2.5-vl": QWEN25_VL_ADDED_TOKENS, "qwen3-vl": QWEN3_VL_ADDED_TOKENS}[flavour]
    name = f"{flavour}-tokenizer-v{TINY_VL_VERSION}"
    save_cached_tokenizer(folder, name, lambda: build_qwen_vl_tokenizer(added))


def save_vl_processor(
    folder: Path,
    *,
    flavour: str,
    patch_size: int,
    merge_size: int,
    min_pixels: int,
    max_pixels: int,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
) -> None:
    """Write a processor folder: tokenizer, PIL image processor config, video processor config, chat template.

    Written part by part because transformers 5.x cannot build the processor object without torchvision;
    `Qwen2VLProcessor.from_pretrained` / `Qwen3VLProcessor.from_pretrained` read the result.
    """
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor_class = {"qwen2.5-vl": "Qwen2VLProcessor", "qwen3-vl": "Qwen3VLProcessor"}[flavour]
    video_class = {"qwen2.5-vl": "Qwen2VLVideoProcessor", "qwen3-vl": "Qwen3VLVideoProcessor"}[flavour]
    save_vl_tokenizer(folder, flavour)
    normalize = {}
    if image_mean is not None:
        normalize = {"image_mean": list(image_mean), "image_std": list(image_std)}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        **normalize,
    )
    image_processor.save_pretrained(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["processor_class"] = processor_class
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    video = {
        "video_processor_type": video_class,
        "processor_class": processor_class,
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": merge_size,
        **normalize,
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


class ImageOnlyVideoProcessor(VideoProcessorMixin):
    """Fills a VL processor's video slot where torchvision (needed by every real one) is missing."""

    def __init__(self, **kwargs):
        # Keep the grid sizes a processor may read (merge_size for token counts) and drop the rest.
        keys = ("patch_size", "temporal_patch_size", "merge_size")
        super().__init__(**{k: v for k, v in kwargs.items() if k in keys})

    def preprocess(self, videos, **kwargs):
        raise ConfigError("video inputs need torchvision; fastdit's tiny pipelines take images only")


def allow_vl_processors_without_torchvision() -> None:
    """Let `Qwen2VLProcessor` / `Qwen3VLProcessor` load without torchvision (no-op where it is installed).

    transformers 5.x checks every processor slot against `VideoProcessorMixin` (exported only with
    torchvision) and loads the video slot through `AutoVideoProcessor` (torchvision only). Both are
    redirected to an image-only stand-in; images still go through the real PIL image processor.
    """
    from transformers import processing_utils
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    module = processing_utils.transformers_module
    if not hasattr(module, "VideoProcessorMixin"):
        module.VideoProcessorMixin = VideoProcessorMixin
    names = processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING._MAPPING_NAMES
    names["video_processor"] = (__name__, "ImageOnlyVideoProcessor")
