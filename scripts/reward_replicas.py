"""Random-weight replicas of the five learned rewards' official files, tiny and deterministic.

Each builder writes files in the format its project publishes -- same file types, same key names,
same nesting -- with small shapes, so that loaders and the official implementations can both read
them (the parity tests check that the official code loads each replica with ``strict=True``):

=============== ==========================================================================================
``imagereward`` ``ImageReward.pt`` (a ``torch.save``'d state dict: ``blip.visual_encoder.*`` timm ViT,
                ``blip.text_encoder.*`` BLIP BERT with cross-attention, ``blip.{vision,text}_proj``,
                ``mlp.layers.*``), ``med_config.json``, ``bert-base-uncased/vocab.txt`` (a small vocabulary)
``hpsv2``       ``HPS_v2.1_compressed.pt`` (``{"state_dict": open_clip CLIP}``) + ``open_clip_config.json``
                (the tiny architecture, in open_clip's local format; the real file is ViT-H-14)
``pickscore``   ``PickScore_v1/`` (transformers CLIP: config.json + model.safetensors) and the processor
                folder ``CLIP-ViT-H-14-laion2B-s32B-b79K/`` beside it (tokenizer + preprocessor_config)
``aesthetic``   ``sac+logos+ava1-l14-linearMSE.pth`` (the MLP's state dict) + ``clip-vit-large-patch14/``
``clip_score``  ``clip-vit-large-patch14/`` (transformers CLIP with tokenizer and processor)
=============== ==========================================================================================

The CLIP tokenizer is the real one ComfyUI ships (``comfy/sd1_tokenizer``); the BPE of open_clip
comes with open-clip-torch.  ``build_replicas(root, clip_tokenizer, image_size)`` writes all five and
returns ``{reward: options}`` for ``get_reward(reward, **options)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BERT_WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "bird", "red", "blue", "on", "in", "painting",
              "sky", "tree", "house", "with", "and", "##s", "big", "small", "sunset", "over", "sea"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_clip_folder(dest: Path, clip_tokenizer: Path, image_size: int = 32, width: int = 32, layers: int = 2,
                     projection_dim: int = 16, seed: int = 0, processor: bool = True) -> Path:
    """A transformers CLIP folder; with ``processor`` also its tokenizer and ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    dest.mkdir(parents=True, exist_ok=True)
    CLIPModel(config).save_pretrained(dest)
    if processor:
        save_clip_processor(dest, clip_tokenizer, image_size)
    return dest


def save_clip_processor(dest: Path, clip_tokenizer: Path, image_size: int) -> Path:
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer, model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(dest)
    return dest


def aesthetic_mlp_state(dim: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """The LAION predictor's ``layers.{0,2,4,6,7}`` with random weights of the published shapes."""
    g, sizes, out = _gen(seed), [dim, 1024, 128, 64, 16, 1], {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:])):
        out[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        out[f"layers.{index}.bias"] = 0.1 * torch.randn(n_out, generator=g)
    return out


def hps_config(image_size: int = 32) -> dict:
    """An open_clip model config shaped like ViT-H-14's (fewer, narrower layers; same vocab and context)."""
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def build_hps(root: Path, image_size: int = 32, seed: int = 1) -> dict:
    """``HPS_v2.1_compressed.pt`` and, beside it, the tiny architecture as open_clip's
    ``open_clip_config.json`` (the real checkpoint needs none: it is ViT-H-14)."""
    import open_clip

    root.mkdir(parents=True, exist_ok=True)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": hps_config(image_size)}, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{root}", pretrained=None, load_weights=False)
    with torch.no_grad():  # open_clip zero-initialises some biases; make every weight count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"state_dict": model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return {"path": str(root / "HPS_v2.1_compressed.pt")}


def imagereward_med_config(vocab_size: int) -> dict:
    """BLIP's ``med_config.json`` (ImageReward ships this file), at tiny width."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
            "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True}


def imagereward_state(image_size: int, med: dict, vision_width: int = 128, depth: int = 2, patch: int = 16,
                      seed: int = 2) -> dict[str, torch.Tensor]:
    """``ImageReward.ImageReward().state_dict()`` key for key, with random weights at small shapes."""
    g = _gen(seed)

    def w(*shape, std=0.05):
        return std * torch.randn(*shape, generator=g)

    def ln(prefix, n, sd):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = 1.0 + w(n, std=0.1), w(n)

    def lin(prefix, n_out, n_in, sd):
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = w(n_out, n_in, std=n_in ** -0.5), w(n_out)

    sd: dict[str, torch.Tensor] = {}
    v, n = vision_width, (image_size // patch) ** 2
    pre = "blip.visual_encoder"
    sd[f"{pre}.cls_token"], sd[f"{pre}.pos_embed"] = w(1, 1, v, std=0.5), w(1, n + 1, v, std=0.5)
    sd[f"{pre}.patch_embed.proj.weight"], sd[f"{pre}.patch_embed.proj.bias"] = w(v, 3, patch, patch), w(v)
    for i in range(depth):
        b = f"{pre}.blocks.{i}"
        ln(f"{b}.norm1", v, sd), lin(f"{b}.attn.qkv", 3 * v, v, sd), lin(f"{b}.attn.proj", v, v, sd)
        ln(f"{b}.norm2", v, sd), lin(f"{b}.mlp.fc1", 4 * v, v, sd), lin(f"{b}.mlp.fc2", v, 4 * v, sd)
    ln(f"{pre}.norm", v, sd)
    h, inter, pre = med["hidden_size"], med["intermediate_size"], "blip.text_encoder"
    sd[f"{pre}.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).expand(1, -1).clone()
    sd[f"{pre}.embeddings.word_embeddings.weight"] = w(med["vocab_size"], h, std=0.5)
    sd[f"{pre}.embeddings.position_embeddings.weight"] = w(med["max_position_embeddings"], h, std=0.5)
    ln(f"{pre}.embeddings.LayerNorm", h, sd)
    for i in range(med["num_hidden_layers"]):
        b = f"{pre}.encoder.layer.{i}"
        for att, kv_in in (("attention", h), ("crossattention", v)):
            lin(f"{b}.{att}.self.query", h, h, sd)
            lin(f"{b}.{att}.self.key", h, kv_in, sd), lin(f"{b}.{att}.self.value", h, kv_in, sd)
            lin(f"{b}.{att}.output.dense", h, h, sd), ln(f"{b}.{att}.output.LayerNorm", h, sd)
        lin(f"{b}.intermediate.dense", inter, h, sd), lin(f"{b}.output.dense", h, inter, sd)
        ln(f"{b}.output.LayerNorm", h, sd)
    lin("blip.vision_proj", 256, v, sd), lin("blip.text_proj", 256, h, sd)
    sd.update({f"mlp.{k}": t for k, t in aesthetic_mlp_state(h, seed + 1).items()})
    return sd


def build_imagereward(root: Path, image_size: int = 32) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    tok = root / "bert-base-uncased"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    med = imagereward_med_config(len(BERT_VOCAB) + 2)  # + BLIP's [DEC] and [ENC]
    (root / "med_config.json").write_text(json.dumps(med, indent=2))
    torch.save(imagereward_state(image_size, med), root / "ImageReward.pt")
    return {"path": str(root / "ImageReward.pt")}


def build_replicas(root: Path, clip_tokenizer: Path, image_size: int = 32) -> dict[str, dict]:
    """All five replicas under ``root``; returns the ``get_reward`` options of each."""
    root = Path(root)
    clip = tiny_clip_folder(root / "clip" / "clip-vit-large-patch14", clip_tokenizer, image_size, seed=6)
    aesthetic = root / "aesthetic"
    tiny_clip_folder(aesthetic / "clip-vit-large-patch14", clip_tokenizer, image_size, seed=4)
    torch.save(aesthetic_mlp_state(16), aesthetic / "sac+logos+ava1-l14-linearMSE.pth")
    pick = root / "pickscore"
    tiny_clip_folder(pick / "PickScore_v1", clip_tokenizer, image_size, seed=5, processor=False)
    save_clip_processor(pick / "CLIP-ViT-H-14-laion2B-s32B-b79K", clip_tokenizer, image_size)
    return {
        "clip_score": {"path": str(clip)},
        "pickscore": {"path": str(pick / "PickScore_v1")},
        "aesthetic": {"path": str(aesthetic / "sac+logos+ava1-l14-linearMSE.pth")},
        "hpsv2": build_hps(root / "hpsv2", image_size),
        "imagereward": build_imagereward(root / "imagereward", image_size),
    }
