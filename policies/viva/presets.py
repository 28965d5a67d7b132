"""Named presets: tiny random models for CPU tests, built once into a cache dir and then loaded like real ones.

Building writes ordinary `save_pretrained` directories (VLM + tokenizer + image processor, DiT, VAE), so the
policy always goes through `from_pretrained`: the code path a user with real weights runs is the one tested.
The cache is $EDITRL_CACHE (default ~/.cache/editrl); bump TINY_VERSION when a config below changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .instructor import Family, model_class

TINY_VERSION = "v1"
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
# Words the tiny tokenizer learns merges from; anything else still tokenises (byte-level BPE).
CORPUS = [
    "system user assistant video editing instruction image frame reference",
    "make turn change replace remove add keep the a an of to in on with into and",
    "sky car cat dog tree house person ball road water background foreground object",
    "red green blue yellow white black orange purple bright dark colour color",
    "square circle left right top bottom brighter darker bigger smaller",
]

TINY_VLM_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
)
TINY_VLM = {
    "qwen2_5_vl": dict(
        text=dict(**TINY_VLM_TEXT, bos_token_id=None,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1], window_size=56, patch_size=14),
    ),
    "qwen3_vl": dict(
        text=dict(**TINY_VLM_TEXT, head_dim=16,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 5e6}),
        vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    num_position_embeddings=64, deepstack_visual_indexes=[1], patch_size=16),
    ),
}
TINY_DIT = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2,
)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def cache_root() -> Path:
    return Path(os.environ.get("EDITRL_CACHE", "~/.cache/editrl")).expanduser()


def tiny_paths(family: Family) -> dict[str, str]:
    """{"vlm", "dit", "vae"} directories of the tiny preset, building whatever is missing (once, under a lock)."""
    from filelock import FileLock

    root = cache_root() / f"viva-tiny-{TINY_VERSION}"
    root.mkdir(parents=True, exist_ok=True)
    parts: dict[str, Callable[[Path], None]] = {
        "vlm": lambda d: _build_vlm(d, family),
        "dit": _build_dit,
        "vae": _build_vae,
    }
    paths = {"vlm": root / f"vlm-{family}", "dit": root / "dit", "vae": root / "vae"}
    with FileLock(str(root / ".lock")):
        for name, path in paths.items():
            if not path.is_dir():
                _build_atomic(path, parts[name])
    return {k: str(v) for k, v in paths.items()}


def _build_atomic(path: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary directory and rename it into place: a killed build leaves no half directory."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            build(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.save_pretrained(directory)
    return len(fast)


def _build_vlm(directory: Path, family: Family) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vocab = _build_tokenizer(directory)
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    spec = TINY_VLM[family]
    config_cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen3VLConfig
    config = config_cls(
        text_config=dict(spec["text"], vocab_size=vocab, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=spec["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_class(family)(config).save_pretrained(directory)
    # Images are resized to about 4x4 patches: a handful of tokens each after the 2x2 merge.
    side = 4 * spec["vision"]["patch_size"]
    Qwen2VLImageProcessorPil(
        patch_size=spec["vision"]["patch_size"], merge_size=2, min_pixels=side * side, max_pixels=side * side
    ).save_pretrained(directory)


def _build_dit(directory: Path) -> None:
    from diffusers import WanTransformer3DModel

    WanTransformer3DModel(**TINY_DIT).save_pretrained(directory)


def _build_vae(directory: Path) -> None:
    """The latent statistics are measured on smooth random videos: Wan's own are meaningless for a random VAE."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE).eval()
    videos = torch.nn.functional.interpolate(torch.rand(8, 3, 2, 4, 4), size=(5, 32, 32), mode="trilinear") * 2 - 1
    with torch.no_grad():
        z = vae.encode(videos).latent_dist.mode()
    vae.register_to_config(latents_mean=z.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=z.std(dim=(0, 2, 3, 4)).tolist())
    vae.save_pretrained(directory)
