"""Search: faiss indexes find planted neighbours, queries are encoded like the gallery, the
gallery's embeddings are cached and invalidated, and the command line works end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import faiss
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from cmr.config import ConfigError, from_dict, save_config
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.source import open_split
from cmr.eval.embed import EmbeddingSet, compute_embeddings
from cmr.eval.grid import CORRECT, HEADER_H, LABEL_H, PAD, ROW_H, TEXT_W, THUMB
from cmr.experiment import ExperimentConfig
from cmr.models.lim import build_model
from cmr.search import (
    SearchConfig, SearchError, SearchIndex, encode_query_image, encode_query_text, embeddings_cache_path,
    gallery_embeddings, unknown_words,
)
from cmr.search_results import fixed_query_grids, read_gallery_images
from tests.launch import REPO, cpu_env
from tests.tiny_data import captions_for, image_bytes, write_split

TINY = REPO / "tests" / "fixtures" / "tiny_train.yaml"


def merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def make_run(root: Path, *, steps=(1,), modality="image", num_samples=24, changes=None) -> SimpleNamespace:
    """A run directory as training leaves it (config.yaml, vocab.json, complete checkpoints with
    randomly initialised weights, seeded by step) over tiny real shards."""
    shards = root / "shards"
    for split in ("train", "val"):
        write_split(shards, split, num_samples, 10, modality=modality, feature_dim=8)
    data = yaml.safe_load(TINY.read_text())
    data["data"].update(shards=str(shards), num_workers=0)
    if modality == "features":
        data["data"]["feature_dim"] = 8
        data["model"]["image_encoder"].update(kind="features", feature_dim=8)
    cfg = from_dict(ExperimentConfig, merge(data, changes or {}))
    run_dir = root / "run"
    save_config(cfg, run_dir / "config.yaml")
    vocab = build_vocabulary(cfg.data)
    vocab.save(run_dir / "vocab.json")
    for step in steps:
        write_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}", cfg, vocab, seed=step)
    return SimpleNamespace(run_dir=run_dir, shards=shards, cfg=cfg, vocab=vocab)


def write_checkpoint(path: Path, cfg, vocab, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model(cfg.model, vocab.itos)
    path.mkdir(parents=True)
    save_file(model.state_dict(), str(path / "model.safetensors"))
    (path / "meta.json").write_text(json.dumps({"step": int(path.name.split("-")[1]), "complete": True}))


def unit(rows: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(rows, dim=1)


def planted_gallery(num_images: int, dim: int = 32, seed: int = 0) -> EmbeddingSet:
    """Random unit embeddings, two captions per image."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.arange(num_images).repeat_interleave(2)
    return EmbeddingSet(
        image_emb=unit(torch.randn(num_images, dim, generator=gen)),
        caption_emb=unit(torch.randn(2 * num_images, dim, generator=gen)),
        caption_owner=owner, caption_texts=[f"caption {c // 2}.{c % 2}" for c in range(2 * num_images)],
        ids=[f"s{i}" for i in range(num_images)], keys=[f"shard-000000.tar/{i:08d}" for i in range(num_images)],
        labels=[None] * num_images,
    )


def near(vector: torch.Tensor, seed: int, noise: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return unit((vector + noise * torch.randn(vector.shape, generator=gen))[None])[0]


# --------------------------------------------------------------------------- the index


def test_text_query_finds_the_planted_image_and_image_query_the_planted_caption():
    gallery = planted_gallery(300)
    index = SearchIndex(gallery)
    text_hits = index.search_text(near(gallery.image_emb[137], seed=1), k=5)
    image_hits = index.search_image(near(gallery.caption_emb[411], seed=2), k=5)
    assert text_hits[0][0] == 137 and image_hits[0][0] == 411
    for hits, rows, query in ((text_hits, gallery.image_emb, near(gallery.image_emb[137], seed=1)),
                              (image_hits, gallery.caption_emb, near(gallery.caption_emb[411], seed=2))):
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True) and len(hits) == 5
        expected = (rows @ query).topk(5)
        assert [i for i, _ in hits] == expected.indices.tolist()
        assert torch.allclose(torch.tensor(scores), expected.values, atol=1e-5)  # cosine scores


def test_ivf_visiting_every_cluster_gives_the_exact_results():
    gallery = planted_gallery(3000, seed=3)
    exact = SearchIndex(gallery, SearchConfig(kind="exact"))
    ivf = SearchIndex(gallery, SearchConfig(kind="ivf", nlist=24, nprobe=24))
    assert isinstance(ivf.index("images"), faiss.IndexIVFFlat) and isinstance(exact.index("images"), faiss.IndexFlatIP)
    queries = unit(torch.randn(20, 32, generator=torch.Generator().manual_seed(4)))
    for query in queries:
        for search in ("search_text", "search_image"):
            want, got = getattr(exact, search)(query, 10), getattr(ivf, search)(query, 10)
            assert [i for i, _ in got] == [i for i, _ in want]
            assert torch.allclose(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in want]), atol=1e-5)
    planted = ivf.search_text(near(gallery.image_emb[2024], seed=5), k=1)
    assert planted[0][0] == 2024


def test_auto_picks_ivf_only_for_large_galleries():
    gallery = planted_gallery(400)
    assert isinstance(SearchIndex(gallery, SearchConfig(ivf_min_items=1000)).index("images"), faiss.IndexFlatIP)
    index = SearchIndex(gallery, SearchConfig(ivf_min_items=300)).index("images")
    assert isinstance(index, faiss.IndexIVFFlat) and index.nlist == 20  # round(sqrt(400))


def test_top_k_beyond_the_gallery_returns_every_item():
    gallery = planted_gallery(4)
    assert sorted(i for i, _ in SearchIndex(gallery).search_text(gallery.image_emb[0], k=50)) == [0, 1, 2, 3]
    with pytest.raises(SearchError, match="top-k must be >= 1"):
        SearchIndex(gallery).search_text(gallery.image_emb[0], k=0)


@pytest.mark.parametrize("field, value", [("nprobe", 0), ("nlist", 0), ("kind", "hnsw")])
def test_search_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        from_dict(SearchConfig, {field: value})


# --------------------------------------------------------------------------- a real model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("search"), steps=(1, 2))


def load(run, step=1):
    from cmr.eval.load import load_run_model

    model, vocab, cfg, checkpoint = load_run_model(run.run_dir, f"step-{step}")
    return model, vocab, cfg, checkpoint


def count_image_batches(model) -> list[int]:
    calls = []
    model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("text, message", [
    ("", "the query is empty"), ("   ", "the query is empty"), ("?!, ...", "has no words"),
    ("zebra quokka", "none of the words of 'zebra quokka' is in the model's vocabulary"),
])
def test_unusable_text_queries_say_why(run, text, message):
    model, vocab, _, _ = load(run)
    with pytest.raises(SearchError, match=re.escape(message)):
        encode_query_text(model, vocab, text)


def test_text_query_with_some_unknown_words_is_encoded_as_the_caption_would_be(run):
    model, vocab, _, _ = load(run)
    assert unknown_words(vocab, "A red zebra") == ["zebra"]
    query = encode_query_text(model, vocab, "A red zebra")
    ids = torch.tensor([vocab.encode("a red zebra")])
    assert torch.equal(query, model.encode_text(ids, torch.tensor([ids.shape[1]]))[0])
    assert query.shape == (32,) and abs(float(query.norm()) - 1) < 1e-5


def test_image_file_query_matches_the_gallery_embedding_of_that_image(run, tmp_path):
    model, vocab, cfg, checkpoint = load(run)
    gallery = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    row = gallery.keys.index("shard-000001.tar/00000013")
    (tmp_path / "query.png").write_bytes(image_bytes(13))
    query = encode_query_image(model, cfg.data, tmp_path / "query.png")
    assert torch.allclose(query, gallery.image_emb[row], atol=1e-5)
    top_caption, score = SearchIndex(gallery).search_image(query, k=1)[0]
    assert top_caption == int((gallery.caption_emb @ gallery.image_emb[row]).argmax())


def test_unusable_image_queries_say_why(run, tmp_path):
    model, _, cfg, _ = load(run)
    with pytest.raises(SearchError, match="image file not found"):
        encode_query_image(model, cfg.data, tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SearchError, match="bad.png is not a usable image"):
        encode_query_image(model, cfg.data, tmp_path / "bad.png")


def test_image_query_needs_a_pixel_model(tmp_path):
    features = make_run(tmp_path, modality="features", num_samples=12)
    model, _, cfg, _ = load(features)
    (tmp_path / "q.png").write_bytes(image_bytes(0))
    with pytest.raises(SearchError, match="precomputed image features"):
        encode_query_image(model, cfg.data, tmp_path / "q.png")


# --------------------------------------------------------------------------- the cache


def test_gallery_embeddings_are_computed_once_and_equal_a_fresh_computation(run, tmp_path):
    model, vocab, cfg, checkpoint = load(run)
    calls = count_image_batches(model)
    first = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    assert calls and len(list((tmp_path / "cache").glob("embeddings-val-step-00000001-*.pt"))) == 1
    calls.clear()
    second = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    assert not calls  # served from the cache
    loader = build_loader(dataclasses.replace(cfg.data, shards=str(run.shards)), vocab, split="val", mode="eval")
    fresh = compute_embeddings(model, loader, mean=cfg.data.image.mean, std=cfg.data.image.std, device="cpu")
    for got in (first, second):
        assert torch.equal(got.image_emb, fresh.image_emb) and torch.equal(got.caption_emb, fresh.caption_emb)
        assert got.keys == fresh.keys and got.caption_texts == fresh.caption_texts and got.labels == fresh.labels
        assert torch.equal(got.caption_owner, fresh.caption_owner)
    # Each image's caption rows, in order, are its captions as the shard stores them.
    stored = [captions_for(int(key.split("/")[1])) for key in first.keys]
    assert first.caption_owner.tolist() == [i for i, captions in enumerate(stored) for _ in captions]
    assert first.caption_texts == [c for captions in stored for c in captions]


def test_cache_is_invalidated_by_a_touched_shard_and_by_another_checkpoint(run, tmp_path):
    shards = tmp_path / "shards"
    write_split(shards, "val", 12, 5)
    model, vocab, cfg, checkpoint = load(run)
    calls = count_image_batches(model)
    args = dict(shards=shards, split="val")
    gallery_embeddings(tmp_path, model, cfg, vocab, checkpoint=checkpoint, **args)
    before = list((tmp_path / "cache").iterdir())
    shard = shards / "val" / "shard-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    calls.clear()
    gallery_embeddings(tmp_path, model, cfg, vocab, checkpoint=checkpoint, **args)
    after = list((tmp_path / "cache").iterdir())
    assert calls, "a touched shard must recompute"
    assert len(after) == 1 and after != before  # the stale cache was replaced
    other_model, _, _, other_checkpoint = load(run, step=2)
    other_calls = count_image_batches(other_model)
    other = gallery_embeddings(tmp_path, other_model, cfg, vocab, checkpoint=other_checkpoint, **args)
    assert other_calls and len(list((tmp_path / "cache").iterdir())) == 2  # one per checkpoint
    first = gallery_embeddings(tmp_path, model, cfg, vocab, checkpoint=checkpoint, **args)
    assert not torch.equal(first.image_emb, other.image_emb)


def test_damaged_cache_file_is_recomputed(run, tmp_path):
    model, vocab, cfg, checkpoint = load(run)
    first = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"garbage")
    again = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    assert torch.equal(first.image_emb, again.image_emb)
    shardset = open_split(run.shards, "val")
    assert embeddings_cache_path(tmp_path / "cache", shardset, "val", checkpoint, cfg.data, vocab) == cache


def test_a_cache_of_the_older_format_is_recomputed_not_misread(run, tmp_path, monkeypatch):
    """Version 1 caches held token ids instead of caption texts; they must not be served."""
    import cmr.search

    model, vocab, cfg, checkpoint = load(run)
    shardset = open_split(run.shards, "val")
    current = embeddings_cache_path(tmp_path / "cache", shardset, "val", checkpoint, cfg.data, vocab)
    monkeypatch.setattr(cmr.search, "CACHE_VERSION", 1)
    older = embeddings_cache_path(tmp_path / "cache", shardset, "val", checkpoint, cfg.data, vocab)
    monkeypatch.undo()
    assert older != current  # the format version is part of the cache's name
    num = shardset.num_samples
    version_1 = {"image_emb": torch.zeros(num, 32), "caption_emb": torch.zeros(2 * num, 32),
                 "caption_owner": torch.arange(num).repeat_interleave(2), "captions": [[1, 3, 2]] * (2 * num),
                 "ids": [None] * num, "keys": [f"k{i}" for i in range(num)], "labels": [None] * num}
    older.parent.mkdir()
    for path in (older, current):  # also under the current name: the content is checked too
        torch.save(version_1, path)
    calls = count_image_batches(model)
    gallery = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    assert calls and gallery.image_emb.abs().sum() > 0 and gallery.caption_texts[0] == "a red and a red"
    assert not older.exists()  # the stale cache of the same split and checkpoint is removed
    calls.clear()
    again = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    assert not calls and again.caption_texts == gallery.caption_texts  # the new cache is served


# --------------------------------------------------------------------------- pictures


def test_gallery_images_are_read_by_key_from_the_shards(run):
    keys = ["shard-000002.tar/00000021", "shard-000000.tar/00000003", "shard-000000.tar/99999999"]
    found = read_gallery_images(run.shards / "val", keys)
    assert found == {keys[0]: image_bytes(21), keys[1]: image_bytes(3)}


def test_fixed_query_grids_are_deterministic_and_mark_the_captions_own_image(run):
    model, vocab, cfg, checkpoint = load(run)
    gallery = gallery_embeddings(run.run_dir, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    # Plant: every caption sits on its own image, so the own image is always the top result.
    planted = dataclasses.replace(gallery, caption_emb=gallery.image_emb[gallery.caption_owner])
    grids = fixed_query_grids(planted, run.shards / "val", num_queries=3, top_k=4)
    assert len(grids) == 3
    # Images 0, 8 and 16 of the 24 sorted keys; their first captions are "a <w> and a <w>".
    assert [text for text, _ in grids] == ["a red and a red", "a car and a red", "a sun and a green"]
    for _, picture in grids:
        assert picture.size == (PAD + 4 * (THUMB + PAD), PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD)
        assert picture.getpixel((PAD - 2, PAD + HEADER_H + PAD + THUMB // 2)) == CORRECT
    # The same queries whatever order the ranks gathered the embeddings in.
    order = torch.randperm(gallery.num_images, generator=torch.Generator().manual_seed(0))
    shuffled = reorder(planted, order.tolist())
    again = fixed_query_grids(shuffled, run.shards / "val", num_queries=3, top_k=4)
    assert [(t, g.tobytes()) for t, g in again] == [(t, g.tobytes()) for t, g in grids]


def reorder(embeddings: EmbeddingSet, order: list[int]) -> EmbeddingSet:
    new_row = {old: new for new, old in enumerate(order)}
    return dataclasses.replace(
        embeddings, image_emb=embeddings.image_emb[order],
        caption_owner=torch.tensor([new_row[int(o)] for o in embeddings.caption_owner]),
        ids=[embeddings.ids[i] for i in order], keys=[embeddings.keys[i] for i in order],
        labels=[embeddings.labels[i] for i in order])


# --------------------------------------------------------------------------- command line


def search_cli():
    spec = importlib.util.spec_from_file_location("launch_search", REPO / "launch" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def error_cases(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run.run_dir / "config.yaml").read_text())
    common = ["--shards", str(run.shards), "--split", "val", "--num-workers", "0"]
    return {
        "missing run": (["--run-dir", str(tmp_path / "nope"), "--query", "red", *common], "not a run directory"),
        "no checkpoint": (["--run-dir", str(bare), "--query", "red", *common], "no complete checkpoint"),
        "unknown step": (["--run-dir", str(run.run_dir), "--checkpoint", "step-7", "--query", "red", *common],
                         "no complete checkpoint step-7"),
        "unknown split": (["--run-dir", str(run.run_dir), "--query", "red", *common, "--split", "test"],
                          "no shards for split 'test'"),
        "empty query": (["--run-dir", str(run.run_dir), "--query", "", *common], "the query is empty"),
        "unknown words": (["--run-dir", str(run.run_dir), "--query", "zebra", *common], "none of the words"),
        "bad top-k": (["--run-dir", str(run.run_dir), "--query", "red", "--top-k", "0", *common], "--top-k must be >= 1"),
        "not an export": (["--exported", str(bare), "--query", "red"], "is not a cmr export (missing model.safetensors"),
        "export and checkpoint": (["--exported", str(bare), "--checkpoint", "best", "--query", "red"],
                                  "an export holds one model"),
        "bad nprobe": (["--run-dir", str(run.run_dir), "--query", "red", "--nprobe", "0", *common],
                       "nprobe: must be >= 1"),
    }


@pytest.mark.parametrize("case", ["missing run", "no checkpoint", "unknown step", "unknown split", "empty query",
                                  "unknown words", "bad top-k", "not an export", "export and checkpoint",
                                  "bad nprobe"])
def test_cli_errors_are_one_line_with_exit_code_2(case, run, tmp_path, capsys):
    argv, message = error_cases(run, tmp_path)[case]
    assert search_cli()(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_text_search_end_to_end(run, tmp_path):
    """The real command in its own process: ranked table, grid PNG, and the cache on reuse."""
    model, vocab, cfg, checkpoint = load(run, step=2)  # latest: step 2
    gallery = gallery_embeddings(tmp_path, model, cfg, vocab, shards=run.shards, split="val", checkpoint=checkpoint)
    query = "a dog and a green"
    expected = (gallery.image_emb @ encode_query_text(model, vocab, query)).topk(3)
    cmd = [sys.executable, str(REPO / "launch" / "search.py"), "--run-dir", str(run.run_dir), "--shards",
           str(run.shards), "--split", "val", "--query", query, "--top-k", "3", "--grid", str(tmp_path / "g.png"),
           "--num-workers", "0", "--device", "cpu"]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:5]]
    assert [row[3] for row in rows] == [gallery.keys[i] for i in expected.indices.tolist()]
    assert [float(row[1]) for row in rows] == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert "step-00000002" in result.stdout.splitlines()[0]
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.size == (PAD + 3 * (THUMB + PAD), PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD)
    (cache,) = (run.run_dir / "cache").glob("embeddings-val-step-00000002-*.pt")
    stamp = cache.stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == result.stdout
    assert cache.stat().st_mtime_ns == stamp  # reused, not rewritten


def test_cli_image_search_on_an_exported_model(run, tmp_path, capsys):
    from cmr.export import export_model, load_exported

    export = export_model(run.run_dir, tmp_path / "export", "step-1")
    (tmp_path / "q.png").write_bytes(image_bytes(5))
    argv = ["--exported", str(export), "--shards", str(run.shards), "--split", "val", "--image",
            str(tmp_path / "q.png"), "--top-k", "4", "--grid", str(tmp_path / "out" / "g.png"), "--num-workers", "0"]
    assert search_cli()(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("image -> text:") and len(lines) == 2 + 4 + 1
    (cache,) = (export / "cache").glob("embeddings-val-export-*.pt")
    model, vocab, cfg = load_exported(export)
    gallery = gallery_embeddings(export, model, cfg, vocab, shards=run.shards, split="val", checkpoint=export)
    own = gallery.image_emb[gallery.keys.index("shard-000000.tar/00000005")]
    best = (gallery.caption_emb @ own).topk(4).indices.tolist()
    owners = [gallery.keys[int(gallery.caption_owner[c])] for c in best]
    assert [line.split()[3] for line in lines[2:6]] == owners
    with Image.open(tmp_path / "out" / "g.png") as grid:
        assert grid.size == (PAD + THUMB + PAD + TEXT_W + PAD, PAD + HEADER_H + PAD + max(THUMB, 4 * ROW_H) + PAD)
