"""Counts what this process's evaluation encoder saw, for the per-rank reports of the drivers.

Installed by importing: ``cmr.eval.embed.compute_embeddings`` looks ``encode_batch`` up in its
module at each call, so replacing it there counts every batch any evaluation encodes.
"""

from cmr.eval import embed


class EmbedCounter:
    def __init__(self):
        self.num_images = 0  # real rows (padding excluded)
        self.keys: list[str] = []
        self._encode_batch = embed.encode_batch

    def encode_batch(self, model, batch, *args, **kwargs):
        real = batch.mask.tolist()
        self.num_images += sum(real)
        self.keys += [key for key, is_real in zip(batch.keys, real) if is_real]
        return self._encode_batch(model, batch, *args, **kwargs)


embed_counter = EmbedCounter()
embed.encode_batch = embed_counter.encode_batch
