"""Look, Imagine and Match (Gu et al., CVPR 2018) as one module.

- match:   image and text encoders into one L2-normalised embedding space (VSE++ style);
- adversarial alignment: a modality discriminator behind a gradient reversal layer;
- imagine: a generator text embedding -> imagined image embedding, judged by a discriminator
           against real image embeddings and matched to its own image by the losses;
- look:    a caption decoder on the image embedding (cross-entropy, then self-critical RL).

The module only computes tensors; the losses live in ``cmr.losses``. Which optional parts
run is chosen per call, so a training stage can switch parts on and off.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cmr.config import ConfigError
from cmr.models.adversarial import AdversarialConfig, Discriminator, ImagineGenerator
from cmr.models.decoder import CaptionDecoder, DecoderConfig, ids_to_words
from cmr.models.image import ImageEncoder, ImageEncoderConfig, build_image_encoder
from cmr.models.layers import check_vocab_words
from cmr.models.text import TextEncoder, TextEncoderConfig, build_text_encoder


@dataclasses.dataclass
class LIMConfig:
    image_encoder: ImageEncoderConfig = dataclasses.field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    adversarial: AdversarialConfig = dataclasses.field(default_factory=AdversarialConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

    def validate(self) -> None:
        if self.text_encoder.embed_dim != self.image_encoder.embed_dim:
            raise ConfigError(
                "text_encoder.embed_dim",
                f"must equal image_encoder.embed_dim ({self.image_encoder.embed_dim}), "
                f"got {self.text_encoder.embed_dim}",
            )

    def validate_all(self) -> None:
        """Validate every part, for configs built in code rather than through ``from_dict``."""
        for field in dataclasses.fields(self):
            try:
                getattr(self, field.name).validate()
            except ConfigError as err:
                raise err.prefixed(field.name) from None
        self.validate()


@dataclasses.dataclass
class LIMOutputs:
    """What one forward pass produced; parts that were switched off stay None.

    Field names match ``cmr.losses.LossInputs`` (ids such as ``sample_ids`` and ``greedy_ids``
    are extra: they feed the reward, not a loss).
    """

    img_emb: torch.Tensor  # [B, E], L2-normalised
    txt_emb: torch.Tensor  # [B, E], L2-normalised
    modality_img_logits: torch.Tensor | None = None  # [B], "this is an image" logits
    modality_txt_logits: torch.Tensor | None = None  # [B]
    imagined_emb: torch.Tensor | None = None  # [B, E], L2-normalised, from txt_emb
    imagine_real_logits: torch.Tensor | None = None  # [B], "this is a real image" logits
    imagine_fake_logits: torch.Tensor | None = None  # [B]
    decoder_logits: torch.Tensor | None = None  # [B, L-1, V], teacher-forced
    decoder_targets: torch.Tensor | None = None  # [B, L-1], captions shifted by one
    # Self-critical sequence training: a sampled caption (with gradient) and the greedy one.
    sample_ids: torch.Tensor | None = None  # [B, T]
    sample_logprobs: torch.Tensor | None = None  # [B, T]
    sample_mask: torch.Tensor | None = None  # [B, T]
    greedy_ids: torch.Tensor | None = None  # [B, T], no gradient

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        # Not dataclasses.asdict: that deep-copies, which fails on tensors inside a graph.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class LookImagineMatch(nn.Module):
    def __init__(
        self,
        cfg: LIMConfig,
        vocab_words: list[str],
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        num_train_words: int | None = None,
    ):
        """``num_train_words``: the leading ``vocab_words`` from the training captions
        (``Vocabulary.num_train_words``), the caption decoder's vocabulary; the rest are the
        text encoder's GloVe extension. None: all of them."""
        super().__init__()
        check_vocab_words(vocab_words)
        self.cfg = cfg
        self.vocab_words = list(vocab_words)
        vocab_size, embed_dim = len(vocab_words), cfg.image_encoder.embed_dim
        num_train_words = vocab_size if num_train_words is None else num_train_words
        if image_encoder is None:
            image_encoder = ImageEncoder(cfg.image_encoder)
        if text_encoder is None:
            text_encoder = TextEncoder(cfg.text_encoder, vocab_size,
                                       num_extra_words=vocab_size - num_train_words)
        if text_encoder.vocab_size != vocab_size:
            raise ValueError(f"the text encoder reads {text_encoder.vocab_size} word ids, "
                             f"the vocabulary has {vocab_size}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        adv = cfg.adversarial
        self.modality_disc = self.generator = self.imagine_disc = self.decoder = None
        if adv.modality:
            self.modality_disc = Discriminator(embed_dim, adv.disc_hidden_dims, adv.negative_slope)
        if adv.imagine:
            self.generator = ImagineGenerator(
                embed_dim, adv.generator_hidden_dims, adv.negative_slope
            )
            self.imagine_disc = Discriminator(embed_dim, adv.disc_hidden_dims, adv.negative_slope)
        if cfg.decoder.enabled:
            self.decoder = CaptionDecoder(cfg.decoder, num_train_words, embed_dim)
        self.frozen_groups: set[str] = set()
        self.set_training_progress(0.0)

    # --- the parts -------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids, lengths)

    def forward(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        lengths: torch.Tensor,
        *,
        modality: bool | None = None,
        imagine: bool | None = None,
        caption: bool | None = None,
        scst: bool = False,
        temperature: float = 1.0,
    ) -> LIMOutputs:
        """images [B, ...] and their captions [B, L] (<start> ... <end>, padded with 0).

        Each flag: None runs the part if the model has it, True requires it, False skips it.
        ``scst`` also samples a caption per image (multinomial at ``temperature``) and decodes
        the greedy one as its baseline. It happens here, inside ``forward``, so a DDP or
        DeepSpeed wrapper sees the decoder's use and reduces its gradients.
        """
        img_emb = self.encode_image(images)
        txt_emb = self.encode_text(captions, lengths)
        out = LIMOutputs(img_emb=img_emb, txt_emb=txt_emb)
        if self._runs("modality", modality, self.modality_disc):
            out.modality_img_logits, out.modality_txt_logits = self.modality_disc(img_emb, txt_emb)
        if self._runs("imagine", imagine, self.generator):
            out.imagined_emb = self.generator(txt_emb)
            out.imagine_real_logits, out.imagine_fake_logits = self.imagine_disc(
                img_emb, out.imagined_emb
            )
        if self._runs("caption", caption, self.decoder):
            # Input drops the last column, targets the first (<start>): logit t predicts word t+1.
            # Extension words are <unk> in both (the decoder maps its input itself). The SCST
            # references (batch.references()) keep them: BLEU then gives <unk> no credit for
            # a word the decoder cannot say, as BLEU on the words would.
            out.decoder_logits = self.decoder(img_emb, captions[:, :-1])
            out.decoder_targets = self.decoder.to_decoder_ids(captions[:, 1:])
        if scst:
            self._runs("scst", True, self.decoder)
            out.sample_ids, out.sample_logprobs, out.sample_mask = self.decoder.sample(
                img_emb, temperature=temperature
            )
            with torch.no_grad():
                out.greedy_ids, _, _ = self.decoder.sample(img_emb.detach(), greedy=True)
        return out

    @staticmethod
    def _runs(name: str, wanted: bool | None, part: nn.Module | None) -> bool:
        if wanted and part is None:
            raise ValueError(f"forward({name}=True) but the model was built without that part")
        return part is not None and wanted is not False

    def sample_captions(self, img_emb: torch.Tensor, **kwargs):
        """``CaptionDecoder.sample`` (ids, logprobs, mask) for these image embeddings."""
        if self.decoder is None:
            raise ValueError("the model was built without a caption decoder (decoder.enabled)")
        return self.decoder.sample(img_emb, **kwargs)

    def decode_captions(self, ids: torch.Tensor) -> list[str]:
        return [" ".join(words) for words in ids_to_words(ids, self.vocab_words)]

    # --- training controls -----------------------------------------------------------------

    def set_training_progress(self, progress: float) -> float:
        """Update both gradient reversal layers for ``progress`` in [0, 1]; returns lambda."""
        lambda_ = self.cfg.adversarial.lambda_at(progress)
        self.set_grl_lambda(lambda_)
        return lambda_

    def set_grl_lambda(self, lambda_: float) -> None:
        for disc in (self.modality_disc, self.imagine_disc):
            if disc is not None:
                disc.grl.lambda_ = float(lambda_)

    def group_modules(self) -> dict[str, nn.Module]:
        """The model's parts by group name; parts without parameters are left out."""
        groups = {
            "image_backbone": self.image_encoder.backbone,
            "image_head": self.image_encoder.head,
            "text_encoder": self.text_encoder,
            "modality_disc": self.modality_disc,
            "generator": self.generator,
            "imagine_disc": self.imagine_disc,
            "decoder": self.decoder,
        }
        return {
            name: module
            for name, module in groups.items()
            if module is not None and any(True for _ in module.parameters())
        }

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter in exactly one named group (frozen ones too); no empty groups."""
        return {name: list(module.parameters()) for name, module in self.group_modules().items()}

    def set_trainable(self, group: str, trainable: bool) -> None:
        """Freeze or unfreeze a ``param_groups()`` group. A frozen group also stays in eval
        mode, so its BatchNorm statistics don't drift while its weights are "frozen"."""
        if group == "image_backbone" and self.image_encoder.backbone is not None:
            self.image_encoder.set_backbone_trainable(trainable)
            return
        modules = self.group_modules()
        if group not in modules:
            raise ValueError(f"unknown parameter group {group!r}; this model has {sorted(modules)}")
        for param in modules[group].parameters():
            param.requires_grad_(trainable)
        if group == "text_encoder" and self.text_encoder.cfg.freeze_embeddings:
            # A frozen GloVe table stays frozen when a stage trains the rest of the encoder.
            self.text_encoder.set_embeddings_trainable(False)
        self.frozen_groups.discard(group)
        if not trainable:
            self.frozen_groups.add(group)
        self.train(self.training)

    def train(self, mode: bool = True) -> "LookImagineMatch":
        super().train(mode)
        modules = self.group_modules()
        for group in self.frozen_groups:
            modules[group].eval()
        return self


def build_model(
    cfg: LIMConfig, vocab_words: list[str], num_train_words: int | None = None
) -> LookImagineMatch:
    """The full model with its pretrained parts loaded (backbone weights, GloVe).

    ``num_train_words``: as in ``LookImagineMatch`` (``Vocabulary.num_train_words``).

    Reads files, so it lives next to, not inside, the pure modules. With the same torch seed
    it builds bitwise-identical models.
    """
    cfg.validate_all()
    check_vocab_words(vocab_words)
    try:
        image_encoder = build_image_encoder(cfg.image_encoder)
    except ConfigError as err:
        raise err.prefixed("image_encoder") from None
    try:
        text_encoder = build_text_encoder(cfg.text_encoder, vocab_words, num_train_words)
    except ConfigError as err:
        raise err.prefixed("text_encoder") from None
    return LookImagineMatch(cfg, vocab_words, image_encoder, text_encoder, num_train_words)
