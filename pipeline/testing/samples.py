"""Sample images for the demo and tests: real photographs bundled with scikit-image.

They are written out on demand (not committed) in the formats and modes a real dataset mixes:
JPEG photographs, a greyscale JPEG, an RGBA PNG with transparency, a palette GIF and a WebP.
"""

from __future__ import annotations

from pathlib import Path

# name in skimage.data -> (file name, PIL format)
SAMPLES: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.jpg", "JPEG"),
    "chelsea": ("cat/chelsea.jpg", "JPEG"),
    "coffee": ("coffee.jpg", "JPEG"),
    "rocket": ("rocket.jpg", "JPEG"),
    "hubble_deep_field": ("space/hubble.jpg", "JPEG"),
    "immunohistochemistry": ("microscopy/ihc.png", "PNG"),
    "camera": ("camera.jpg", "JPEG"),
    "logo": ("logo.png", "PNG"),
    "colorwheel": ("colorwheel.gif", "GIF"),
    "coins": ("coins.webp", "WEBP"),
}


def write_samples(dest: str | Path) -> list[Path]:
    """Write the sample images under `dest` (kept if already there) and return their paths."""
    import skimage.data
    from PIL import Image

    root = Path(dest)
    written = []
    for name, (relative, fmt) in SAMPLES.items():
        path = root / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(getattr(skimage.data, name)())
            if fmt == "GIF":
                image = image.convert("P", palette=Image.Palette.ADAPTIVE)
            image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        written.append(path)
    return written
