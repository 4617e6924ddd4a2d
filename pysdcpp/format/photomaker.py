"""The PhotoMaker (v1) file stable-diffusion.cpp reads: the ID encoder's tensors and shapes, and the UNet LoRA beside
them, as the loader names them (its prefixes added by the library: `pmid.` for the encoder, `lora.` for the LoRA).

The ID encoder is CLIP ViT-L/14's vision tower with two projections (to 768 and 1280: SDXL's two text widths, which
is why PhotoMaker runs on SDXL only) and the fuse MLPs that merge the image embedding into the class word's token.
The LoRA (diffusers' attention-processor names under `unet.`) is merged into the UNet once, at the first
generation. PhotoMaker v2 adds a Q-Former perceiver over insightface embeddings (`qformer_perceiver.*`).
"""

from __future__ import annotations

VISION_WIDTH, VISION_LAYERS, VISION_MLP, PATCH, IMAGE = 1024, 24, 4096, 14, 224
PROJECTION_WIDTHS = (768, 1280)   # visual_projection, visual_projection_2: SDXL's two text encoders' widths
FUSE_WIDTH = sum(PROJECTION_WIDTHS)   # 2048, SDXL's cross-attention width
TRIGGER_WORD = "img"   # the word after the class word ("a man img ..."), fixed in the library
LORA_PREFIX = "unet."   # the UNet LoRA's tensors (the ID encoder loader ignores them, the LoRA loader keeps only them)
V2_PREFIX = "qformer_perceiver."   # what only a v2 file holds


def _linear(name: str, out_f: int, in_f: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{name}.weight": (out_f, in_f)}
    if bias:
        shapes[f"{name}.bias"] = (out_f,)
    return shapes


def _norm(name: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def id_encoder_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the v1 ID encoder: name (as in the file) -> shape (PyTorch order)."""
    w = VISION_WIDTH
    tokens = (IMAGE // PATCH) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (w,),
        "vision_model.embeddings.patch_embedding.weight": (w, 3, PATCH, PATCH),
        "vision_model.embeddings.position_embedding.weight": (tokens, w),
    }
    shapes.update(_norm("vision_model.pre_layernorm", w))
    for i in range(VISION_LAYERS):
        layer = f"vision_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update(_linear(f"{layer}.self_attn.{proj}", w, w))
        shapes.update(_norm(f"{layer}.layer_norm1", w))
        shapes.update(_norm(f"{layer}.layer_norm2", w))
        shapes.update(_linear(f"{layer}.mlp.fc1", VISION_MLP, w))
        shapes.update(_linear(f"{layer}.mlp.fc2", w, VISION_MLP))
    shapes.update(_norm("vision_model.post_layernorm", w))
    shapes.update(_linear("visual_projection", PROJECTION_WIDTHS[0], w, bias=False))
    shapes.update(_linear("visual_projection_2", PROJECTION_WIDTHS[1], w, bias=False))
    f = FUSE_WIDTH
    shapes.update(_linear("fuse_module.mlp1.fc1", f, 2 * f))
    shapes.update(_linear("fuse_module.mlp1.fc2", f, f))
    shapes.update(_norm("fuse_module.mlp1.layernorm", 2 * f))
    shapes.update(_linear("fuse_module.mlp2.fc1", f, f))
    shapes.update(_linear("fuse_module.mlp2.fc2", f, f))
    shapes.update(_norm("fuse_module.mlp2.layernorm", f))
    shapes.update(_norm("fuse_module.layer_norm", f))
    return shapes


def lora_names(attention: str, proj: str) -> tuple[str, str]:
    """(down, up) tensor names of the LoRA on one projection (to_q, to_k, to_v, to_out) of one UNet attention, given
    in diffusers' module path (`down_blocks.1.attentions.0.transformer_blocks.0.attn1`): PhotoMaker's
    attention-processor layout."""
    if proj not in ("to_q", "to_k", "to_v", "to_out"):
        raise ValueError(f"PhotoMaker's LoRA sits on to_q, to_k, to_v and to_out, not {proj!r}")
    base = f"{LORA_PREFIX}{attention}.processor.{proj}_lora"
    return f"{base}.down.weight", f"{base}.up.weight"
