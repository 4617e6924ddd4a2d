"""PhotoMaker: the ID-encoder file a context loads (`photo_maker=`), and a generation's ID images, style strength
and trigger word, checked before anything loads and handed to the library.

PhotoMaker (v1) runs on SDXL UNets only: its ID encoder (CLIP ViT-L/14's vision tower and two projections) embeds
the ID images, and its fuse MLPs merge each embedding into a copy of the class word before the trigger word `img`
("a photo of a woman img, ..."), one copy per image. Its LoRA is merged into the UNet at the context's first
generation. `style_strength` (sd-cli's --pm-style-strength, 0-100, default 20) is the share of the steps that run
on the prompt without the ID before the ID-merged condition takes over: honored by the accelerated library (patch
0011); the pinned upstream reads it before the generation sets it, so it always merges at 20 (sd-cli too), and the
upstream library refuses other values.

What the library would do silently, refused here: a PhotoMaker file on another family (a shape mismatch that
aborts), a generation without ID images (the library merges the LoRA, warns and switches PhotoMaker off for the
context's lifetime), a prompt without exactly one trigger word after another token (it reads out of bounds or
asserts), and a file whose version disagrees with its path (the library picks v2 by the letters "v2" anywhere in
the path).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .format.detect import tensor_shape
from .format.photomaker import LORA_PREFIX, TRIGGER_WORD, V2_PREFIX, id_encoder_shapes
from .modelfile import ModelFile, read_model_file

ID_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")   # what sd-cli's --pm-id-images-dir reads
MAX_ID_IMAGES = 16
DEFAULT_STYLE_STRENGTH = 20.0


@dataclass(frozen=True)
class PhotoMakerFile:
    path: Path
    version: int   # 1: v2 files are refused so far
    lora_tensors: int   # LoRA tensors on the UNet (down and up matrices)


def read_photo_maker(path: str | os.PathLike, model: ModelFile) -> PhotoMakerFile:
    """The PhotoMaker file for a context of `model`, or ModelLoadError/ValueError before anything loads."""
    if model.family != "sdxl":
        raise ValueError(f"PhotoMaker runs on SDXL models only (its ID encoder writes SDXL's 2048-wide text "
                         f"embedding); this is a {model.family or 'unknown'} model")
    mf = read_model_file(path)
    shapes = {t.name: tensor_shape(t.shape, mf.format == "gguf") for t in mf.tensors}
    if "vision_model.visual_projection.weight" in shapes:   # the other spelling the library accepts
        shapes.setdefault("visual_projection.weight", shapes["vision_model.visual_projection.weight"])
    if any(n.startswith(V2_PREFIX) for n in shapes):
        raise ValueError(f"{mf.path}: a PhotoMaker v2 file (qformer_perceiver.*): pysdcpp runs PhotoMaker v1 only "
                         "so far (v2 also needs insightface ID embeddings)")
    if "v2" in str(mf.path):
        raise ValueError(f"{mf.path}: stable-diffusion.cpp takes any PhotoMaker path with 'v2' in it for a v2 file, "
                         "and this one is v1: rename it (or its folder)")
    expected = id_encoder_shapes()
    missing = [n for n in expected if n not in shapes]
    if len(missing) == len(expected):
        raise ModelLoadError(f"{mf.path}: not a PhotoMaker file (no ID encoder tensors: vision_model.*, "
                             "visual_projection_2.weight, fuse_module.*)")
    if missing:
        raise ModelLoadError(f"{mf.path}: PhotoMaker ID encoder incomplete: {len(missing)} tensors missing, "
                             f"e.g. {missing[0]}")
    wrong = [(n, shapes[n], s) for n, s in expected.items() if tuple(shapes[n]) != s]
    if wrong:
        n, got, want = wrong[0]
        raise ModelLoadError(f"{mf.path}: PhotoMaker tensor {n} has shape {tuple(got)}, not {want}")
    lora = sum(1 for n in shapes if n.startswith(LORA_PREFIX))
    return PhotoMakerFile(mf.path, 1, lora)


def id_images_from_folder(folder: Path) -> list[Path]:
    """The images of a folder as sd-cli's --pm-id-images-dir reads them: by file name, these extensions."""
    if not folder.is_dir():
        raise ValueError(f"input_id_images: {folder}: no such folder")
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ID_IMAGE_EXTENSIONS),
                   key=lambda p: p.name.encode("utf-8"))
    if not files:
        raise ValueError(f"input_id_images: {folder} holds no {'/'.join(ID_IMAGE_EXTENSIONS)} images")
    return files


_LETTERS = re.compile(r"[^\W\d_]+")


def check_trigger(prompt: str) -> None:
    """The prompt must hold the trigger word once, after the class word it stands for ("a woman img"), in the same
    attention group; the word is matched as the text encoder's tokenizer splits words (runs of letters)."""
    hits = [m for m in _LETTERS.finditer(prompt) if m.group().lower() == TRIGGER_WORD]
    if len(hits) != 1:
        raise ValueError(f"a PhotoMaker prompt holds the trigger word {TRIGGER_WORD!r} once, after a class word "
                         f"(\"a photo of a woman {TRIGGER_WORD}, ...\"); this one has it {len(hits)} times")
    before = re.split(r"[()\[\]]", prompt[:hits[0].start()])[-1]
    if not before.strip() or before.rstrip().endswith(("BREAK", ":")):
        raise ValueError(f"the PhotoMaker trigger word {TRIGGER_WORD!r} follows the class word it stands for "
                         "(\"a woman img\"), in the same attention group; nothing comes before it here")


def checked_style_strength(value) -> float:
    if value is None:
        return DEFAULT_STYLE_STRENGTH
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ValueError(f"style_strength is a percentage of the steps, 0 to 100, not {value!r}")
    return float(value)


def checked_id_images(value) -> list:
    """input_id_images as a list of images (paths, PIL images or arrays; pysdcpp.images reads them): one image, a
    list, or a folder (read as sd-cli reads --pm-id-images-dir)."""
    from .images import read_image

    if isinstance(value, (str, os.PathLike)) and Path(value).is_dir():
        value = id_images_from_folder(Path(value))
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(items) <= MAX_ID_IMAGES:
        raise ValueError(f"input_id_images: 1 to {MAX_ID_IMAGES} images, got {len(items)}")
    return [read_image(v, "input_id_images") for v in items]


def checked_inputs(photo_maker: PhotoMakerFile | None, prompt: str, input_id_images, style_strength,
                   backend: str = "accelerated") -> tuple[tuple, float | None]:
    """(ID images, style strength) of a generation in a context with `photo_maker` (None: without one) in the
    `backend` library."""
    if photo_maker is None:
        if input_id_images is not None or style_strength is not None:
            raise ValueError("input_id_images and style_strength need a context made with photo_maker= (a "
                             "PhotoMaker file)")
        return (), None
    if input_id_images is None:
        raise ValueError("a context made with photo_maker= generates with input_id_images (the ID images): "
                         "without them the library would merge PhotoMaker's LoRA and switch PhotoMaker off for the "
                         "rest of the context; make a context without photo_maker= for other images")
    check_trigger(prompt)
    strength = checked_style_strength(style_strength)
    if backend == "upstream" and strength != DEFAULT_STYLE_STRENGTH:
        raise ValueError(f"the upstream library ignores style_strength (the pinned stable-diffusion.cpp builds its "
                         f"sample plan before the generation sets it, so every generation merges at "
                         f"{DEFAULT_STYLE_STRENGTH:g}%, as sd-cli's --pm-style-strength does); the accelerated "
                         "library honors it")
    return tuple(checked_id_images(input_id_images)), strength
