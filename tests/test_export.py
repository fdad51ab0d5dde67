"""Export: a run's model leaves as weights + config + vocabulary and comes back identical,
without the training code and without the files it was initialised from."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmr.data.vocab import Vocabulary
from cmr.eval.load import load_run_model
from cmr.export import ExportError, export_model, load_exported
from tests.launch import REPO, cpu_env
from tests.test_search import make_run, write_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"), steps=(1, 2), num_samples=12)


def same_outputs(model_a, model_b, vocab) -> bool:
    """Both models embed the same images and captions to bitwise-equal vectors."""
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([vocab.encode("a red dog and a cat"), vocab.encode("blue ball sun tree car dog")])
    lengths = torch.tensor([ids.shape[1]] * 2)
    with torch.no_grad():
        return (torch.equal(model_a.encode_image(images), model_b.encode_image(images))
                and torch.equal(model_a.encode_text(ids, lengths), model_b.encode_text(ids, lengths)))


def test_export_then_load_gives_the_same_model(run, tmp_path):
    out = export_model(run.run_dir, tmp_path / "export", "step-1")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors", "vocab.json"]
    model, vocab, cfg = load_exported(out)
    trained, trained_vocab, trained_cfg, _ = load_run_model(run.run_dir, "step-1")
    assert same_outputs(model, trained, vocab)
    assert not same_outputs(model, load_run_model(run.run_dir, "step-2")[0], vocab)  # the check can fail
    assert vocab == trained_vocab and cfg.model == trained_cfg.model and cfg.data == trained_cfg.data
    assert (out / "config.yaml").read_text() == (run.run_dir / "config.yaml").read_text()
    assert not model.training
    info = json.loads((out / "export.json").read_text())
    assert info["format"] == "cmr-export" and info["step"] == 1 and info["checkpoint"] == "step-00000001"
    assert info["source_run"] == str(run.run_dir.resolve()) and info["cmr_version"]


def test_default_is_the_best_model_else_the_latest(run, tmp_path):
    assert json.loads((export_model(run.run_dir, tmp_path / "a") / "export.json").read_text())["step"] == 2
    with_best = tmp_path / "run"
    shutil.copytree(run.run_dir, with_best)
    (with_best / "best").mkdir()
    shutil.copy(run.run_dir / "checkpoints" / "step-00000001" / "model.safetensors", with_best / "best")
    out = export_model(with_best, tmp_path / "b")
    assert json.loads((out / "export.json").read_text())["checkpoint"] == "best"
    assert same_outputs(load_exported(out)[0], load_run_model(run.run_dir, "step-1")[0], run.vocab)


def test_loading_an_export_does_not_import_the_training_code(run, tmp_path):
    out = export_model(run.run_dir, tmp_path / "export")
    code = ("import sys; from cmr.export import load_exported; load_exported(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('accelerate', 'deepspeed', 'wandb') "
            "or m.startswith(('cmr.train', 'cmr.losses', 'cmr.reward', 'cmr.experiment'))))")
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=cpu_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_export_loads_without_the_glove_file_it_was_initialised_from(tmp_path):
    glove = tmp_path / "glove.txt"
    shutil.copy(REPO / "tests" / "fixtures" / "glove_tiny.txt", glove)
    run = make_run(tmp_path, num_samples=12, changes={"model": {"text_encoder": {"glove": str(glove)}}})
    trained, vocab, _, _ = load_run_model(run.run_dir, "latest")
    assert trained.text_encoder.embedding.weight.shape[1] == 5  # the GloVe width, not word_dim
    out = export_model(run.run_dir, tmp_path / "export")
    glove.unlink()
    model, _, cfg = load_exported(out)
    assert same_outputs(model, trained, vocab) and cfg.model.text_encoder.glove is None


def test_re_export_replaces_the_earlier_export(run, tmp_path):
    export_model(run.run_dir, tmp_path / "export", "step-1")
    (tmp_path / "export" / "cache").mkdir()  # search caches of the old weights go with them
    export_model(run.run_dir, tmp_path / "export", "step-2")
    assert json.loads((tmp_path / "export" / "export.json").read_text())["step"] == 2
    assert not (tmp_path / "export" / "cache").exists()
    assert same_outputs(load_exported(tmp_path / "export")[0], load_run_model(run.run_dir, "step-2")[0], run.vocab)


def test_export_errors_say_what_is_wrong(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run.run_dir / "config.yaml").read_text())
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_model(bare, tmp_path / "out")
    with pytest.raises(ExportError, match="is not a run directory"):
        export_model(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not an earlier export"):
        export_model(run.run_dir, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_load_errors_say_what_is_wrong(run, tmp_path):
    out = export_model(run.run_dir, tmp_path / "export")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "vocab.json").unlink()
    with pytest.raises(ExportError, match=r"is not a cmr export \(missing vocab.json\)"):
        load_exported(broken)
    Vocabulary(["only", "three", "words"]).save(broken / "vocab.json")
    with pytest.raises(ExportError, match="come from different runs"):
        load_exported(broken)
    shutil.copy(out / "vocab.json", broken / "vocab.json")
    state = load_file(str(out / "model.safetensors"))
    state["image_encoder.head.0.weight"] = state["image_encoder.head.0.weight"][:, :3].contiguous()
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ExportError, match="the weights do not fit the config") as err:
        load_exported(broken)
    assert "\n" not in str(err.value)


def export_cli():
    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_export_cli(run, tmp_path, capsys):
    assert export_cli()(["--run-dir", str(run.run_dir), "--out", str(tmp_path / "e"), "--checkpoint", "step-1"]) == 0
    assert "exported step-00000001 (step 1)" in capsys.readouterr().out
    assert export_cli()(["--run-dir", str(run.run_dir), "--out", str(tmp_path / "e2"), "--checkpoint", "step-9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no complete checkpoint step-9") and "\n" not in err


def test_deepspeed_checkpoint_is_exported_as_plain_fp32_weights(run, tmp_path):
    """A ZeRO checkpoint keeps the module's weights in pytorch_model/mp_rank_00_model_states.pt."""
    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    write_checkpoint(run_dir / "checkpoints" / "step-00000003", run.cfg, run.vocab, seed=1)
    step = run_dir / "checkpoints" / "step-00000003"
    state = load_file(str(step / "model.safetensors"))
    (step / "model.safetensors").unlink()
    (step / "pytorch_model").mkdir()
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"module": half}, step / "pytorch_model" / "mp_rank_00_model_states.pt")
    out = export_model(run_dir, tmp_path / "export")
    exported = load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in exported.items() if v.is_floating_point())
    assert torch.equal(exported["text_encoder.embedding.weight"], half["text_encoder.embedding.weight"].float())
    load_exported(out)
