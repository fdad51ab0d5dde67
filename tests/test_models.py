"""The Look-Imagine-Match modules: GRL, encoders, discriminators, generator, decoder, the whole."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchvision.models import get_model

from cmr.config import ConfigError, from_dict, to_dict
from cmr.models import (
    END_ID, PAD_ID, START_ID, CaptionDecoder, DecoderConfig, Discriminator, GradientReversal,
    ImageEncoder, ImageEncoderConfig, LIMConfig, TextEncoder, TextEncoderConfig,
    build_image_encoder, build_model, dann_lambda, ids_to_words,
)

VOCAB = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(12)]
# A model small enough for a CPU forward + backward in milliseconds.
TINY = {
    "image_encoder": {"kind": "pixels", "backbone": "small_cnn", "small_cnn_width": 8,
                      "hidden_dim": 48, "embed_dim": 32},
    "text_encoder": {"word_dim": 16, "hidden_dim": 24, "proj_dim": 24, "embed_dim": 32},
    "adversarial": {"disc_hidden_dims": [16, 8], "generator_hidden_dims": [16, 8]},
    "decoder": {"word_dim": 16, "hidden_dim": 24, "max_len": 6},
}
CAPTIONS = torch.tensor(
    [[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 9, 10, 11, 12, 2], [1, 4, 2, 0, 0, 0]]
)
LENGTHS = torch.tensor([5, 3, 6, 3])


def tiny_model(seed=0, **overrides):
    cfg = from_dict(LIMConfig, {**TINY, **overrides})
    torch.manual_seed(seed)
    return build_model(cfg, VOCAB)


def unit_norms(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


# --- gradient reversal ------------------------------------------------------------------------


@pytest.mark.parametrize("lambda_", [1.0, 0.37])
def test_grl_gradient_is_exactly_minus_lambda_times_plain_gradient(lambda_):
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(4, 6)
    grads = []
    for layer in (nn.Identity(), GradientReversal(lambda_)):
        leaf = x.clone().requires_grad_(True)
        out = head(layer(leaf))
        out.pow(2).sum().backward()
        grads.append((out.detach(), leaf.grad))
    (plain_out, plain_grad), (grl_out, grl_grad) = grads
    assert torch.equal(plain_out, grl_out)  # identity forward
    assert torch.equal(grl_grad, -lambda_ * plain_grad)
    assert plain_grad.abs().sum() > 0


def test_one_optimizer_trains_discriminator_down_and_encoder_up():
    """Behind the GRL the discriminator descends on its BCE while the encoder ascends on it."""
    torch.manual_seed(0)
    encoder = nn.Linear(8, 6)
    disc = Discriminator(6, [5, 4], negative_slope=0.2)
    disc.grl.lambda_ = 0.5
    images, texts = torch.randn(16, 8) + 0.5, torch.randn(16, 8) - 0.5

    def bce(img_emb, txt_emb, d=disc):
        img_logits, txt_logits = d(img_emb, txt_emb)
        logits = torch.cat([img_logits, txt_logits])
        labels = torch.cat([torch.ones(16), torch.zeros(16)])
        return F.binary_cross_entropy_with_logits(logits, labels)

    # Reference gradients of the same graph without reversal.
    plain = Discriminator(6, [5, 4], 0.2)
    plain.load_state_dict(disc.state_dict())
    plain.grl = nn.Identity()
    enc_ref = nn.Linear(8, 6)
    enc_ref.load_state_dict(encoder.state_dict())
    bce(enc_ref(images), enc_ref(texts), plain).backward()

    optimizer = torch.optim.SGD([*encoder.parameters(), *disc.parameters()], lr=0.5)
    old_img, old_txt = encoder(images).detach(), encoder(texts).detach()
    old_disc = Discriminator(6, [5, 4], 0.2)
    old_disc.load_state_dict(disc.state_dict())
    loss_before = bce(old_img, old_txt).item()
    bce(encoder(images), encoder(texts)).backward()
    for p, ref in zip(disc.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, ref.grad, atol=0)
    for p, ref in zip(encoder.parameters(), enc_ref.parameters()):
        assert torch.allclose(p.grad, -0.5 * ref.grad, atol=1e-7)
    optimizer.step()
    with torch.no_grad():
        assert bce(old_img, old_txt).item() < loss_before  # the new discriminator is better
        new_img, new_txt = encoder(images), encoder(texts)
        assert bce(new_img, new_txt, old_disc).item() > loss_before  # the new encoder fools it more


def test_dann_lambda_ramp():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1, abs=1e-12)
    assert dann_lambda(0.5) == pytest.approx(0.986614, abs=1e-6)
    assert dann_lambda(1.0) == pytest.approx(0.9999092, abs=1e-7)
    with pytest.raises(ValueError, match="progress"):
        dann_lambda(1.5)


def test_model_grl_lambda_follows_the_schedule():
    model = tiny_model()
    assert model.modality_disc.grl.lambda_ == 0.0  # DANN ramp starts at 0
    assert model.set_training_progress(0.5) == pytest.approx(dann_lambda(0.5))
    assert model.imagine_disc.grl.lambda_ == model.modality_disc.grl.lambda_ == dann_lambda(0.5)
    const = tiny_model(adversarial={"lambda_schedule": "constant", "lambda_max": 0.3})
    const.set_training_progress(0.9)
    assert const.modality_disc.grl.lambda_ == 0.3


# --- image encoder ----------------------------------------------------------------------------


def test_feature_encoder_shapes_and_norms():
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig(feature_dim=40, hidden_dim=24, embed_dim=16))
    x = torch.randn(5, 40)
    for mode in (True, False):
        encoder.train(mode)
        out = encoder(x)
        assert out.shape == (5, 16) and unit_norms(out)
    with pytest.raises(ValueError, match=r"\[B, 40\]"):
        encoder(torch.randn(5, 41))
    encoder.train()
    with pytest.raises(ValueError, match="batch of 1"):
        encoder(torch.randn(1, 40))


@pytest.mark.parametrize("backbone,size", [("small_cnn", 32), ("resnet18", 32)])
def test_pixel_encoder_shapes_and_norms(backbone, size):
    torch.manual_seed(0)
    cfg = ImageEncoderConfig(kind="pixels", backbone=backbone, hidden_dim=24, embed_dim=16)
    encoder = build_image_encoder(cfg)
    out = encoder(torch.randn(3, 3, size, size))
    assert out.shape == (3, 16) and unit_norms(out)
    out.sum().backward()
    assert all(p.grad is not None for p in encoder.backbone.parameters())
    with pytest.raises(ValueError, match="float"):
        encoder(torch.zeros(3, 3, size, size, dtype=torch.uint8))


@pytest.mark.parametrize(
    "backbone,feature_dim",
    [("small_cnn", 128), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
     ("resnet101", 2048), ("resnet152", 2048), ("vgg16", 4096), ("vgg19", 4096)],
)
def test_every_backbone_builds(backbone, feature_dim):
    # On the meta device: the architecture is built and run for shapes, without the memory or
    # the seconds a random init of VGG's 138M parameters would take.
    with torch.device("meta"):
        encoder = ImageEncoder(ImageEncoderConfig(kind="pixels", backbone=backbone))
        out = encoder.eval()(torch.empty(2, 3, 224, 224))
    assert encoder.head[0].in_features == feature_dim
    assert out.shape == (2, 1024)


def test_weights_names_resolve_without_download_and_bad_ones_name_the_field(tmp_path):
    for name in ("ResNet50_Weights.IMAGENET1K_V2", "IMAGENET1K_V1", "DEFAULT", "none", None):
        from_dict(ImageEncoderConfig, {"kind": "pixels", "backbone": "resnet50", "weights": name})
    with pytest.raises(ConfigError, match=r"^image_encoder\.weights: unknown weights .*ResNet18"):
        from_dict(LIMConfig, {"image_encoder": {
            "kind": "pixels", "backbone": "resnet18", "weights": "ResNet50_Weights.IMAGENET1K_V2"}})
    with pytest.raises(ConfigError, match=r"^image_encoder\.weights: state-dict file not found"):
        from_dict(LIMConfig, {"image_encoder": {
            "kind": "pixels", "backbone": "resnet18", "weights": str(tmp_path / "r18.pth")}})
    with pytest.raises(ConfigError, match=r"^weights: backbone weights need kind: pixels"):
        from_dict(ImageEncoderConfig, {"kind": "features", "weights": "DEFAULT"})
    with pytest.raises(ConfigError, match=r"^weights: small_cnn has no torchvision weights"):
        from_dict(ImageEncoderConfig,
                  {"kind": "pixels", "backbone": "small_cnn", "weights": "DEFAULT"})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_loads_into_a_fresh_encoder(tmp_path, suffix):
    torch.manual_seed(1)
    source = ImageEncoder(ImageEncoderConfig(kind="pixels", backbone="small_cnn", embed_dim=16))
    path = tmp_path / f"backbone{suffix}"
    state = source.backbone.state_dict()
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    torch.manual_seed(2)
    cfg = ImageEncoderConfig(kind="pixels", backbone="small_cnn", embed_dim=16, weights=str(path))
    loaded, fresh = build_image_encoder(cfg), ImageEncoder(cfg)
    x = torch.randn(4, 3, 32, 32)
    source.eval(), loaded.eval(), fresh.eval()
    assert torch.equal(loaded.backbone(x), source.backbone(x))
    assert not torch.equal(fresh.backbone(x), source.backbone(x))


def test_full_torchvision_checkpoint_loads_and_a_wrong_one_is_refused(tmp_path):
    torch.manual_seed(3)
    full = get_model("resnet18", weights=None)  # with its fc layer, as torchvision ships it
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    cfg = ImageEncoderConfig(kind="pixels", backbone="resnet18", weights=str(path))
    encoder = build_image_encoder(cfg)
    assert torch.equal(encoder.backbone.conv1.weight, full.conv1.weight)
    small = tmp_path / "small.pt"
    small_cnn = ImageEncoder(ImageEncoderConfig(kind="pixels", backbone="small_cnn"))
    torch.save(small_cnn.backbone.state_dict(), small)
    expected = r"^image_encoder\.weights: state dict does not fit backbone resnet18: missing"
    with pytest.raises(ConfigError, match=expected):
        build_model(LIMConfig(image_encoder=ImageEncoderConfig(
            kind="pixels", backbone="resnet18", weights=str(small))), VOCAB)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not read state dict"):
        build_image_encoder(ImageEncoderConfig(kind="pixels", backbone="small_cnn",
                                               weights=str(tmp_path / "junk.pt")))


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics():
    torch.manual_seed(0)
    cfg = ImageEncoderConfig(
        kind="pixels", backbone="small_cnn", embed_dim=16, freeze_backbone=True
    )
    encoder = ImageEncoder(cfg).train()
    bn = encoder.backbone.features[1]
    stats = bn.running_mean.clone()
    assert all(not p.requires_grad for p in encoder.backbone.parameters())
    assert not encoder.backbone.training and encoder.head.training
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    encoder(images).sum().backward()
    assert images.grad is None  # nothing is back-propagated through a frozen backbone
    assert torch.equal(bn.running_mean, stats)
    assert all(p.grad is None for p in encoder.backbone.parameters())
    assert all(p.grad is not None for p in encoder.head.parameters())
    encoder.set_backbone_trainable(True)
    assert encoder.backbone.training and all(p.requires_grad for p in encoder.backbone.parameters())


# --- text encoder -----------------------------------------------------------------------------


def test_text_encoder_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(word_dim=12, hidden_dim=10, proj_dim=10, embed_dim=8)
    encoder = TextEncoder(cfg, vocab_size=len(VOCAB)).eval()
    caption = [1, 5, 6, 7, 2]
    short = torch.tensor([caption, [1, 8, 2, 0, 0]])
    long = torch.tensor([caption + [0] * 4, [1, 9, 10, 11, 12, 13, 14, 2, 0]])
    a = encoder(short, torch.tensor([5, 3]))
    b = encoder(long, torch.tensor([5, 8]))
    assert a.shape == (2, 8) and unit_norms(a) and unit_norms(b)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # different captions differ
    # Reference: the unpadded caption alone through the GRU; forward state after the last word,
    # backward state after (i.e. at) the first word.
    with torch.no_grad():
        states, _ = encoder.gru(encoder.embedding(torch.tensor([caption])))
        final = torch.cat([states[0, -1, :10], states[0, 0, 10:]])
        expected = F.normalize(encoder.head(final), dim=-1)
    torch.testing.assert_close(a[0], expected, atol=1e-6, rtol=0)
    # Filling the padding with real words must not matter either: it is never read.
    garbage = long.clone()
    garbage[0, 5:] = 9
    torch.testing.assert_close(encoder(garbage, torch.tensor([5, 8]))[0], b[0], atol=1e-6, rtol=0)


def test_text_encoder_rejects_bad_lengths_and_ids():
    encoder = TextEncoder(TextEncoderConfig(word_dim=8, hidden_dim=8, proj_dim=8, embed_dim=8), 10)
    ids = torch.tensor([[1, 5, 2]])
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 3\]"):
        encoder(ids, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
        encoder(torch.tensor([[1, 10, 2]]), torch.tensor([3]))


# --- decoder ----------------------------------------------------------------------------------


def tiny_decoder(seed=0, vocab_size=len(VOCAB), **cfg):
    torch.manual_seed(seed)
    decoder = CaptionDecoder(DecoderConfig(word_dim=8, hidden_dim=16, **cfg), vocab_size, 12)
    return decoder.eval(), F.normalize(torch.randn(5, 12), dim=-1)


def test_teacher_forced_logits_shape():
    decoder, img = tiny_decoder()
    captions = torch.randint(1, len(VOCAB), (5, 7))
    assert decoder(img, captions).shape == (5, 7, len(VOCAB))


def test_sample_masks_and_pads_after_end():
    # 6 words, 2 of them real: <end> is likely at every step, so rows end at varied positions.
    decoder, img = tiny_decoder(vocab_size=6)
    gen = torch.Generator().manual_seed(0)
    ids, logprobs, mask = decoder.sample(img.repeat(8, 1), max_len=10, generator=gen)
    assert ids.shape == logprobs.shape == mask.shape == (40, 10)
    ended_early = 0
    for row_ids, row_lp, row_mask in zip(ids, logprobs, mask):
        ends = (row_ids == END_ID).nonzero().flatten().tolist()
        stop = ends[0] + 1 if ends else 10
        ended_early += stop < 10
        assert row_mask[:stop].all() and not row_mask[stop:].any()
        assert (row_ids[stop:] == PAD_ID).all() and (row_lp[stop:] == 0).all()
        assert (row_lp[:stop] < 0).all()
        assert not ((row_ids[:stop] == PAD_ID) | (row_ids[:stop] == START_ID)).any()
    assert 0 < ended_early < 40


def test_greedy_is_deterministic_and_matches_teacher_forcing():
    decoder, img = tiny_decoder()
    ids, logprobs, mask = decoder.sample(img, max_len=7, greedy=True)
    again = decoder.sample(img, max_len=7, greedy=True)
    assert torch.equal(ids, again[0]) and torch.equal(logprobs, again[1])
    # Feeding the greedy output back with teacher forcing gives the same distribution.
    inputs = torch.cat([torch.full((5, 1), START_ID), ids[:, :-1]], dim=1)
    logits = decoder(img, inputs)
    logits[..., [PAD_ID, START_ID]] = float("-inf")
    expected = F.log_softmax(logits, -1).gather(2, ids.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-5, rtol=0)
    assert torch.equal(ids[mask], logits.argmax(-1)[mask])


def test_sampling_is_seeded_and_low_temperature_is_greedy():
    decoder, img = tiny_decoder()
    greedy = decoder.sample(img, max_len=7, greedy=True)[0]

    def sample(seed, temperature=1.0):
        gen = torch.Generator().manual_seed(seed)
        return decoder.sample(img, max_len=7, temperature=temperature, generator=gen)[0]

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert not torch.equal(sample(1), greedy)
    assert torch.equal(sample(3, temperature=1e-4), greedy)
    with pytest.raises(ValueError, match="temperature"):
        decoder.sample(img, temperature=0.0)


def test_sample_logprobs_carry_gradient_and_words_decode():
    decoder, img = tiny_decoder()
    ids, logprobs, mask = decoder.sample(img, max_len=4, generator=torch.Generator().manual_seed(0))
    (logprobs * mask).sum().backward()
    assert decoder.output.weight.grad.abs().sum() > 0
    words = ids_to_words(torch.tensor([[5, 3, 6, 2, 7], [0, 1, 4, 2, 2]]), VOCAB)
    assert words == [["w1", "<unk>", "w2"], ["w0"]]


# --- the whole model --------------------------------------------------------------------------


def test_tiny_model_forward_backward_all_parts():
    model = tiny_model()
    model.set_training_progress(0.3)
    out = model(torch.randn(4, 3, 32, 32), CAPTIONS, LENGTHS)
    assert out.img_emb.shape == out.txt_emb.shape == out.imagined_emb.shape == (4, 32)
    assert unit_norms(out.img_emb) and unit_norms(out.txt_emb) and unit_norms(out.imagined_emb)
    for name in ("modality_img_logits", "modality_txt_logits", "imagine_real_logits",
                 "imagine_fake_logits"):
        assert getattr(out, name).shape == (4,)
    assert out.decoder_logits.shape == (4, 5, len(VOCAB))
    assert torch.equal(out.decoder_targets, CAPTIONS[:, 1:])
    outputs = [v for v in out.as_dict().values() if v is not None and v.is_floating_point()]
    total = sum(v.sum() for v in outputs)
    total.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_parts_switch_off_per_call_and_missing_parts_are_an_error():
    model = tiny_model()
    out = model(torch.randn(4, 3, 32, 32), CAPTIONS, LENGTHS, modality=False, caption=False)
    assert out.modality_img_logits is None and out.decoder_logits is None
    assert out.imagined_emb is not None
    match_only = tiny_model(adversarial={"modality": False, "imagine": False},
                            decoder={"enabled": False})
    out = match_only(torch.randn(4, 3, 32, 32), CAPTIONS, LENGTHS)
    assert [k for k, v in out.as_dict().items() if v is not None] == ["img_emb", "txt_emb"]
    with pytest.raises(ValueError, match="caption=True"):
        match_only(torch.randn(4, 3, 32, 32), CAPTIONS, LENGTHS, caption=True)
    assert set(match_only.param_groups()) == {"image_backbone", "image_head", "text_encoder"}


def test_param_groups_partition_the_parameters_and_freeze():
    model = tiny_model()
    groups = model.param_groups()
    assert set(groups) == {"image_backbone", "image_head", "text_encoder", "modality_disc",
                           "generator", "imagine_disc", "decoder"}
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in model.parameters()}
    model.set_trainable("decoder", False)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    model.set_trainable("image_backbone", False)
    assert not model.train().image_encoder.backbone.training
    with pytest.raises(ValueError, match="unknown parameter group"):
        model.set_trainable("vision", False)


def test_same_seed_gives_bitwise_identical_training_step():
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    losses, params = [], []
    for _ in range(2):
        model = tiny_model(seed=7)
        model.set_training_progress(0.5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            out = model(images, CAPTIONS, LENGTHS)
            loss = (out.img_emb * out.txt_emb).sum() + out.modality_img_logits.sum() \
                + out.imagine_fake_logits.sum() + out.decoder_logits.logsumexp(-1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.detach())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(losses[0], losses[1]) and torch.equal(params[0], params[1])
    other_seed = torch.cat([p.detach().flatten() for p in tiny_model(seed=8).parameters()])
    assert not torch.equal(params[0], other_seed)


def test_default_config_builds_and_runs_on_features():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="image_encoder.feature_dim is not set"):
        build_model(LIMConfig(), VOCAB)  # the trainer takes it from the shards' manifest
    model = build_model(LIMConfig(image_encoder=ImageEncoderConfig(feature_dim=4096)), VOCAB).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4096), CAPTIONS[:2], LENGTHS[:2])
    assert out.img_emb.shape == (2, 1024) and unit_norms(out.txt_emb)
    ids, _, _ = model.sample_captions(out.img_emb, greedy=True)
    assert ids.shape == (2, 20) and len(model.decode_captions(ids)) == 2


def test_config_round_trips_through_its_plain_form():
    cfg = from_dict(LIMConfig, TINY)
    assert from_dict(LIMConfig, to_dict(cfg)) == cfg
    assert to_dict(LIMConfig())["adversarial"]["disc_hidden_dims"] == [512, 256]


def test_config_errors_name_the_field():
    expected = r"^text_encoder\.embed_dim: must equal image_encoder\.embed_dim"
    with pytest.raises(ConfigError, match=expected):
        from_dict(LIMConfig, {"text_encoder": {"embed_dim": 64}})
    with pytest.raises(ConfigError, match=r"^adversarial\.disc_hidden_dims"):
        from_dict(LIMConfig, {"adversarial": {"disc_hidden_dims": [512, 0]}})
    with pytest.raises(ConfigError, match=r"^decoder\.dropout"):
        build_model(LIMConfig(decoder=DecoderConfig(dropout=1.5)), VOCAB)
    with pytest.raises(ValueError, match="vocabulary must start with"):
        build_model(LIMConfig(), ["a", "b", "c", "d", "e"])
