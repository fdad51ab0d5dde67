"""BLEU rewards: the fast batch BLEU against nltk, and the worker pool against inline scoring.

nltk's ``sentence_bleu`` is the reference throughout; the fast version must match it on every
input. Pool tests start real spawned worker processes and kill one with SIGKILL.
"""

import json
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from cmr.bleu import FAST_METHODS, NLTK_METHODS, sentence_bleu_batch
from cmr.config import ConfigError, from_dict
from cmr.reward import RewardConfig, RewardPool, RewardPoolError

CAPTIONS = Path("/work/shared/data/flickr8k_1k/captions.jsonl")
PAD, START, END = 0, 1, 2


def nltk_bleu(references, hypothesis, smoothing="method1", max_n=4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0's "0 counts of n-gram overlaps" notes
        return sentence_bleu(references, hypothesis, (1 / max_n,) * max_n,
                             smoothing_function=getattr(SmoothingFunction(), smoothing))


def nltk_scores(references, hypotheses, smoothing="method1"):
    """nltk BLEU of hypotheses[b] against references[b], as a list."""
    return [nltk_bleu(refs, hyp, smoothing) for refs, hyp in zip(references, hypotheses)]


def random_pairs(seed, num_samples, vocab=6, max_len=25, max_refs=5):
    """Small vocabulary so n-grams collide; lengths 0..max_len; 1-5 references, empty ones too."""
    rng = random.Random(seed)

    def sentence():
        return [rng.randrange(vocab) for _ in range(rng.randint(0, max_len))]

    references = [[sentence() for _ in range(rng.randint(1, max_refs))] for _ in range(num_samples)]
    hypotheses = [[sentence()] for _ in range(num_samples)]
    return references, hypotheses


def assert_matches_nltk(references, hypotheses, smoothing="method1", max_n=4):
    fast = sentence_bleu_batch(references, hypotheses, max_n=max_n, smoothing=smoothing)
    assert fast.dtype == np.float64 and fast.shape == (len(references), len(hypotheses[0]))
    expected = np.array([[nltk_bleu(refs, hyp, smoothing, max_n) for hyp in hyps]
                         for refs, hyps in zip(references, hypotheses)])
    worst = np.abs(fast - expected).max()
    assert worst <= 1e-12, f"max |fast - nltk| = {worst}"
    # Stronger than the 1e-12 contract: the same float operations, so the same bits.
    assert np.array_equal(fast, expected)


# ---------------------------------------------------------------- fast BLEU == nltk


@pytest.mark.parametrize("smoothing", FAST_METHODS)
def test_fast_bleu_equals_nltk_on_3000_random_pairs(smoothing):
    references, hypotheses = random_pairs(seed=FAST_METHODS.index(smoothing), num_samples=3000)
    assert_matches_nltk(references, hypotheses, smoothing)


@pytest.mark.parametrize("max_n", [1, 2, 3, 5])
def test_fast_bleu_equals_nltk_for_other_orders(max_n):
    references, hypotheses = random_pairs(seed=10 + max_n, num_samples=400)
    assert_matches_nltk(references, hypotheses, "method3", max_n)


@pytest.mark.parametrize("smoothing", NLTK_METHODS)
def test_nltk_fallback_methods_equal_nltk(smoothing):
    references, hypotheses = random_pairs(seed=20, num_samples=150)
    assert_matches_nltk(references, hypotheses, smoothing)


@pytest.mark.parametrize("max_len", [0, 3, 25])
def test_single_reference_batches_equal_nltk(max_len):
    references, hypotheses = random_pairs(40 + max_len, 200, max_len=max_len, max_refs=1)
    assert_matches_nltk(references, hypotheses)


def test_edge_cases_equal_nltk():
    cases = [
        ([[1, 2, 3, 4, 5]], []),  # empty hypothesis
        ([[1, 2, 3, 4, 5]], [1]),  # shorter than every n
        ([[1, 2, 3, 4, 5]], [1, 2, 3]),  # no 4-gram at all
        ([[], []], [1, 2, 3, 4]),  # only empty references
        ([[7, 7, 7, 7, 8]], [7, 7, 7, 7, 7, 7, 7]),  # clipping of a repeated word
        ([[1, 2, 3, 4, 5, 6], [1, 2]], [1, 2, 3, 4]),  # closest length 2 or 6: tie, shorter wins
        ([[5, 6, 7, 8, 9]], [5, 6, 7, 8, 9]),  # perfect match
        ([[1, 2, 1, 2, 1, 2]], [1, 2, 1, 2, 1, 2, 1, 2, 1]),  # overlapping repeated n-grams
        ([[9] * 30], [9] * 40),  # longer than the 8-wide blocks
    ]
    for smoothing in FAST_METHODS:
        assert_matches_nltk([refs for refs, _ in cases], [[hyp] for _, hyp in cases], smoothing)


def test_large_and_sparse_token_ids_equal_nltk():
    # ids beyond int16 and int32 take the wider code paths
    for offset in (40_000, 2**40):
        references, hypotheses = random_pairs(seed=30, num_samples=300)
        shift = lambda seqs: [[tok + offset for tok in s] for s in seqs]  # noqa: E731
        assert_matches_nltk([shift(r) for r in references], [shift(h) for h in hypotheses])


def real_captions():
    if not CAPTIONS.is_file():
        pytest.skip(f"{CAPTIONS} is not available")
    with CAPTIONS.open() as f:
        return [[c.lower().split() for c in json.loads(line)["captions"]] for line in f]


def test_fast_bleu_equals_nltk_on_real_captions():
    images = real_captions()[:300]
    vocab = {}
    ids = [[[vocab.setdefault(w, len(vocab)) for w in c] for c in caps] for caps in images]
    # Leave-one-out (caption 0 against the other four) and a caption of the next image.
    references = [caps[1:] for caps in ids]
    hypotheses = [[caps[0], ids[(i + 1) % len(ids)][0]] for i, caps in enumerate(ids)]
    fast = sentence_bleu_batch(references, hypotheses)
    for i, caps in enumerate(images):  # nltk on the words themselves
        other = images[(i + 1) % len(images)][0]
        assert fast[i].tolist() == [nltk_bleu(caps[1:], caps[0]), nltk_bleu(caps[1:], other)]
    assert (fast[:, 0] > fast[:, 1]).mean() > 0.8  # an image's own caption scores higher


def test_bad_token_ids_raise_one_line_errors():
    with pytest.raises(ValueError, match="non-negative"):
        sentence_bleu_batch([[[1, 2]]], [[[-3, 1]]])
    with pytest.raises(ValueError, match="at least one reference"):
        sentence_bleu_batch([[]], [[[1, 2]]])
    with pytest.raises(ValueError, match="method6"):
        sentence_bleu_batch([[[1, 2]]], [[[1, 2]]], smoothing="method6")


# ---------------------------------------------------------------- rewards (inline)


def padded(seqs, width):
    """[<start>] + tokens + [<end>] + <pad>..., as a LongTensor [N, width]."""
    out = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = [START] + s + [END]
        out[i, :len(row)] = torch.tensor(row)
    return out


def word_ids(seed, num_samples, num_refs=5):
    rng = random.Random(seed)

    def caption():
        return [rng.randrange(3, 40) for _ in range(rng.randint(1, 18))]

    sampled = [caption() for _ in range(num_samples)]
    greedy = [caption() for _ in range(num_samples)]
    references = [[caption() for _ in range(num_refs)] for _ in range(num_samples)]
    return sampled, greedy, references


def test_inline_rewards_equal_nltk_on_decoder_style_tensors():
    sampled, greedy, references = word_ids(seed=1, num_samples=40)
    sampled_ids = padded(sampled, 22)
    sampled_ids[0, len(sampled[0]) + 2:] = 5  # junk after <end> must be ignored
    greedy_ids = padded(greedy, 20)
    ref_ids = torch.stack([padded(refs, 21) for refs in references])  # [B, R, T]
    with RewardPool(RewardConfig(num_workers=0)) as pool:
        out = pool.compute_inline(sampled_ids, greedy_ids, ref_ids)
    assert out.rewards.dtype == np.float64 and out.rewards.shape == (40,)
    assert out.rewards.tolist() == nltk_scores(references, sampled)
    assert out.baselines.tolist() == nltk_scores(references, greedy)
    np.testing.assert_array_equal(out.advantages, out.rewards - out.baselines)


def test_input_forms_give_the_same_rewards():
    sampled, greedy, references = word_ids(seed=9, num_samples=6)
    references[2] = references[2][:3]  # images may have different numbers of captions
    pool = RewardPool(RewardConfig(num_workers=0))
    expected = pool.compute_inline(sampled, greedy, references)
    as_tensors = pool.compute_inline(
        [torch.tensor([START] + s + [END]) for s in sampled],  # list of 1-D tensors
        np.asarray(padded(greedy, 25)),  # numpy [B, T]
        [padded(refs, 20 + i) for i, refs in enumerate(references)],  # list of [R, T] tensors
    )
    assert np.array_equal(as_tensors.rewards, expected.rewards)
    assert np.array_equal(as_tensors.baselines, expected.baselines)
    assert expected.rewards.tolist() == nltk_scores(references, sampled)


def test_empty_references_are_dropped_and_a_sample_without_any_is_an_error():
    sampled, greedy, references = word_ids(seed=2, num_samples=3)
    with_padding_refs = [refs + [[PAD, PAD], [START, END]] for refs in references]
    pool = RewardPool(RewardConfig(num_workers=0))
    out = pool.compute_inline(sampled, greedy, with_padding_refs)
    assert out.rewards.tolist() == nltk_scores(references, sampled)
    with pytest.raises(ValueError, match="sample 1 has no non-empty reference"):
        pool.compute_inline(sampled, greedy, [references[0], [[PAD]], references[2]])


def test_bad_inputs_raise_one_line_errors():
    pool = RewardPool(RewardConfig(num_workers=0))
    sampled, greedy, references = word_ids(seed=3, num_samples=4)
    with pytest.raises(ValueError, match="greedy: got 3 captions for 4"):
        pool.submit(sampled, greedy[:3], references)
    with pytest.raises(ValueError, match="references: got 2 samples for 4"):
        pool.submit(sampled, greedy, references[:2])
    with pytest.raises(ValueError, match="integer token ids"):
        pool.submit(torch.rand(4, 5), greedy, references)
    with pytest.raises(ValueError, match="non-negative"):
        pool.submit([[-4, 5]] + sampled[1:], greedy, references)


@pytest.mark.parametrize("fields, field", [
    ({"smoothing": "method6"}, "smoothing"),
    ({"smoothing": "add-one"}, "smoothing"),
    ({"start_method": "fork"}, "start_method"),
    ({"num_workers": -1}, "num_workers"),
    ({"max_n": 0}, "max_n"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"start_timeout_s": -1.0}, "start_timeout_s"),
    ({"chunk_size": -2}, "chunk_size"),
])
def test_config_errors_name_the_field(fields, field):
    with pytest.raises(ConfigError) as err:
        from_dict(RewardConfig, fields)
    assert err.value.field == field and "\n" not in str(err.value)


# ---------------------------------------------------------------- the worker pool


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.distributed
def test_pool_equals_inline_and_nltk_on_real_and_random_captions():
    images = real_captions()[:96]
    vocab = {}
    ids = [[[vocab.setdefault(w, len(vocab) + 3) for w in c] for c in caps] for caps in images]
    real = ([caps[0] for caps in ids], [ids[(i + 1) % 96][1] for i in range(96)],
            [caps[1:] for caps in ids])
    random_batch = word_ids(seed=4, num_samples=61)
    for chunk_size in (0, 7):  # even split over the workers, and uneven small chunks
        with RewardPool(RewardConfig(num_workers=2, chunk_size=chunk_size)) as pool:
            for sampled, greedy, references in (real, random_batch):
                pooled = pool.submit(sampled, greedy, references).result()
                inline = pool.compute_inline(sampled, greedy, references)
                assert np.array_equal(pooled.rewards, inline.rewards)
                assert np.array_equal(pooled.baselines, inline.baselines)
                assert pooled.rewards.tolist() == nltk_scores(references, sampled)
                assert pooled.baselines.tolist() == nltk_scores(references, greedy)


def slow_batch(num_samples=3000):
    """A batch that keeps a worker busy for a while: method5 goes through nltk itself."""
    return word_ids(seed=5, num_samples=num_samples)


@pytest.mark.distributed
def test_killed_worker_is_reported_and_the_pool_recovers():
    cfg = RewardConfig(num_workers=2, smoothing="method5", timeout_s=30.0)
    with RewardPool(cfg) as pool:
        sampled, greedy, references = slow_batch()
        old_pids = pool.worker_pids()
        assert len(old_pids) == 2
        future = pool.submit(sampled, greedy, references)
        os.kill(old_pids[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(RewardPoolError, match="worker process died"):
            future.result()
        assert time.monotonic() - started < 5.0
        # The next submit starts fresh workers and gives the right numbers.
        small = word_ids(seed=6, num_samples=20)
        out = pool.submit(*small).result()
        assert out.rewards.tolist() == nltk_scores(small[2], small[0], "method5")
        assert pool.num_restarts == 1
        assert not set(pool.worker_pids()) & set(old_pids)
        assert not any(alive(pid) for pid in old_pids)


@pytest.mark.distributed
def test_timeout_raises_instead_of_hanging_and_the_pool_recovers():
    cfg = RewardConfig(num_workers=1, smoothing="method5", timeout_s=0.2)
    with RewardPool(cfg) as pool:
        stuck_pids = pool.worker_pids()
        future = pool.submit(*slow_batch(4000))  # ~seconds of nltk work
        started = time.monotonic()
        with pytest.raises(RewardPoolError, match="not ready after 0.2 s"):
            future.result()
        assert time.monotonic() - started < 3.0
        assert not any(alive(pid) for pid in stuck_pids)
        small = word_ids(seed=7, num_samples=5)
        out = pool.submit(*small).result(timeout=30)  # an explicit timeout overrides timeout_s
        assert out.rewards.tolist() == nltk_scores(small[2], small[0], "method5")


@pytest.mark.distributed
def test_close_leaves_no_worker_processes():
    pool = RewardPool(RewardConfig(num_workers=2))
    pids = pool.worker_pids()
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    pool.submit(*word_ids(seed=8, num_samples=10)).result()
    pool.close()
    children = {child.pid for child in psutil.Process().children(recursive=True)}
    assert not children & set(pids)
    assert not any(alive(pid) for pid in pids)
    with pytest.raises(RewardPoolError, match="closed"):
        pool.submit(*word_ids(seed=8, num_samples=2))
