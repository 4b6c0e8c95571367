"""LoRA adapters for the Qwen-Image family's transformers: reading the file formats (`formats`)."""

from fastdit.lora.formats import LoraWeights, check_lora, qwen_image21_lora_targets, qwen_image_lora_targets, read_lora

__all__ = ["LoraWeights", "check_lora", "qwen_image21_lora_targets", "qwen_image_lora_targets", "read_lora"]
