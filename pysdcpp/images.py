"""Input images of a generation (img2img's init image, an inpainting mask, a ControlNet's control image, an
Instruct-Pix2Pix model's image to edit, PhotoMaker's ID images): read and checked before any model loads, sized to
the generation, and handed to the library as `sd_image_t`.

An input is a PIL image, a numpy array (uint8, H x W, H x W x 1, 3 or 4; or float in 0..1) or a path to an image
file. The init image is used as RGB (alpha dropped), the mask as 8-bit grey: white is repainted, black kept (as in
diffusers and sd-cli; the library rounds the mask to 0 or 1). An input of another size than the generation is
resized with Lanczos (no crop); without width and height the generation takes the init image's size, rounded down to
what the model's sizes must be multiples of.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MODES = {"image": "RGB", "mask_image": "L", "control_image": "RGB", "ref_images": "RGB", "input_id_images": "RGB"}


def read_image(value, name: str) -> Image.Image:
    """An input image as a PIL image in the mode its role takes (MODES), or ValueError/TypeError saying why not."""
    mode = MODES[name]
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}: {path}: no such file")
        try:
            with Image.open(path) as img:
                img.load()
                return _as_mode(img, mode)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{name}: {path} is not a readable image ({e})") from None
    if isinstance(value, Image.Image):
        return _as_mode(value, mode)
    if isinstance(value, np.ndarray):
        return _as_mode(Image.fromarray(_uint8_array(value, name)), mode)
    raise TypeError(f"{name} must be a PIL image, a numpy array or a path, not {type(value).__name__}")


def _as_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.width < 1 or img.height < 1:
        raise ValueError("an input image is empty")
    return img if img.mode == mode else img.convert(mode)


def _uint8_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"{name}: an array must be H x W, H x W x 1, 3 or 4, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name}: a float array must hold values in 0..1")
        return np.ascontiguousarray(np.round(a * 255).astype(np.uint8))
    raise ValueError(f"{name}: an array must be uint8 or float in 0..1, not {a.dtype}")


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(width, height) a generation from `image` takes when none is given: its size rounded down to `multiple`."""
    w, h = (max(multiple, (s // multiple) * multiple) for s in image.size)
    return w, h


def fitted(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


@dataclass
class GenerationImages:
    """The checked input images of one generation, already at its size (None where not given)."""

    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    strength: float = 0.8  # img2img: the share of the sampling steps that run on the noised image
    control_image: Image.Image | None = None
    control_scale: float = 1.0  # how strongly the ControlNet's residuals count (diffusers'
    #                             controlnet_conditioning_scale, sd-cli's --control-strength)
    ref_images: tuple = ()  # Instruct-Pix2Pix: the image to edit (upstream's ref_images; sd-cli's -r)
    id_images: tuple = ()  # PhotoMaker's ID images, at their own sizes (pysdcpp.photomaker)
    style_strength: float | None = None  # PhotoMaker: % of the steps before the ID joins (None: no PhotoMaker)

    def fill(self, ffi, g, keep: list) -> None:
        """Point the fields of sd_img_gen_params_t `g` at these images; `keep` holds the buffers alive."""
        for name, field in (("image", g.init_image), ("mask_image", g.mask_image),
                            ("control_image", g.control_image)):
            img = getattr(self, name)
            if img is None:
                continue
            arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
            keep.append(arr)
            field.width, field.height = img.width, img.height
            field.channel = 1 if arr.ndim == 2 else arr.shape[2]
            field.data = ffi.cast("uint8_t*", ffi.from_buffer(arr))
        g.strength = float(self.strength)
        g.control_strength = float(self.control_scale)
        if self.ref_images:
            g.ref_images, g.ref_images_count = _image_table(ffi, self.ref_images, keep)
        if self.id_images:
            g.pm_params.id_images, g.pm_params.id_images_count = _image_table(ffi, self.id_images, keep)
            g.pm_params.style_strength = float(self.style_strength)


def _image_table(ffi, images, keep: list):
    """(sd_image_t[], count) of RGB images at their own sizes; `keep` holds the buffers alive."""
    table = ffi.new("sd_image_t[]", len(images))
    keep.append(table)
    for entry, img in zip(table, images):
        arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
        keep.append(arr)
        entry.width, entry.height, entry.channel = img.width, img.height, 3
        entry.data = ffi.cast("uint8_t*", ffi.from_buffer(arr))
    return table, len(images)


def check_control_scale(value) -> float:
    """controlnet_conditioning_scale as a float, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
        raise ValueError(f"controlnet_conditioning_scale must be a finite number, got {value!r}")
    return float(value)


def checked_images(image, mask_image, strength, width: int | None, height: int | None, multiple: int,
                   control_image=None, control_scale=1.0, ref_images=None):
    """(GenerationImages, width, height): the inputs read and sized; width and height filled from the image (or the
    control image, or the first image to edit) where None. A mask needs an image to inpaint. `ref_images`: one
    image or a list (the library encodes each at its own size: they are not resized)."""
    if mask_image is not None and image is None:
        raise ValueError("mask_image needs an image to inpaint (image=...)")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    control_scale = check_control_scale(control_scale)
    init = read_image(image, "image") if image is not None else None
    control = read_image(control_image, "control_image") if control_image is not None else None
    if ref_images is None:
        refs = ()
    elif isinstance(ref_images, (list, tuple)):
        refs = tuple(read_image(r, "ref_images") for r in ref_images)
    else:
        refs = (read_image(ref_images, "ref_images"),)
    first = next((i for i in (init, control, *refs) if i is not None), None)
    if first is not None and (width is None or height is None):
        w, h = default_size(first, multiple)
        width, height = width or w, height or h
    if first is None:
        return GenerationImages(strength=float(strength), control_scale=float(control_scale)), width, height
    mask = read_image(mask_image, "mask_image") if mask_image is not None else None
    images = GenerationImages(fitted(init, width, height) if init is not None else None,
                              fitted(mask, width, height) if mask is not None else None, float(strength),
                              fitted(control, width, height) if control is not None else None, float(control_scale),
                              refs)
    return images, width, height
