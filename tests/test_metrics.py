"""Retrieval metrics: a hand-computed example, the brute-force reference, 1K folds, ties, errors."""

from __future__ import annotations

import math

import pytest
import torch

from cmr.config import ConfigError
from cmr.eval.metrics import (_count_at_least, _top_values, brute_force_metrics, coco_1k_metrics,
                              retrieval_metrics)

EVAL_JSON_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr",
                  "t2i_medr", "rsum", "i2t_map50", "t2i_map50"}


def random_pairs(num_images, captions_per_image, dim, noise, seed=0, shuffle=True):
    """Normalised image embeddings and noisy captions of them (so recalls are not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=gen), dim=1)
    owner = torch.arange(num_images).repeat_interleave(captions_per_image)
    captions = images[owner] + noise * torch.randn(len(owner), dim, generator=gen)
    captions = torch.nn.functional.normalize(captions, dim=1)
    if shuffle:
        order = torch.randperm(len(owner), generator=gen)
        captions, owner = captions[order], owner[order]
    return images, captions, owner


def tied_pairs(num_images, captions_per_image, seed=0):
    """Small-integer embeddings: scores are exact integers with many exact ties."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(-2, 3, (num_images, 4), generator=gen).float()
    owner = torch.randint(0, num_images, (num_images * captions_per_image,), generator=gen)
    owner[:num_images] = torch.arange(num_images)  # every image has a caption
    captions = images[owner] + torch.randint(-1, 2, (len(owner), 4), generator=gen).float()
    return images, captions, owner


def assert_same_metrics(fast, reference):
    assert fast.keys() == reference.keys()
    for key in fast:
        if "map" in key:  # AP sums are float64 in both, added in a different order
            assert fast[key] == pytest.approx(reference[key], abs=1e-9), key
        else:
            assert fast[key] == reference[key], key


# Hand example. Integer embeddings, so every score is exact:
#            c0  c1  c2  c3  c4      caption owners: c0, c1 -> i0;  c2 -> i1;  c3, c4 -> i2
#   i0 = (1,0) [2,  1,  1,  0,  1]
#   i1 = (0,1) [0,  1,  2,  3,  0]
#   i2 = (1,1) [2,  2,  3,  3,  1]
HAND_IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
HAND_CAPTIONS = torch.tensor([[2.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 3.0], [1.0, 0.0]])
HAND_OWNER = torch.tensor([0, 0, 1, 2, 2])
# i2t ranks: i0 best own 2, nothing >= 2 elsewhere -> 1; i1 own 2, c3=3 above -> 2;
#            i2 best own 3, c2=3 ties it and ties count against the query -> 2.
# t2i ranks: c0 own 2, i2 ties -> 2; c1 own 1, i1 ties and i2 above -> 3; c2 own 2, i2 above -> 2;
#            c3 own 3, i1 ties -> 2; c4 own 1, i0 ties -> 2.
HAND_RANK_METRICS = {
    "i2t_r1": 100 / 3, "i2t_r2": 100.0, "t2i_r1": 0.0, "t2i_r2": 80.0,
    "i2t_medr": 2.0, "t2i_medr": 2.0, "i2t_meanr": 5 / 3, "t2i_meanr": 11 / 5,
    "rsum": 100 / 3 + 100 + 0 + 80,
}


@pytest.mark.parametrize("chunking", [{}, {"chunk_size": 2, "caption_chunk_size": 2},
                                      {"chunk_size": 1, "caption_chunk_size": 1}])
def test_hand_example_caption_relevance(chunking):
    metrics = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_OWNER, ks=(1, 2), map_cutoff=2,
                                **chunking)
    # i2t relevance in ranked order (non-relevant first among ties): i0 [1,0,0,1,0] R=2,
    # i1 [0,1,0,0,0] R=1, i2 [0,1,0,0,1] R=2. AP@R: 1/2, 0, (1/2)/2. AP@2: 1/2, 1/2, 1/4.
    # t2i: one relevant image at rank 2,3,2,2,2: AP@R = 0; AP@2 = 1/rank when <= 2 -> 2/5.
    expected = dict(HAND_RANK_METRICS, i2t_mapr=25.0, i2t_map2=100 * 1.25 / 3,
                    t2i_mapr=0.0, t2i_map2=40.0)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert_same_metrics(metrics, brute_force_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_OWNER,
                                                     ks=(1, 2), map_cutoff=2))


@pytest.mark.parametrize("chunking", [{}, {"chunk_size": 1, "caption_chunk_size": 2}])
def test_hand_example_label_relevance(chunking):
    labels = ["x", "x", "y"]  # i0 and i1 share a category
    metrics = retrieval_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_OWNER, image_labels=labels,
                                ks=(1, 2), map_cutoff=2, **chunking)
    # i2t relevant: captions of same-label images. i0: [1,0,1,1,0] R=3 -> AP@R (1 + 2/3)/3,
    # AP@2 1/2; i1: [0,1,1,0,1] R=3 -> (1/2 + 2/3)/3, 1/4; i2: [0,1,0,0,1] R=2 -> 1/4, 1/4.
    # t2i: c0, c1, c2 (label x, R=2) all rank [0,1,1] -> 1/4, 1/4; c3, c4 (label y, R=1) rank
    # [0,1,0] -> 0, 1/2.
    expected = dict(HAND_RANK_METRICS,  # labels never change R@K and ranks
                    i2t_mapr=100 * (5 / 9 + 7 / 18 + 1 / 4) / 3, i2t_map2=100 / 3,
                    t2i_mapr=15.0, t2i_map2=35.0)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert_same_metrics(metrics, brute_force_metrics(HAND_IMAGES, HAND_CAPTIONS, HAND_OWNER,
                                                     image_labels=labels, ks=(1, 2), map_cutoff=2))


def test_medr_is_the_floor_of_the_median_like_vsepp():
    # Identity images make S = captions.T, so the score matrix is written down directly.
    scores = torch.tensor([[5.0, 0, 0, 0], [0, 5, 0, 0], [3, 3, 1, 0], [3, 3, 0, 1]])
    metrics = retrieval_metrics(torch.eye(4), scores.T.contiguous(), torch.arange(4))
    # i2t ranks 1, 1, 3, 3: the median is 2 (not the lower middle value 1); t2i ranks all 1.
    assert (metrics["i2t_medr"], metrics["i2t_meanr"], metrics["t2i_medr"]) == (2.0, 2.0, 1.0)


def test_returns_the_keys_the_eval_json_needs():
    images, captions, owner = random_pairs(30, 5, 16, noise=1.0)
    metrics = retrieval_metrics(images, captions, owner)
    assert EVAL_JSON_KEYS <= metrics.keys()
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["rsum"] == pytest.approx(sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i")
                                                for k in (1, 5, 10)))


@pytest.mark.parametrize("labels, chunking", [
    (None, {}),
    (None, {"chunk_size": 16, "caption_chunk_size": 64}),
    (4, {"chunk_size": 50, "caption_chunk_size": 100}),
    (9, {}),
])
def test_matches_brute_force_on_random_data(labels, chunking):
    images, captions, owner = random_pairs(150, 5, 32, noise=0.9, seed=3)
    image_labels = [i % labels for i in range(150)] if labels else None
    fast = retrieval_metrics(images, captions, owner, image_labels=image_labels, **chunking)
    assert_same_metrics(fast, brute_force_metrics(images, captions, owner,
                                                  image_labels=image_labels))
    assert 5 < fast["i2t_r1"] < 95 and 5 < fast["t2i_r1"] < 95  # not a trivial regime


def test_uneven_caption_counts_match_brute_force():
    gen = torch.Generator().manual_seed(5)
    images = torch.nn.functional.normalize(torch.randn(80, 24, generator=gen), dim=1)
    owner = torch.cat([torch.arange(80), torch.randint(0, 80, (170,), generator=gen)])
    captions = torch.nn.functional.normalize(
        images[owner] + 1.3 * torch.randn(len(owner), 24, generator=gen), dim=1)
    for image_labels in (None, [i % 3 for i in range(80)]):
        fast = retrieval_metrics(images, captions, owner, image_labels=image_labels, chunk_size=30)
        assert_same_metrics(fast, brute_force_metrics(images, captions, owner,
                                                      image_labels=image_labels))


def test_chunked_equals_unchunked():
    images, captions, owner = random_pairs(120, 5, 32, noise=1.0, seed=7)
    labels = [i % 6 for i in range(120)]
    whole = retrieval_metrics(images, captions, owner, image_labels=labels,
                              chunk_size=10**6, caption_chunk_size=10**6)
    for chunk_size, caption_chunk_size in ((16, 64), (50, 100), (120, 37)):
        chunked = retrieval_metrics(images, captions, owner, image_labels=labels,
                                    chunk_size=chunk_size, caption_chunk_size=caption_chunk_size)
        assert chunked == whole, (chunk_size, caption_chunk_size)


def test_ties_are_broken_against_the_query():
    # A collapsed model: every score equal. Each query must come out last, not first.
    images, captions = torch.ones(20, 8), torch.ones(60, 8)
    owner = torch.arange(20).repeat_interleave(3)
    for labels in (None, [i % 2 for i in range(20)]):
        metrics = retrieval_metrics(images, captions, owner, image_labels=labels)
        assert metrics["i2t_medr"] == metrics["i2t_meanr"] == 60 - 3 + 1
        assert metrics["t2i_medr"] == metrics["t2i_meanr"] == 20
        assert metrics["rsum"] == 0.0
        assert metrics["i2t_mapr"] == 0.0  # the first R positions hold only non-relevant items
        if labels is None:  # own captions at positions 58-60
            assert metrics["i2t_map50"] == 0.0
        else:  # 30 same-label captions at positions 31-60: the k-th one has precision k/(30+k)
            expected = 100 * sum(k / (30 + k) for k in range(1, 21)) / 30
            assert metrics["i2t_map50"] == pytest.approx(expected, abs=1e-12)
        assert_same_metrics(metrics, brute_force_metrics(images, captions, owner,
                                                         image_labels=labels))


@pytest.mark.parametrize("labels", [None, 3])
def test_duplicated_embeddings_match_brute_force(labels):
    # Integer embeddings with exact ties everywhere, including at the end of the top-50 lists.
    images, captions, owner = tied_pairs(150, 3, seed=11)
    image_labels = [i % labels for i in range(150)] if labels else None
    for chunking in ({}, {"chunk_size": 40, "caption_chunk_size": 90}):
        fast = retrieval_metrics(images, captions, owner, image_labels=image_labels, **chunking)
        assert_same_metrics(fast, brute_force_metrics(images, captions, owner,
                                                      image_labels=image_labels))


def test_order_of_images_and_captions_does_not_matter():
    images, captions, owner = tied_pairs(60, 4, seed=2)
    labels = [i % 4 for i in range(60)]
    before = retrieval_metrics(images, captions, owner, image_labels=labels)
    gen = torch.Generator().manual_seed(0)
    image_order = torch.randperm(60, generator=gen)
    new_index = torch.empty_like(image_order)
    new_index[image_order] = torch.arange(60)
    caption_order = torch.randperm(len(owner), generator=gen)
    after = retrieval_metrics(images[image_order], captions[caption_order],
                              new_index[owner[caption_order]],
                              image_labels=[labels[i] for i in image_order.tolist()])
    assert_same_metrics(after, before)


def test_coco_1k_evaluates_folds_separately_and_averages():
    # i2 duplicates i0 but sits in the other fold: it confuses i0 only in the 5K-style setting.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    owner = torch.tensor([3, 2, 1, 0])  # one caption per image, equal to its image
    captions = images[owner]
    assert retrieval_metrics(images, captions, owner)["i2t_r1"] == 0.0  # all tied, pessimistic
    folds = coco_1k_metrics(images, captions, owner, folds=2)
    assert folds["i2t_r1"] == folds["t2i_r1"] == 100.0
    assert folds["i2t_medr"] == 1.0


def test_coco_1k_is_the_mean_of_the_folds():
    images, captions, owner = random_pairs(100, 5, 16, noise=1.2, seed=4)
    labels = [i % 5 for i in range(100)]
    averaged = coco_1k_metrics(images, captions, owner, image_labels=torch.tensor(labels),
                               chunk_size=7)  # labels as a tensor work like a list
    per_fold = []
    for fold in range(5):
        keep = (owner >= 20 * fold) & (owner < 20 * (fold + 1))
        per_fold.append(brute_force_metrics(images[20 * fold:20 * (fold + 1)], captions[keep],
                                            owner[keep] - 20 * fold,
                                            image_labels=labels[20 * fold:20 * (fold + 1)]))
    for key in averaged:
        assert averaged[key] == pytest.approx(sum(m[key] for m in per_fold) / 5, abs=1e-9), key
    assert averaged["i2t_r1"] != retrieval_metrics(images, captions, owner)["i2t_r1"]
    reference = coco_1k_metrics(images, captions, owner, image_labels=labels,
                                metrics_fn=brute_force_metrics)
    assert_same_metrics(averaged, reference)


@pytest.mark.parametrize("num_images", [4, 7])
def test_coco_1k_rejects_image_counts_that_do_not_split(num_images):
    images, captions, owner = random_pairs(num_images, 2, 8, noise=1.0)
    with pytest.raises(ValueError, match=f"got {num_images} images"):
        coco_1k_metrics(images, captions, owner, folds=5)


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(a, caption_owner=a["caption_owner"] % 9), "image 9 has no captions"),
    (lambda a: dict(a, caption_owner=a["caption_owner"] + 1), "must index the 10 images"),
    (lambda a: dict(a, caption_owner=a["caption_owner"][:-1]), "19 entries for 20 captions"),
    (lambda a: dict(a, caption_owner=a["caption_owner"].float()), "1-D integer tensor"),
    (lambda a: dict(a, caption_emb=a["caption_emb"][:, :4]), "dimension 8 but caption_emb has 4"),
    (lambda a: dict(a, image_emb=a["image_emb"].masked_fill(a["image_emb"] > 0.5, math.nan)),
     "image_emb contains NaN"),
    (lambda a: dict(a, image_emb=a["image_emb"][0]), "image_emb must be a 2-D float tensor"),
    (lambda a: dict(a, image_labels=[0] * 9), "image_labels has 9 entries for 10 images"),
    (lambda a: dict(a, image_labels=[[0]] * 10), "image_labels must be hashable"),
])
def test_bad_input_gets_one_clear_line(change, message):
    images, captions, owner = random_pairs(10, 2, 8, noise=1.0, shuffle=False)
    args = change({"image_emb": images, "caption_emb": captions, "caption_owner": owner})
    for fn in (retrieval_metrics, brute_force_metrics):
        with pytest.raises(ValueError, match=message) as err:
            fn(**args)
        assert "\n" not in str(err.value)


def test_bad_settings_name_the_field():
    images, captions, owner = random_pairs(10, 2, 8, noise=1.0)
    with pytest.raises(ConfigError, match="chunk_size: must be >= 1"):
        retrieval_metrics(images, captions, owner, chunk_size=0)
    with pytest.raises(ConfigError, match="ks: must be positive"):
        retrieval_metrics(images, captions, owner, ks=(0, 5))


def test_count_at_least_matches_a_plain_sum():
    # Widths and heights across the 8-column words and 255-word / 255-row groups.
    gen = torch.Generator().manual_seed(0)
    for rows, width in ((1, 1), (3, 7), (256, 9), (600, 2041), (300, 4100)):
        block = torch.randint(0, 5, (rows, width), generator=gen).float()
        row_threshold = torch.randint(0, 5, (rows, 1), generator=gen).float()
        col_threshold = torch.randint(0, 5, (1, width), generator=gen).float()
        assert torch.equal(_count_at_least(block, row_threshold, dim=1),
                           (block >= row_threshold).sum(1))
        assert torch.equal(_count_at_least(block, col_threshold, dim=0),
                           (block >= col_threshold).sum(0))


def test_top_values_equal_topk_on_wide_rows_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 200, (40, 7001), generator=gen).float()  # > 4 * 51 groups of 32
    scores[5] = 3.0  # a row that is one big tie
    for block in (scores, scores.t().contiguous().t()):
        values, columns = _top_values(block, 51)
        expected = torch.topk(block, 51, dim=1).values
        assert torch.equal(values.sort(1, descending=True).values, expected)
        assert torch.equal(block.gather(1, columns), values)
        assert all(len(set(row)) == 51 for row in columns.tolist())  # 51 distinct items


@pytest.mark.slow
def test_matches_brute_force_at_a_few_thousand_captions():
    # Wide enough for the grouped top-50 selection and several row and column blocks.
    images, captions, owner = random_pairs(1600, 5, 16, noise=0.9, seed=9)
    fast = retrieval_metrics(images, captions, owner, chunk_size=512, caption_chunk_size=7000)
    assert_same_metrics(fast, brute_force_metrics(images, captions, owner))
