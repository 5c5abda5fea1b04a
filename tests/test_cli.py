"""Tests for the command line (rgkern.cli), sampling (rgkern.tools.sampling) and pictures (rgkern.tools.plots)."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rgkern import cli
from rgkern.tools.plots import GROUP_LABEL_HEIGHT, image_grid, plot_history, save_gif, save_image_grid, save_image_groups
from rgkern.tools.presets import make_config
from rgkern.tools.sampling import parse_temperature, sample_images, temperature_label, write_sample_groups, write_samples
from rgkern.tools.train import build_model


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """One CLI training run of the hidden 'tiny' preset, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    code = cli.main(["train", "--preset", "tiny", "--out", str(out), "--steps", "4", "--device", "cpu", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def model():
    """A tiny model with random (not identity) couplings."""
    model = build_model(make_config("cpu", model={"hidden": 8}), 32, 3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def grid_size(n, nrow=None, scale=2, side=32, padding=1):
    cols = min(nrow or int(np.ceil(np.sqrt(n))), n)
    rows = int(np.ceil(n / cols))
    return (cols * (side + padding) + padding) * scale, (rows * (side + padding) + padding) * scale


def groups_size(n, groups, scale=2):
    """Size of a samples.png of ``groups`` temperatures of ``n`` images each (a label strip above each grid)."""
    width, height = grid_size(n, scale=scale)
    return width, groups * (height + GROUP_LABEL_HEIGHT)


# ----------------------------------------------------------------------------- train / sample / evaluate
def test_train_writes_checkpoint_history_plot_and_samples(run_folder, capsys):
    for name in ("model.safetensors", "model.json", "history.json", "bpd.png", "samples.png", "data.png"):
        assert (run_folder / name).is_file(), name
    with Image.open(run_folder / "data.png") as picture:
        assert picture.mode == "RGB" and picture.size == grid_size(64)
        assert np.asarray(picture).std() > 10  # real images, not a blank canvas
    with Image.open(run_folder / "samples.png") as picture:  # 64 at temperature 1, 64 at 0.7
        assert picture.mode == "RGB" and picture.size == groups_size(64, 2)
    with Image.open(run_folder / "bpd.png") as picture:  # bits/dim and, for MSDS, the quality score beside it
        assert picture.size == (1200, 400)


def test_train_prints_the_final_bits_per_dim(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--steps", "2", "--num-samples", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "preset 'tiny'" in printed
    assert re.search(r"final held-out bits/dim: \d+\.\d{4}", printed)
    with Image.open(out / "samples.png") as picture:
        assert picture.size == groups_size(4, 2)
    # The samples' MSDS quality score beside the data's, at both temperatures.
    assert "MSDS1 quality score of 256 images" in printed
    assert re.search(r"data \(test split\) +8\d\.\d% oval-sized blobs, 1[45]\.\d blobs per image, colour spread 2\d\.\d", printed)
    assert re.search(r"samples, T=1 +.*oval-sized blobs", printed) and re.search(r"samples, T=0\.7 +.*oval-sized blobs", printed)
    # A second run into the same folder must say how to go on.
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--steps", "2", "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--out", str(out), "--steps", "3", "--resume", "--no-progress"]) == 0


def test_train_sample_temperature_options(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--out", str(out), "--num-samples", "4", "--no-progress"]
    assert cli.main(base + ["--steps", "2", "--sample-temperatures", "1", "0.5", "0.2,0.4,0.6,0.8"]) == 0
    with Image.open(out / "samples.png") as picture:
        assert picture.size == groups_size(4, 3)
    history = json.loads((out / "history.json").read_text())
    assert list(history[-1]["quality"]) == ["1", "0.5", "0.2,0.4,0.6,0.8"]
    assert "samples, T=0.2,0.4,0.6,0.8" in capsys.readouterr().out
    # The single temperature of before: one group; a resumed run takes the new setting.
    assert cli.main(base + ["--steps", "3", "--resume", "--sample-temperature", "0.8"]) == 0
    with Image.open(out / "samples.png") as picture:
        assert picture.size == groups_size(4, 1)
    assert list(json.loads((out / "history.json").read_text())[-1]["quality"]) == ["0.8"]
    with pytest.raises(SystemExit) as exit_info:  # one or the other
        cli.main(base + ["--overwrite", "--sample-temperature", "0.8", "--sample-temperatures", "1"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert cli.main(base + ["--overwrite", "--sample-temperatures", "1", "0.5,0.5"]) == 2
    assert "expected one per RG level" in capsys.readouterr().err


def test_sample_writes_png_and_npz(run_folder, tmp_path, capsys):
    png, npz = tmp_path / "s.png", tmp_path / "s.npz"
    args = ["sample", "--checkpoint", str(run_folder), "--num", "10", "--batch-size", "4", "--out", str(png), str(npz), "--no-progress"]
    assert cli.main(args) == 0
    with Image.open(png) as picture:
        assert picture.size == grid_size(10)
    with np.load(npz) as archive:
        images = archive["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 3, 32, 32)
    # Same seed, other batch size and a checkpoint file path: the same images.
    npz2 = tmp_path / "t.npz"
    args = ["sample", "--checkpoint", str(run_folder / "model.safetensors"), "--num", "10", "--out", str(npz2), "--no-progress"]
    assert cli.main(args) == 0
    with np.load(npz2) as archive:
        assert np.array_equal(archive["images"], images)


def test_sample_with_per_level_temperature(run_folder, tmp_path):
    png = tmp_path / "t.png"
    args = ["sample", "--checkpoint", str(run_folder), "--num", "4", "--temperature", "0.2,0.6,0.6,0.6", "--out", str(png), "--no-progress"]
    assert cli.main(args) == 0 and png.is_file()


def test_sample_with_a_temperature_list_of_the_wrong_length(run_folder, tmp_path, capsys):
    png = tmp_path / "t.png"
    args = ["sample", "--checkpoint", str(run_folder), "--temperature", "0.5,0.5", "--out", str(png), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("rgkern sample: error:") and "expected one per RG level (4 levels)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not png.exists()


def test_evaluate_reproduces_the_training_figure(run_folder, capsys):
    import json

    final = json.loads((run_folder / "history.json").read_text())[-1]["test_bpd"]
    assert cli.main(["evaluate", "--checkpoint", str(run_folder), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    value = float(re.search(r"held-out bits/dim: (\d+\.\d+)", printed).group(1))
    assert value == pytest.approx(final, abs=1e-4)


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys, command):
    args = [command, "--checkpoint", str(tmp_path / "nothing.safetensors")]
    if command == "sample":
        args += ["--out", str(tmp_path / "x.png")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_usage_errors_exit_with_code_2(tmp_path, capsys):
    assert cli.main([]) == 2
    assert cli.main(["train", "--preset", "huge", "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--data", "imagenet"]) == 2
    assert "unknown dataset 'imagenet'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--num", "0", "--checkpoint", "x", "--out", "x.png"])
    assert exit_info.value.code == 2


def test_python_dash_m_rgkern_help():
    result = subprocess.run([sys.executable, "-m", "rgkern", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("train", "sample", "evaluate"):
        assert command in result.stdout


# ----------------------------------------------------------------------------- extension subcommands
def test_extension_modules_are_required_and_import_errors_show(tmp_path, monkeypatch, capsys):
    (tmp_path / "rgk_ext_ok.py").write_text(textwrap.dedent("""
        def add_cli(subparsers):
            parser = subparsers.add_parser("hello")
            parser.add_argument("--name", default="world")
            parser.set_defaults(func=lambda args: print("hello", args.name))
    """))
    (tmp_path / "rgk_ext_broken.py").write_text("import rgk_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("rgk_ext_ok",))
    assert cli.main(["hello", "--name", "cli"]) == 0
    assert "hello cli" in capsys.readouterr().out
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("rgk_ext_missing", "rgk_ext_ok"))
    with pytest.raises(ModuleNotFoundError, match="rgk_ext_missing"):  # a missing command module is a bug, not a skip
        cli.build_parser()
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("rgk_ext_broken",))
    with pytest.raises(ModuleNotFoundError, match="rgk_no_such_dependency"):
        cli.build_parser()


# ----------------------------------------------------------------------------- sampling
def test_chunked_sampling_equals_one_batch(model):
    one = list(sample_images(model, 12, batch_size=12, seed=3, progress=False))
    chunks = list(sample_images(model, 12, batch_size=5, seed=3, progress=False))
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert torch.equal(torch.cat(chunks), one[0])
    assert one[0].dtype == torch.uint8 and one[0].shape == (12, 3, 32, 32)
    assert one[0].float().std() > 10  # random couplings: not a constant picture
    other = next(sample_images(model, 12, seed=4, progress=False))
    assert not torch.equal(other, one[0])


def test_sampling_checks_arguments_before_drawing(model):
    with pytest.raises(ValueError, match="num must be a positive int"):
        sample_images(model, 0)
    with pytest.raises(ValueError, match="expected one per RG level"):
        sample_images(model, 4, temperature=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="either generator or seed"):
        sample_images(model, 4, generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match="png and/or npz"):
        write_samples(model, 4)


def test_write_samples_streams_all_images_to_npz(model, tmp_path):
    result = write_samples(model, num=9, png=tmp_path / "g.png", npz=tmp_path / "a.npz", batch_size=4, seed=2, grid_size=4, nrow=2, scale=1, progress=False)
    expected = torch.cat(list(sample_images(model, 9, batch_size=9, seed=2, progress=False))).numpy()
    with np.load(result["npz"]) as archive:
        assert np.array_equal(archive["images"], expected)
    with Image.open(result["png"]) as picture:
        assert picture.size == grid_size(4, nrow=2, scale=1)
        grid = np.asarray(picture)
    assert np.array_equal(grid[1:33, 1:33], expected[0].transpose(1, 2, 0))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_parse_temperature():
    assert parse_temperature("0.7") == 0.7
    assert parse_temperature("0.2, 0.6,0.6,0.6") == [0.2, 0.6, 0.6, 0.6]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_temperature("hot")


# ----------------------------------------------------------------------------- plots
def test_image_grid_layout_and_greyscale(tmp_path):
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grid = image_grid(images, nrow=3, padding=1, pad_value=7)
    assert grid.shape == (1, 2 * 5 + 1, 3 * 5 + 1)
    assert np.array_equal(grid[0, 6:10, 1:5], images[3, 0].numpy())
    assert grid[0, 6, 11] == 7  # the unused last cell stays padding
    path = save_image_grid(images, tmp_path / "grey.png", nrow=3, scale=3)
    with Image.open(path) as picture:
        assert picture.mode == "L" and picture.size == (16 * 3, 11 * 3)
    with pytest.raises(TypeError, match="uint8"):
        save_image_grid(images.float(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_image_grid(images.expand(5, 2, 4, 4), tmp_path / "x.png")


def test_write_sample_groups_shows_the_same_latents_at_each_temperature(model, tmp_path):
    result = write_sample_groups(model, tmp_path / "s.png", [1.0, 0.5], num=3, seed=5, nrow=3, scale=1, progress=False)
    assert list(result["images"]) == ["1", "0.5"]
    with Image.open(result["png"]) as picture:
        assert picture.size == (3 * 33 + 1, 2 * (33 + 1 + GROUP_LABEL_HEIGHT))
        grid = np.asarray(picture)
    for group, temperature in enumerate((1.0, 0.5)):
        expected = next(sample_images(model, 3, temperature=temperature, seed=5, progress=False))
        assert torch.equal(result["images"][temperature_label(temperature)], expected)
        top = group * (34 + GROUP_LABEL_HEIGHT)
        strip = grid[top : top + GROUP_LABEL_HEIGHT]
        assert strip.min() < 60 and strip.max() > 200  # the label: light text on a dark strip
        for k in range(3):
            cell = grid[top + GROUP_LABEL_HEIGHT + 1 : top + GROUP_LABEL_HEIGHT + 33, 1 + 33 * k : 33 * (k + 1)]
            assert np.array_equal(cell, expected[k].numpy().transpose(1, 2, 0))
    assert not torch.equal(result["images"]["1"], result["images"]["0.5"])
    with pytest.raises(ValueError, match="expected one per RG level"):
        write_sample_groups(model, tmp_path / "t.png", [1.0, [1.0, 1.0]], progress=False)
    assert not (tmp_path / "t.png").exists()


def test_save_image_groups_and_gif_sizes_and_errors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=generator)
    b = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=generator)
    path = save_image_groups([a, b], ["five", "two"], tmp_path / "g.png", scale=2)
    with Image.open(path) as picture:  # 3 x 2 cells and 2 x 1 cells, the narrower one filled out
        assert picture.size == (16 * 2, (11 * 2 + GROUP_LABEL_HEIGHT) + (6 * 2 + GROUP_LABEL_HEIGHT))
    with pytest.raises(ValueError, match="one str per group"):
        save_image_groups([a, b], ["one"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="one shape"):
        save_image_groups([a, a[:, :1]], ["a", "b"], tmp_path / "x.png")
    frames = [a, 255 - a, a // 2]
    gif = save_gif(frames, tmp_path / "a.gif", labels=["0", "1", "2"], nrow=5, scale=3, duration=120)
    with Image.open(gif) as animation:
        assert animation.n_frames == 3 and animation.size == (26 * 3, 6 * 3 + GROUP_LABEL_HEIGHT)
        assert animation.info["duration"] == 120
    with Image.open(save_gif(frames, tmp_path / "b.gif", nrow=5)) as animation:  # no labels
        assert animation.n_frames == 3 and animation.size == (26, 6)
    with pytest.raises(ValueError, match="non-empty list"):
        save_gif([], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="one shape"):
        save_gif([a, b], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="duration must be a positive int"):
        save_gif(frames, tmp_path / "x.gif", duration=0)
    with pytest.raises(TypeError, match="uint8"):
        save_gif([a.float()], tmp_path / "x.gif")
    assert not any(tmp_path.glob("x.*"))


def test_plot_history_with_the_quality_score(tmp_path):
    score = {"images": 64, "blobs": 900, "blobs_per_image": 14.0, "oval_fraction": 0.5, "colour_spread": 60.0}
    history = [
        {"step": 0, "train_bpd": None, "test_bpd": 9.5, "quality": {"1": score, "0.7": dict(score, colour_spread=None)}},
        {"step": 10, "train_bpd": 8.0, "test_bpd": 7.9, "quality": {"1": score, "0.7": score}},
    ]
    path = plot_history(history, tmp_path / "bpd.png", reference=dict(score, oval_fraction=0.89))
    with Image.open(path) as picture:
        assert picture.size == (1200, 400)


def test_plot_history(tmp_path):
    history = [{"step": 0, "train_bpd": None, "test_bpd": 9.5}, {"step": 10, "train_bpd": 8.0, "test_bpd": 7.9}]
    path = plot_history(history, tmp_path / "bpd.png", title="test")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (600, 400)
    with pytest.raises(ValueError, match="list of dicts"):
        plot_history([1, 2], tmp_path / "x.png")
