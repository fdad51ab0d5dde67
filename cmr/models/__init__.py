"""The Look-Imagine-Match model as plain ``nn.Module``s (no distributed or logging frameworks)."""

from cmr.models.adversarial import (
    AdversarialConfig,
    Discriminator,
    GradientReversal,
    ImagineGenerator,
    dann_lambda,
)
from cmr.models.decoder import CaptionDecoder, DecoderConfig, ids_to_words
from cmr.models.image import ImageEncoder, ImageEncoderConfig, SmallCNN, build_image_encoder
from cmr.models.layers import END_ID, PAD_ID, SPECIAL_WORDS, START_ID, UNK_ID, l2_normalize
from cmr.models.lim import LIMConfig, LIMOutputs, LookImagineMatch, build_model
from cmr.models.text import TextEncoder, TextEncoderConfig, build_text_encoder

__all__ = [
    "AdversarialConfig", "CaptionDecoder", "DecoderConfig", "Discriminator", "END_ID",
    "GradientReversal", "ImageEncoder", "ImageEncoderConfig", "ImagineGenerator", "LIMConfig",
    "LIMOutputs", "LookImagineMatch", "PAD_ID", "SPECIAL_WORDS", "START_ID", "SmallCNN",
    "TextEncoder", "TextEncoderConfig", "UNK_ID", "build_image_encoder", "build_model",
    "build_text_encoder", "dann_lambda", "ids_to_words", "l2_normalize",
]
