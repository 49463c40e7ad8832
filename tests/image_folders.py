"""Test helper: small labelled image folders whose classes a linear probe tells apart."""
import numpy as np
from PIL import Image


def colour_folder(root, splits=(("train", 8), ("val", 4)), classes=("red", "green", "blue"), suffix=".jpg"):
    """root/<split>/<class>/<i><suffix>: 20 x 20 noise images, class c's channel c raised by 160 (red, green and blue
    noise for the default classes); ``splits`` gives each split's images per class. Returns root."""
    gen = np.random.default_rng(0)
    for split, count in splits:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = gen.integers(0, 90, (20, 20, 3))
                pixels[..., c] += 160
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}{suffix}")
    return root
