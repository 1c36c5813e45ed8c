"""Images as the engine takes them: decoded once to RGB (``decode_image`` -> ``RGBImage``) under a pixel cap
checked from the header; front ends decode here and hand the result to ``VLM``/the scheduler unchanged."""
from ..models.images import DEFAULT_MAX_PIXELS, ImageTooLarge, RGBImage, decode_image, load_image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageTooLarge", "RGBImage", "decode_image", "load_image"]
