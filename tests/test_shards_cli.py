"""``python -m shards`` as a user runs it: exit codes and one-line errors."""

from __future__ import annotations

import pytest

import shards.__main__ as cli
from shards_fixtures import make_image_dataset, read_split, run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_build_jsonl_through_the_cli(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=6)
    out = tmp_path / "out"
    result = run_cli(
        "build",
        "jsonl",
        "--captions",
        str(captions),
        "--images-root",
        str(tmp_path / "src"),
        "--out",
        str(out),
        "--shard-size",
        "1",
        "--workers",
        "2",
        "--max-size",
        "10",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("shards.jsonl: wrote 6 samples")
    assert "sample/s" in result.stderr  # the tqdm progress bar goes to stderr
    assert len(list((out / "train").glob("shard-*.tar"))) == 2
    assert len(read_split(out, "val")) == 2


@pytest.mark.parametrize(
    "args, fragments",
    [
        ([], ["required: command"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        (["build", "parquet", "--out", "x"], ["invalid choice: 'parquet'"]),
        (
            ["build", "jsonl", "--captions", "nope.jsonl", "--images-root", ".", "--out", "o"],
            ["captions file not found: nope.jsonl"],
        ),
        (
            [
                "build",
                "jsonl",
                "--captions",
                "pyproject.toml",
                "--images-root",
                "nowhere",
                "--out",
                "o",
            ],
            ["images root is not a directory: nowhere"],
        ),
        (
            [
                "build",
                "jsonl",
                "--captions",
                "c",
                "--images-root",
                ".",
                "--out",
                "o",
                "--split-fractions",
                "0.9,0.1",
            ],
            ["--split-fractions", "expected three numbers"],
        ),
        (
            [
                "build",
                "jsonl",
                "--captions",
                "c",
                "--images-root",
                ".",
                "--out",
                "o",
                "--split-fractions",
                "0.5,0.5,0.5",
            ],
            ["split_fractions: need three fractions"],
        ),
        (
            [
                "build",
                "jsonl",
                "--captions",
                "c",
                "--images-root",
                ".",
                "--out",
                "o",
                "--shard-size",
                "0",
            ],
            ["shard_size: must be at least 1"],
        ),
        (
            [
                "build",
                "jsonl",
                "--captions",
                "c",
                "--images-root",
                ".",
                "--out",
                "o",
                "--workers",
                "two",
            ],
            ["--workers", "invalid int value"],
        ),
        (
            ["build", "karpathy", "--json", "pyproject.toml", "--images-root", ".", "--out", "o"],
            ["pyproject.toml is not valid JSON"],
        ),
        (["inspect", "no_such_dir"], ["dataset directory not found: no_such_dir"]),
        (["validate", "no_such_dir"], ["dataset directory not found: no_such_dir"]),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, fragments):
    (tmp_path / "c").write_text("")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_output_path_that_is_a_file(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=2)
    (tmp_path / "out").write_text("I am a file")
    result = run_cli(
        "build",
        "jsonl",
        "--captions",
        str(captions),
        "--images-root",
        str(tmp_path / "src"),
        "--out",
        str(tmp_path / "out"),
    )
    assert_one_line_error(result, "output path exists and is not a directory")


def test_internal_errors_are_one_line_with_a_debug_hint(tmp_path, monkeypatch, capsys):
    # No real input reaches a bug on purpose, so plant one to exercise the crash handler.
    def broken(_dir, *args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "inspect_dataset", broken)
    monkeypatch.delenv("CMR_DEBUG", raising=False)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: internal error KeyError: 'a bug' (run with CMR_DEBUG=1 for the traceback)"
    ]
    monkeypatch.setenv("CMR_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["inspect", str(tmp_path)])


def test_a_build_where_nothing_lands_fails(tmp_path):
    captions = make_image_dataset(tmp_path / "src", num_images=3)
    (tmp_path / "elsewhere").mkdir()
    result = run_cli(
        "build",
        "jsonl",
        "--captions",
        str(captions),
        "--images-root",
        str(tmp_path / "elsewhere"),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert_one_line_error(result, "no sample could be built")
    assert "  missing_image: 3 (e.g. line 1 (images/img0.jpg)" in result.stdout
