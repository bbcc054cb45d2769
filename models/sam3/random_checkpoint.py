"""Write seeded random-weight checkpoints in the exact `facebook/sam3` snapshot layout.

The real checkpoint is gated, so tests and benchmarks run the real loading and inference code on
these. Sizes: `tiny` (about 2M parameters, 224 px: tests) and `mid` (a quarter-width ViT at the
real 1008 px with full-size heads: CPU benchmarks whose ratios mean something).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTokenizer, Sam3ImageProcessor, Sam3Processor, Sam3VideoConfig, Sam3VideoModel

SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}
# OpenAI CLIP's vocabulary keeps the first 48894 merges of its BPE file (lines 1..48894).
CLIP_MERGES = 49152 - 256 - 2


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table, in vocabulary order: printable bytes first, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def clip_vocabulary(bpe_gz: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's 49,408-token vocabulary and merge list from `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out: Path, bpe_gz: str | Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer JSON files as the Hub repo has them."""
    vocab, merges = clip_vocabulary(bpe_gz)
    (out / "vocab.json").write_text(json.dumps(vocab, separators=(",", ":"), ensure_ascii=False), encoding="utf-8")
    merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2), encoding="utf-8")
    return CLIPTokenizer(vocab=vocab, merges=merges, **SPECIAL_TOKENS)


def _vision(
    image_size: int, hidden: int, layers: int, heads: int, window: int, global_layers: list[int], fpn: int
) -> dict:
    grid = image_size // 14
    return {
        "model_type": "sam3_vision_model",
        "fpn_hidden_size": fpn,
        "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": hidden,
            "intermediate_size": hidden * 37 // 8,  # the released ViT: 4736 = 4.625 x 1024
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": 14,
            "window_size": window,
            "global_attn_indexes": global_layers,
            "pretrain_image_size": min(image_size, 336),
        },
    }


def _text(hidden: int, layers: int, heads: int) -> dict:
    """A CLIP text encoder with the real vocabulary and 32-token context."""
    return {
        "model_type": "clip_text_model",
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": hidden,
        "vocab_size": 49408,
        "max_position_embeddings": 32,
    }


def tiny_config() -> Sam3VideoConfig:
    """About 2M parameters at 224 px: the real code path at test speed."""
    vision = _vision(224, hidden=64, layers=2, heads=2, window=8, global_layers=[1], fpn=32)
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    detector = {
        "vision_config": vision,
        "text_config": _text(32, layers=2, heads=2),
        "geometry_encoder_config": {**small, "num_layers": 1},
        "detr_encoder_config": {**small, "num_layers": 1},
        "detr_decoder_config": {**small, "num_layers": 1, "num_queries": 20},
        "mask_decoder_config": {"hidden_size": 32, "num_attention_heads": 2},
    }
    tracker = {
        "image_size": 224,
        "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": 32, "image_size": 224, "patch_size": 14},
        "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
        "memory_attention_hidden_size": 32,
        "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 64,
        "memory_encoder_hidden_size": 32,
        "memory_encoder_output_channels": 16,
        "mask_downsampler_embed_dim": 32,
        "memory_fuser_embed_dim": 32,
        "memory_fuser_intermediate_dim": 64,
    }
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker)


def mid_config() -> Sam3VideoConfig:
    """Every part at a quarter of its released width, at the released depth and 1008 px resolution.

    Shrinking the ViT alone would make the prompt heads as costly as the ViT (in the released model
    the ViT is about 94% of a first request on CPU), and distort every ratio the benchmark reports.
    """
    vision = _vision(1008, hidden=256, layers=32, heads=4, window=24, global_layers=[7, 15, 23, 31], fpn=64)
    heads = {"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 512}
    detector = {
        "vision_config": vision,
        "text_config": _text(256, layers=24, heads=4),
        "geometry_encoder_config": heads,
        "detr_encoder_config": heads,
        "detr_decoder_config": heads,
        "mask_decoder_config": {"hidden_size": 64, "num_attention_heads": 2},
    }
    tracker = {
        "image_size": 1008,
        "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": 64},
        "mask_decoder_config": {"hidden_size": 64, "mlp_dim": 512, "num_attention_heads": 2, "iou_head_hidden_dim": 64},
        "memory_attention_hidden_size": 64,
        "memory_attention_feed_forward_hidden_size": 512,
        "memory_encoder_hidden_size": 64,
        "memory_encoder_output_channels": 16,
        "mask_downsampler_embed_dim": 64,
        "memory_fuser_embed_dim": 64,
        "memory_fuser_intermediate_dim": 256,
    }
    return Sam3VideoConfig(detector_config=detector, tracker_config=tracker)


CONFIGS = {"tiny": tiny_config, "mid": mid_config}


def write_random_checkpoint(out: str | Path, bpe_gz: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer and processor files into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[size]()
    torch.manual_seed(seed)
    model = Sam3VideoModel(config)
    # `save_pretrained` would write `tracker_model.tracker_model.*`; the Hub file has one prefix.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    config.save_pretrained(out)
    tokenizer = write_tokenizer_files(out, bpe_gz)
    image_size = config.detector_config.vision_config.backbone_config.image_size
    image_processor = Sam3ImageProcessor(
        size={"height": image_size, "width": image_size},
        mask_size={"height": image_size // 14 * 4, "width": image_size // 14 * 4},
    )
    Sam3Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
