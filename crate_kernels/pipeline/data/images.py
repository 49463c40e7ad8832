"""Image decoding and MAE's transforms (PIL, no torchvision): uint8 views, cropped and resized with PIL (JPEGs decoded
at reduced size where the crop allows), normalised on the training device (``normalize``). Every random choice of a
view is drawn from the generator passed in, so a view is a function of its sample's seed.
"""
from __future__ import annotations

import io
import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnreadableImage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil():
    from PIL import Image

    return Image


def image_size(im) -> tuple[int, int]:
    """(height, width) of a PIL image or of a uint8 (H, W, 3) tensor."""
    return tuple(im.shape[:2]) if isinstance(im, torch.Tensor) else (im.size[1], im.size[0])


class EncodedJPEG:
    """A JPEG file read but not decoded: what ``ImageFolder.open`` gives the transform when simplejpeg is
    installed. It decodes with libjpeg-turbo straight into a numpy array, about twice as fast as PIL's decode
    and copy, at the scale ``draft`` asked for; data simplejpeg refuses (CMYK, recoverable corruption) is
    handed to PIL, so what decodes and what counts as unreadable is PIL's call, as without simplejpeg."""

    mode = "RGB"

    def __init__(self, data: bytes):
        import simplejpeg

        self.data, self.scale = data, 1
        height, width, self.colorspace, _ = simplejpeg.decode_jpeg_header(data)
        self.size = (width, height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def draft(self, mode: str, size: tuple[int, int]) -> None:
        """Decode at 1/2, 1/4 or 1/8 scale where the image holds that many times ``size`` = (width, height) on
        each side (PIL's rule for JPEGs)."""
        factor = min(self.size[0] // size[0], self.size[1] // size[1])
        self.scale = max(s for s in (1, 2, 4, 8) if s <= max(1, factor))

    def decode(self) -> np.ndarray:
        """(H, W, 3) uint8, ``ceil`` of the original sides over the scale."""
        import simplejpeg

        try:
            return simplejpeg.decode_jpeg(self.data, colorspace="RGB", min_width=-(-self.size[0] // self.scale),
                                          min_height=-(-self.size[1] // self.scale))
        except ValueError:
            with _pil().open(io.BytesIO(self.data)) as im:
                im.draft("RGB", (self.size[0] // self.scale, self.size[1] // self.scale))
                return np.array(im.convert("RGB"))


def _decode_region(im, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The region ``box`` = (top, left, h, w) of an image (a lazily opened PIL image or ``EncodedJPEG``, or a uint8
    (H, W, 3) tensor held in memory), resized to ``size`` x ``size`` with antialiased bicubic resampling: uint8
    (3, size, size).

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale (DCT scaling) when the region stays at least twice ``size`` on each
    side, so a large photo cropped to a small view is never decoded whole; the region's edges then snap to that
    coarser pixel grid (a shift under half an output pixel). The resize runs on uint8 channels-last data
    (PyTorch's vectorised CPU kernel, several times faster than PIL's or a float resize)."""
    top, left, h, w = box
    if isinstance(im, torch.Tensor):
        pixels = im
    else:
        width, height = im.size
        reduce = 1
        while reduce < 8 and min(h, w) >= 4 * reduce * size:  # after doubling: at least 2 * size per side
            reduce *= 2
        if reduce > 1:
            im.draft("RGB", (width // reduce, height // reduce))
        if isinstance(im, EncodedJPEG):
            pixels = torch.from_numpy(im.decode())
        else:
            pixels = torch.from_numpy(np.array(im if im.mode == "RGB" else im.convert("RGB")))
        sy, sx = pixels.shape[0] / height, pixels.shape[1] / width
        top, left, h, w = int(top * sy), int(left * sx), max(1, round(h * sy)), max(1, round(w * sx))
    region = pixels[top:top + h, left:left + w].permute(2, 0, 1).unsqueeze(0)  # a channels-last view, no copy
    if region.shape[-2:] != (size, size):
        region = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return region[0]


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 ``(x / 255 - mean) / std``, on the images' device (the training
    step normalises its uint8 batches on the GPU; the constants are Python numbers, so nothing is copied to the
    device and nothing waits for it)."""
    x = images.float()
    for c in range(3):
        x[..., c, :, :].sub_(255.0 * mean[c]).div_(255.0 * std[c])
    return x


class TrainTransform:
    """MAE's view in uint8: RandomResizedCrop(size, scale, ratio, bicubic) and a horizontal flip (p 0.5).

    Called as ``transform(image, generator) -> uint8 (3, size, size)`` with a PIL image or a uint8 (H, W, 3)
    tensor; ``generator=None`` uses torch's global one. A lazily opened JPEG is decoded at reduced size where the
    crop allows (see ``_decode_region``).
    """

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_box(self, height: int, width: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop, torchvision's algorithm (10 tries, then a centre crop)."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
                left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, im, gen: torch.Generator | None = None) -> torch.Tensor:
        view = _decode_region(im, self.crop_box(*image_size(im), gen), self.size)
        return view.flip(-1) if torch.rand((), generator=gen) < 0.5 else view


class EvalTransform:
    """The centre square of side ``crop_pct`` x the shorter side, resized to ``size`` x ``size`` (bicubic); with
    ``crop_pct`` 0.875 this is MAE's evaluation view (resize the shorter side to size / 0.875, centre crop size).
    PIL image or uint8 (H, W, 3) tensor -> uint8 (3, size, size)."""

    def __init__(self, size: int, crop_pct: float = 1.0):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, im, gen: torch.Generator | None = None) -> torch.Tensor:
        height, width = image_size(im)
        side = max(1, round(min(width, height) * self.crop_pct))
        return _decode_region(im, ((height - side) // 2, (width - side) // 2, side, side), self.size)


# How PIL reports missing, truncated and malformed files: OSError (UnidentifiedImageError), SyntaxError (broken
# PNG chunks), ValueError, EOFError, DecompressionBombError.
def _pil_errors() -> tuple[type[BaseException], ...]:
    return OSError, SyntaxError, ValueError, EOFError, _pil().DecompressionBombError


def _reason(e: BaseException) -> str:
    """A failed decode in words. PIL names the file object it read from, which for an in-memory JPEG is
    ``<_io.BytesIO object at 0x...>``: that repr is dropped (``UnreadableImage`` names the path)."""
    if isinstance(e, _pil().UnidentifiedImageError):
        return "not an image PIL can identify (an unknown format, or the file's header is damaged)"
    return re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def read_image(path: str) -> torch.Tensor:
    """Decode an image file whole with PIL into a uint8 RGB (3, H, W) tensor; ``UnreadableImage`` names the file."""
    try:
        with _pil().open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) view of (H, W, 3)
    except _pil_errors() as e:
        raise UnreadableImage(path, _reason(e)) from e
