"""Sentence-level BLEU for a whole batch at once, equal to nltk's ``sentence_bleu``.

nltk (``nltk.translate.bleu_score``) is the reference: for the smoothing methods in
``FAST_METHODS`` this module returns the same float64 as nltk, bit for bit, and it is tested
against nltk on thousands of random pairs. nltk takes a few hundred microseconds per sentence
in Python; the SCST reward needs a BLEU for every sampled and every greedy caption of every
batch, so here the n-gram matching is done for the whole batch with numpy and only the final
``log``/``fsum``/``exp`` go through :mod:`math` (element by element, like nltk, so the floats
round the same way).

How the matching works without hashing or sorting: with ``E1[b, h, i, r, j]`` = "token i of
hypothesis h equals token j of reference r" (one broadcast compare), the n-gram starting at i
matches the one starting at j iff ``E1`` holds at (i, j), (i+1, j+1), ... (i+n-1, j+n-1), so
``E_n = E_{n-1} & shift(E1, n-1)``. Counting along j gives, for each hypothesis n-gram, its
count in each reference; the max over references is nltk's clipping count. A hypothesis
n-gram occurring c times is clipped to min(c, max_count): equivalently its k-th occurrence
counts iff k <= max_count, and the occurrence rank k comes from the same shift trick applied
to the hypothesis against itself. Padding uses negative sentinels that never match a token.
(In the code a sample's references lie side by side in one row, so (r, j) is one axis.)
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

# Methods reproduced exactly here; the others go through nltk itself (slow but exact).
FAST_METHODS = ("method0", "method1", "method2", "method3", "method4")
NLTK_METHODS = ("method5", "method7")
SMOOTHING_METHODS = FAST_METHODS + NLTK_METHODS
# method6 asserts a non-zero trigram precision, so it raises on short sampled captions.
REJECTED_METHODS = {"method6": "it fails on hypotheses without a matching trigram (nltk asserts)"}

# nltk's SmoothingFunction defaults (Chen & Cherry 2014): epsilon for method1, k for method4.
_EPSILON = 0.1
_METHOD4_K = 5
_HYP_PAD, _REF_PAD = -1, -2  # never equal to a token id (ids are >= 0) nor to each other
_BYTE_ONES = np.uint64(0x0101010101010101)
_MAX_BLOCK_BYTES = 2 << 20  # match tensor per block of samples: stays in cache (4 MiB: 1.7x slower)


def check_smoothing(smoothing: str) -> None:
    if smoothing in REJECTED_METHODS:
        raise ValueError(f"smoothing {smoothing!r} is not supported: {REJECTED_METHODS[smoothing]}")
    if smoothing not in SMOOTHING_METHODS:
        choices = ", ".join(SMOOTHING_METHODS)
        raise ValueError(f"unknown smoothing {smoothing!r}; expected one of {choices}")


@dataclass(frozen=True)
class BleuBatch:
    """B samples, each with H hypotheses scored against that sample's references.

    Sequences are ragged and flattened, sample-major (all of sample 0 first), so a range of
    samples is a contiguous slice of every array: cheap to cut into chunks and to pickle.
    """

    hyp_tokens: np.ndarray  # int64 [sum of hypothesis lengths], order (sample, hypothesis)
    hyp_lengths: np.ndarray  # int64 [B, H]
    ref_tokens: np.ndarray  # int64 [sum of reference lengths], order (sample, reference)
    ref_lengths: np.ndarray  # int64 [total number of references]
    refs_per_sample: np.ndarray  # int64 [B], each >= 1

    @property
    def num_samples(self) -> int:
        return int(self.hyp_lengths.shape[0])

    @classmethod
    def from_lists(cls, references: Sequence[Sequence[Sequence[int]]],
                   hypotheses: Sequence[Sequence[Sequence[int]]]) -> BleuBatch:
        """``references[b]``: the references of sample b; ``hypotheses[b]``: its H hypotheses."""
        if len(references) != len(hypotheses):
            raise ValueError(
                f"got {len(hypotheses)} hypothesis groups for {len(references)} reference groups"
            )
        num_hyps = {len(group) for group in hypotheses}
        if len(num_hyps) > 1:
            raise ValueError(
                f"every sample needs the same number of hypotheses, got {sorted(num_hyps)}"
            )
        if any(len(refs) == 0 for refs in references):
            raise ValueError("every sample needs at least one reference")
        hyps = [list(h) for group in hypotheses for h in group]
        refs = [list(r) for group in references for r in group]
        return cls(
            hyp_tokens=np.fromiter(chain.from_iterable(hyps), np.int64),
            hyp_lengths=np.array([len(h) for h in hyps], np.int64).reshape(
                len(hypotheses), max(num_hyps, default=0)
            ),
            ref_tokens=np.fromiter(chain.from_iterable(refs), np.int64),
            ref_lengths=np.array([len(r) for r in refs], np.int64),
            refs_per_sample=np.array([len(g) for g in references], np.int64),
        )

    def slice(self, start: int, stop: int) -> BleuBatch:
        """Samples ``start:stop`` as a batch of their own."""
        hyp_ends = np.concatenate([[0], np.cumsum(self.hyp_lengths.sum(axis=1))])
        ref_counts = np.concatenate([[0], np.cumsum(self.refs_per_sample)])
        ref_ends = np.concatenate([[0], np.cumsum(self.ref_lengths)])
        r0, r1 = ref_counts[start], ref_counts[stop]
        return BleuBatch(
            hyp_tokens=self.hyp_tokens[hyp_ends[start]:hyp_ends[stop]],
            hyp_lengths=self.hyp_lengths[start:stop],
            ref_tokens=self.ref_tokens[ref_ends[r0]:ref_ends[r1]],
            ref_lengths=self.ref_lengths[r0:r1],
            refs_per_sample=self.refs_per_sample[start:stop],
        )


def sentence_bleu_batch(
    references, hypotheses, max_n: int = 4, smoothing: str = "method1"
) -> np.ndarray:
    """``out[b, h]`` = nltk ``sentence_bleu(references[b], hypotheses[b][h])`` with uniform
    weights ``(1/max_n,) * max_n`` and ``SmoothingFunction().<smoothing>``; float64 [B, H]."""
    return score_batch(BleuBatch.from_lists(references, hypotheses), max_n, smoothing)


def score_batch(batch: BleuBatch, max_n: int = 4, smoothing: str = "method1") -> np.ndarray:
    """BLEU of every hypothesis in ``batch``: float64 [B, H]."""
    check_smoothing(smoothing)
    if not 1 <= max_n <= 8:
        raise ValueError(f"max_n must be in 1..8, got {max_n}")
    if smoothing in NLTK_METHODS:
        return _score_with_nltk(batch, max_n, smoothing)
    if batch.num_samples == 0:
        return np.zeros(batch.hyp_lengths.shape, np.float64)
    lowest = min(batch.hyp_tokens.min(initial=0), batch.ref_tokens.min(initial=0))
    if lowest < 0:
        raise ValueError(f"token ids must be non-negative, found {lowest}")
    hyp, ref, ref_lengths = _pad_batch(batch)
    num_refs = ref_lengths.shape[1]
    block = max(1, _MAX_BLOCK_BYTES // (hyp.shape[1] * hyp.shape[2] * ref.shape[1]))
    counts = [_match_counts(hyp[s:s + block], batch.hyp_lengths[s:s + block], ref[s:s + block],
                            num_refs, max_n)
              for s in range(0, batch.num_samples, block)]
    numerators = np.concatenate(counts)
    closest = _closest_ref_lengths(batch.hyp_lengths, ref_lengths)
    return _bleu_from_counts(numerators, batch.hyp_lengths, closest, max_n, smoothing)


def _pad_rows(tokens: np.ndarray, lengths: np.ndarray, width: int, fill: int) -> np.ndarray:
    """Ragged rows -> [num_rows, width] padded with ``fill``."""
    out = np.full((len(lengths), width), fill, dtype=tokens.dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    out[rows, np.arange(len(tokens)) - np.repeat(starts, lengths)] = tokens
    return out


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _pad_batch(batch: BleuBatch):
    """Padded token arrays in as narrow an int as the ids allow (less memory traffic):

    - hyp [B, H, round8(longest) + 8];
    - ref [B, R * ref_width + 8]: each sample's references side by side, each in a segment
      of ``ref_width`` = round8(longest) + 8 columns; samples with fewer references keep
      padding segments. One long row per sample makes the big compare below one long loop;
    - ref lengths [B, R], -1 where a sample has no r-th reference.

    The 8 columns of slack keep shifted views in bounds (and inside their own segment), and
    multiples of 8 let every count read its bool rows as uint64 words."""
    tokens_max = max(batch.hyp_tokens.max(initial=0), batch.ref_tokens.max(initial=0))
    dtype = np.int16 if tokens_max < 2**15 else np.int32 if tokens_max < 2**31 else np.int64
    num_samples, num_hyps = batch.hyp_lengths.shape
    hyp_width = _round8(int(batch.hyp_lengths.max(initial=0))) + 8
    ref_width = _round8(int(batch.ref_lengths.max(initial=0))) + 8
    hyp = _pad_rows(batch.hyp_tokens.astype(dtype), batch.hyp_lengths.ravel(), hyp_width, _HYP_PAD)
    max_refs = int(batch.refs_per_sample.max())
    first_ref = np.cumsum(batch.refs_per_sample) - batch.refs_per_sample
    sample_of_ref = np.repeat(np.arange(num_samples), batch.refs_per_sample)
    slot = np.arange(len(batch.ref_lengths)) - first_ref[sample_of_ref]
    ref_rows = _pad_rows(batch.ref_tokens.astype(dtype), batch.ref_lengths, ref_width, _REF_PAD)
    ref = np.full((num_samples, max_refs * ref_width + 8), _REF_PAD, dtype)
    ref[:, :-8].reshape(num_samples, max_refs, ref_width)[sample_of_ref, slot] = ref_rows
    ref_lengths = np.full((num_samples, max_refs), -1, np.int64)
    ref_lengths[sample_of_ref, slot] = batch.ref_lengths
    return hyp.reshape(num_samples, num_hyps, hyp_width), ref, ref_lengths


def _count_true(mask: np.ndarray, num_segments: int = 1) -> np.ndarray:
    """Number of True in each of ``num_segments`` equal segments of the last axis, as uint64
    [..., num_segments]. Segments are multiples of 8 long, the axis contiguous.

    Reads 8 bools as one uint64 word and adds words: each byte lane counts its own column,
    and multiplying by 0x0101..01 sums the 8 lanes into the top byte. At most 31 words per
    group keep that sum below 256 so no lane carries into the next."""
    words = mask.view(np.uint64)
    words = words.reshape(words.shape[:-1] + (num_segments, words.shape[-1] // num_segments))
    total = np.zeros(words.shape[:-1], np.uint64)
    for first in range(0, words.shape[-1], 31):
        acc = words[..., first].copy()
        for k in range(first + 1, min(first + 31, words.shape[-1])):
            acc += words[..., k]
        total += (acc * _BYTE_ONES) >> np.uint64(56)
    return total


def _max_over_last(values: np.ndarray) -> np.ndarray:
    """``values.max(axis=-1)`` for a short last axis; numpy's reduction is ~5x slower there."""
    out = values[..., 0].copy()
    for k in range(1, values.shape[-1]):
        np.maximum(out, values[..., k], out=out)
    return out


def _match_counts(hyp: np.ndarray, hyp_lengths: np.ndarray, ref: np.ndarray, num_refs: int,
                  max_n: int) -> np.ndarray:
    """Clipped n-gram matches (nltk's modified-precision numerators), int64 [B, H, max_n]."""
    num_pos = int(hyp_lengths.max(initial=0))  # hypothesis start positions to score
    self_pos = hyp.shape[-1] - 8  # the same, rounded up to 8 where it is the counted axis
    ref_pos = ref.shape[-1] - 8  # all reference segments
    span = max_n - 1  # how far the shifted views reach past the scored positions
    # token_eq[b, h, i, j]: token i of hypothesis h == column j of the references.
    token_eq = hyp[:, :, :num_pos + span, None] == ref[:, None, None, :]
    self_eq = hyp[:, :, :num_pos + span, None] == hyp[:, :, None, :]
    earlier = np.tri(num_pos, self_pos, -1, dtype=bool)  # [i, k]: k < i
    positions = np.arange(num_pos)
    numerators = np.zeros(hyp.shape[:2] + (max_n,), np.int64)
    ngram_eq = token_eq[..., :num_pos, :ref_pos]
    repeat_eq = self_eq[:, :, :num_pos, :self_pos] & earlier
    for n in range(1, max_n + 1):
        if n > 1:
            s = n - 1
            # Shifting along the whole row is safe: a column within ``span`` of its segment's
            # end is padding, already False, so it never picks up the next segment's tokens.
            shifted = token_eq[..., s:s + num_pos, s:s + ref_pos]
            if n == 2:
                ngram_eq = ngram_eq & shifted  # the first copy; in place from here on
            else:
                np.logical_and(ngram_eq, shifted, out=ngram_eq)
            repeat_eq &= self_eq[:, :, s:s + num_pos, s:s + self_pos]
        # Count of each hypothesis n-gram in the reference that has most of it: nltk's max_counts.
        max_ref_count = _max_over_last(_count_true(ngram_eq, num_refs))
        occurrence = _count_true(repeat_eq)[..., 0] + np.uint64(1)  # the k-th time it occurs
        starts_ngram = positions < (hyp_lengths[..., None] - n + 1)
        clipped = starts_ngram & (occurrence <= max_ref_count)
        numerators[..., n - 1] = np.count_nonzero(clipped, axis=-1)
    return numerators


def _closest_ref_lengths(hyp_lengths: np.ndarray, ref_lengths: np.ndarray) -> np.ndarray:
    """nltk's closest_ref_length: the nearest length, the shorter one on ties; int64 [B, H]."""
    present = ref_lengths >= 0
    # Sort key (|r - h|, r) packed in one int64; a missing reference gets a huge distance.
    distance = np.abs(ref_lengths[:, None, :] - hyp_lengths[:, :, None])
    distance = np.where(present[:, None, :], distance, 2**30)
    key = distance * 2**31 + np.maximum(ref_lengths, 0)[:, None, :]
    return key.min(axis=-1) % 2**31


def _map_math(fn, values: np.ndarray) -> np.ndarray:
    """Apply a :mod:`math` function element-wise; numpy's own log/exp may differ in the last bit."""
    out = np.fromiter(map(fn, values.ravel().tolist()), np.float64, values.size)
    return out.reshape(values.shape)


def _smoothed_precisions(numerators: np.ndarray, hyp_lengths: np.ndarray, smoothing: str):
    """nltk's p_n after smoothing, float64 [B, H, max_n]; entries <= 0 are skipped like nltk's
    ``if p_i > 0``. Every operation is the one nltk does on the same operands (a Fraction
    becomes float by int/int true division, which equals float division here since all
    counts are exact in float64), so results round identically."""
    max_n = numerators.shape[-1]
    orders = np.arange(1, max_n + 1)
    denominators = np.maximum(1, hyp_lengths[..., None] - orders + 1).astype(np.float64)
    num = numerators.astype(np.float64)
    zero = numerators == 0
    precision = num / denominators
    if smoothing == "method0":
        return np.where(zero, sys.float_info.min, precision)
    if smoothing == "method1":
        return np.where(zero, (0 + _EPSILON) / denominators, precision)
    if smoothing == "method2":
        plus_one = (num + 1) / (denominators + 1)
        return np.concatenate([precision[..., :1], plus_one[..., 1:]], axis=-1)
    # method3 and method4 replace the k-th zero precision, k = 1, 2, ... in order.
    k = np.cumsum(zero, axis=-1)
    if smoothing == "method3":
        return np.where(zero, 1 / (2.0**k * denominators), precision)
    assert smoothing == "method4", smoothing
    long_enough = hyp_lengths[..., None] > 1
    # (a length of 2 stands in where nltk skips the smoothing, so log(len) is never 0 here)
    log_len = _map_math(math.log, np.maximum(hyp_lengths, 2).astype(np.float64))[..., None]
    smoothed = (1 / (2.0**k * _METHOD4_K / log_len)) / denominators
    # nltk leaves p_i = 0 (then skipped) for a one-token hypothesis.
    return np.where(zero, np.where(long_enough, smoothed, 0.0), precision)


def _bleu_from_counts(
    numerators, hyp_lengths, closest_ref_lengths, max_n: int, smoothing: str
) -> np.ndarray:
    """nltk's corpus_bleu tail for one sentence: bp * exp(fsum(w * log(p_n)))."""
    precision = _smoothed_precisions(numerators, hyp_lengths, smoothing)
    positive = precision > 0
    logs = _map_math(math.log, np.where(positive, precision, 1.0))
    weighted = np.where(positive, (1 / max_n) * logs, 0.0)  # an exact 0.0 leaves fsum unchanged
    log_mean = np.fromiter(map(math.fsum, weighted.reshape(-1, max_n).tolist()), np.float64,
                           weighted.size // max_n).reshape(hyp_lengths.shape)
    hyp_len = hyp_lengths.astype(np.float64)
    shorter = (hyp_lengths <= closest_ref_lengths) & (hyp_lengths > 0)
    exponent = np.where(shorter, 1 - closest_ref_lengths / np.maximum(hyp_len, 1), 0.0)
    brevity = np.where(shorter, _map_math(math.exp, exponent), 1.0)
    bleu = brevity * _map_math(math.exp, log_mean)
    return np.where(numerators[..., 0] == 0, 0.0, bleu)  # nltk returns 0 without unigram matches


def _score_with_nltk(batch: BleuBatch, max_n: int, smoothing: str) -> np.ndarray:
    """The smoothing methods not reproduced above: call nltk sentence by sentence."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = getattr(SmoothingFunction(), smoothing)
    weights = (1 / max_n,) * max_n
    hyps = np.split(batch.hyp_tokens, np.cumsum(batch.hyp_lengths.ravel())[:-1])
    refs = np.split(batch.ref_tokens, np.cumsum(batch.ref_lengths)[:-1])
    ref_starts = np.cumsum(batch.refs_per_sample) - batch.refs_per_sample
    num_hyps = batch.hyp_lengths.shape[1]
    out = np.zeros(batch.hyp_lengths.shape, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # method0-style "0 counts of n-gram overlaps" notes
        for b in range(batch.num_samples):
            first, count = ref_starts[b], batch.refs_per_sample[b]
            sample_refs = [r.tolist() for r in refs[first:first + count]]
            for h in range(num_hyps):
                hyp = hyps[b * num_hyps + h].tolist()
                out[b, h] = sentence_bleu(sample_refs, hyp, weights, smoothing_function=smooth)
    return out
