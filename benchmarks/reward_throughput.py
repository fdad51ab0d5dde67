"""BLEU-4 reward throughput, and what scoring rewards in the pool costs a training step.

1. Sentences/s on one core: nltk ``sentence_bleu`` (the reference, one call per sentence)
   against ``cmr.bleu`` (one call per batch), 20-token hypotheses with 5 references each,
   references from Flickr8k captions (synthetic Zipf captions when the data is absent). Our
   numbers are given for one hypothesis per reference set and for the reward's layout (a
   sampled and a greedy caption share their image's references). Goal: >= 20x nltk.
2. A CPU training step of the caption decoder (``cmr.models.decoder.CaptionDecoder``: words
   300, GRU 1024, vocab 3000, batch 64, 20 steps, teacher-forced forward + backward + Adam,
   fp32) timed (a) alone, (b) submitting each step's reward batch (64 samples x 5 refs) to a
   ``RewardPool`` and collecting the previous step's (pipelined by one step), (c) with the
   reward computed inline (fast BLEU), (d) with nltk inline. Rounds alternate a, b, c, d so
   all see the same machine state; medians are compared. Goal: (b)/(a) <= 1.10.

    python benchmarks/reward_throughput.py [--steps 8] [--workers 1] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from cmr.bleu import BleuBatch, score_batch
from cmr.models.decoder import CaptionDecoder, DecoderConfig
from cmr.reward import RewardConfig, RewardPool

CAPTIONS = Path("/work/shared/data/flickr8k_1k/captions.jsonl")
VOCAB, BATCH, STEPS_PER_CAPTION, HYP_LEN, NUM_REFS = 3000, 64, 20, 20, 5


def machine_info() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"numpy {np.__version__}")


def reference_sets(num_images: int, seed: int = 0) -> list[list[list[int]]]:
    """5 tokenised captions per image, as ids (Flickr8k when present)."""
    rng = random.Random(seed)
    if CAPTIONS.is_file():
        vocab: dict[str, int] = {}
        images = [json.loads(line)["captions"] for line in CAPTIONS.open()]
        return [[[vocab.setdefault(w, len(vocab) + 3) for w in c.lower().split()]
                 for c in images[i % len(images)][:NUM_REFS]] for i in range(num_images)]
    weights = [1 / (rank + 1) for rank in range(3, VOCAB)]  # Zipf-like word frequencies
    return [[rng.choices(range(3, VOCAB), weights, k=rng.randint(8, 18)) for _ in range(NUM_REFS)]
            for _ in range(num_images)]


def hypothesis(refs: list[list[int]], rng: random.Random) -> list[int]:
    """20 tokens, most from the image's own captions (so n-grams match), some random."""
    words = [w for ref in refs for w in ref]
    start = rng.randrange(len(words))
    return [words[(start + k) % len(words)] if rng.random() < 0.7 else rng.randrange(3, VOCAB)
            for k in range(HYP_LEN)]


def best_rate(fn, num_sentences: int, repeats: int = 5) -> float:
    """Sentences per second, best of ``repeats`` (the least disturbed run)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return num_sentences / min(times)


def bleu_throughput() -> list[tuple[str, float]]:
    rng = random.Random(1)
    refs = reference_sets(1024)
    hyps = [[hypothesis(r, rng), hypothesis(r, rng)] for r in refs]
    smoothing = SmoothingFunction().method1

    def run_nltk(n=300):
        for r, h in zip(refs[:n], hyps):
            sentence_bleu(r, h[0], smoothing_function=smoothing)

    one = BleuBatch.from_lists(refs, [[h[0]] for h in hyps])
    two = BleuBatch.from_lists(refs, hyps)
    nltk_rate = best_rate(run_nltk, 300)
    rates = [("nltk sentence_bleu, 1 call per sentence", nltk_rate)]
    layouts = [("cmr.bleu, 1 hyp per ref set, batches of 64", one, 64),
               ("cmr.bleu, 1 hyp per ref set, batches of 1024", one, 1024),
               ("cmr.bleu, reward layout (sampled+greedy), batches of 64", two, 64)]
    for label, batch, size in layouts:
        chunks = [batch.slice(s, s + size) for s in range(0, 1024, size)]
        num_sentences = batch.hyp_lengths.size
        rates.append((label, best_rate(lambda: [score_batch(c) for c in chunks], num_sentences)))
    return rates


class DecoderStep:
    """One teacher-forced training step of the caption decoder; returns its argmax ids."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        cfg = DecoderConfig(word_dim=300, hidden_dim=1024, max_len=STEPS_PER_CAPTION)
        self.model = CaptionDecoder(cfg, vocab_size=VOCAB, embed_dim=1024)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.images = torch.randn(BATCH, 1024)
        self.captions = torch.randint(3, VOCAB, (BATCH, STEPS_PER_CAPTION + 1))

    def __call__(self) -> torch.Tensor:
        logits = self.model(self.images, self.captions[:, :-1])
        targets = self.captions[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach().argmax(-1)


def nltk_rewards(sampled, greedy, references):
    smoothing = SmoothingFunction().method1
    # (the cleaning of <end>/<pad> is skipped: same cost class, and these ids have none)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [[sentence_bleu(refs, hyp, smoothing_function=smoothing) for hyp in (s, g)]
                for s, g, refs in zip(sampled.tolist(), greedy.tolist(), references)]


def step_times(num_steps: int, workers: int) -> dict[str, tuple[float, float]]:
    """Per mode: median seconds per step, and median seconds of it the main process spent
    on the reward (submitting and waiting, or computing it); rounds interleaved."""
    step = DecoderStep()
    references = reference_sets(BATCH, seed=2)
    references = [[[w % VOCAB for w in ref] for ref in refs] for refs in references]
    greedy = step.captions[:, 1:]
    pool = RewardPool(RewardConfig(num_workers=workers))
    inline = RewardPool(RewardConfig(num_workers=0))
    pending = None

    def timed(reward):
        ids = step()
        start = time.perf_counter()
        reward(ids)
        return time.perf_counter() - start

    def pipelined(ids):
        nonlocal pending
        previous, pending = pending, pool.submit(ids, greedy, references)
        if previous is not None:
            previous.result()

    modes = {"(a) step alone": lambda: timed(lambda ids: None),
             "(b) + reward in pool, pipelined": lambda: timed(pipelined),
             "(c) + fast reward inline": lambda: timed(
                 lambda ids: inline.compute_inline(ids, greedy, references)),
             "(d) + nltk reward inline": lambda: timed(
                 lambda ids: nltk_rewards(ids, greedy, references))}
    steps: dict[str, list[float]] = {name: [] for name in modes}
    rewards: dict[str, list[float]] = {name: [] for name in modes}
    try:
        for fn in modes.values():  # warm-up: allocator, thread pools, worker imports
            fn()
        for _ in range(num_steps):
            for name, fn in modes.items():
                start = time.perf_counter()
                rewards[name].append(fn())
                steps[name].append(time.perf_counter() - start)
        if pending is not None:
            pending.result()
    finally:
        pool.close()
    return {name: (statistics.median(steps[name]), statistics.median(rewards[name]))
            for name in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per mode")
    parser.add_argument("--workers", type=int, default=1, help="reward pool processes")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    info = machine_info()
    print(f"machine: {info}\n")

    rates = bleu_throughput()
    nltk_rate = rates[0][1]
    print("1. BLEU-4 (method1), 20-token hypotheses x 5 references, one core")
    for label, rate in rates:
        print(f"   {label:58s} {rate:10.0f} sentences/s  {rate / nltk_rate:6.1f}x nltk")

    times = step_times(args.steps, args.workers)
    base = times["(a) step alone"][0]
    print(f"\n2. decoder step (batch {BATCH}, {STEPS_PER_CAPTION} steps), "
          f"reward pool of {args.workers}, median of {args.steps}")
    for name, (seconds, reward) in times.items():
        print(f"   {name:34s} {seconds * 1000:8.1f} ms  {seconds / base:5.3f}x   "
              f"main process on the reward: {reward * 1000:6.2f} ms")
    overlap = times["(b) + reward in pool, pipelined"][0] / base

    print("\n--- markdown for benchmarks/RESULTS.md ---")
    print("### BLEU reward (`benchmarks/reward_throughput.py`)\n")
    print(f"Machine: {info}.\n")
    print("| BLEU-4, 20-token hyp x 5 refs, 1 core | sentences/s | vs nltk |\n|---|---:|---:|")
    for label, rate in rates:
        print(f"| {label} | {rate:.0f} | {rate / nltk_rate:.1f}x |")
    print(f"\n| decoder step, batch {BATCH}, pool of {args.workers} | ms/step | vs alone "
          "| main process on the reward, ms |")
    print("|---|---:|---:|---:|")
    for name, (seconds, reward) in times.items():
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / base:.3f}x | {reward * 1000:.2f} |")
    fastest = max(rate for _, rate in rates[1:]) / nltk_rate
    reward_layout = rates[3][1] / nltk_rate
    print(f"\nGoals: >= 20x nltk (best {fastest:.1f}x, reward layout {reward_layout:.1f}x); "
          f"overlapped step <= 1.10x alone ({overlap:.3f}x).")


if __name__ == "__main__":
    main()
