"""Explainability tools: receptive fields, traversal, mixed temperatures, scale mixing, progressive
generation and their command-line subcommands, on tiny random models (couplings not the identity)."""
import pytest
import torch
from PIL import Image

from rgkern.cli import build_parser, main
from rgkern.tools import explain
from rgkern.tools.checkpoint import save_checkpoint

from utils import random_images, tiny_model

CONFIGS = [dict(L=8, C=3, k=2), dict(L=16, C=1, k=4), dict(L=16, C=1, k=4, variant="authors")]


def single_latent(model, i, j):
    mask = torch.zeros(model.image_size, model.image_size, dtype=torch.bool)
    mask[i, j] = True
    return mask


def middle_position(model, level):
    positions = explain.latent_positions(model, level)
    return tuple(positions[len(positions) // 2].tolist())


# ----------------------------------------------------------------------------- receptive fields
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"L{c['L']}C{c['C']}k{c['k']}-{c.get('variant', 'paper')}")
def test_receptive_field_is_zero_outside_the_generation_cone_and_nonzero_inside(config):
    model = tiny_model(**config)
    z = model.sample_latents(3, generator=torch.Generator().manual_seed(0))
    for level in range(model.num_levels):
        position = middle_position(model, level)
        fields = explain.receptive_field(model, level, position, z)  # (C, L, L)
        cone = model.geometry.generation_cone(single_latent(model, *position))
        assert fields.shape == (model.channels, model.image_size, model.image_size)
        assert bool((fields[:, ~cone] == 0).all()), f"level {level}: non-zero outside the cone"
        assert bool((fields[:, cone].sum(dim=1) > 0).all()), f"level {level}: zero inside the cone"
        if level == 0:
            assert not bool(cone.all())


def test_receptive_field_matches_full_decode_jvps():
    """The cone-restricted forward-mode pass against a JVP of the whole decoder, latent by latent."""
    model = tiny_model(L=16, C=3, k=4)
    z = model.sample_latents(2, generator=torch.Generator().manual_seed(1))
    for level, channel in ((0, 2), (1, None), (2, 0)):
        positions = explain.latent_positions(model, level)[:2]
        fields = explain.receptive_field(model, level, positions, z, channel=channel)
        for (i, j), field in zip(positions.tolist(), fields):
            expected = []
            for c in range(3) if channel is None else [channel]:
                tangent = torch.zeros_like(z)
                tangent[:, c, i, j] = 1
                derivative = torch.func.jvp(model.decode, (z,), (tangent,))[1]
                expected.append(derivative.abs().sum(dim=1).mean(dim=0))
            expected = torch.stack(expected) if channel is None else expected[0]
            torch.testing.assert_close(field, expected, rtol=1e-10, atol=1e-13)


def test_receptive_field_shapes_and_sampled_batch():
    model = tiny_model(L=8, C=3, k=2)
    g = torch.Generator().manual_seed(2)
    positions = explain.latent_positions(model, 0)[:4]
    assert explain.receptive_field(model, 0, positions, num_samples=2, generator=g).shape == (4, 3, 8, 8)
    assert explain.receptive_field(model, 0, positions, num_samples=2, channel=1, generator=g).shape == (4, 8, 8)
    assert explain.receptive_field(model, 0, tuple(positions[0].tolist()), num_samples=2, channel=1).shape == (8, 8)


def test_receptive_fields_per_level_covers_every_level(tmp_path):
    model = tiny_model(L=8, C=3, k=2)
    g = torch.Generator().manual_seed(3)
    results = explain.receptive_fields_per_level(model, per_level=None, num_samples=2, generator=g)
    assert [r.level for r in results] == list(range(model.num_levels))
    assert [r.fields.shape[0] for r in results] == model.geometry.latent_counts
    for r in results:
        c, i, j = r.latents.unbind(dim=1)
        assert bool((model.levels[i, j] == r.level).all())
        assert r.strengths.shape == (r.fields.shape[0],) and bool((r.strengths > 0).all())
    some = explain.receptive_fields_per_level(model, per_level=2, num_samples=2, generator=g)
    assert [r.fields.shape[0] for r in some] == [2] * model.num_levels
    grid = explain.plot_receptive_fields(some, tmp_path / "rf.png")
    histogram = explain.plot_receptive_field_histograms(results, tmp_path / "hist.png")
    for path in (grid, histogram):
        with Image.open(path) as image:
            assert image.format == "PNG"


# ----------------------------------------------------------------------------- traversal
def test_traversal_of_a_level0_latent_changes_only_pixels_in_its_generation_cone():
    model = tiny_model(L=16, C=3, k=4)
    z = model.sample_latents(2, generator=torch.Generator().manual_seed(4))
    position = middle_position(model, 0)
    values = [-2.0, 0.0, 2.5]
    images = explain.traverse(model, z, 0, position, channel=1, values=values)
    assert images.shape == (2, 3, 3, 16, 16)
    base = model.decode(z).detach()
    cone = model.geometry.generation_cone(single_latent(model, *position))
    change = (images - base[:, None]).abs().amax(dim=(0, 1, 2))  # (L, L)
    assert float(change[~cone].max()) <= 1e-12
    assert float(change[cone].max()) > 1e-3
    # the traversed latent really takes each value, and only it changes
    latents = model.encode(images.flatten(0, 1))[0].view(2, 3, 3, 16, 16)
    torch.testing.assert_close(latents[:, :, 1, position[0], position[1]], torch.tensor(values).double().expand(2, 3))


def test_traversal_of_all_channels_and_from_uint8_images():
    model = tiny_model(L=8, C=3, k=2)
    images = torch.randint(0, 256, (2, 3, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    position = middle_position(model, model.num_levels - 1)
    out = explain.traverse(model, images, model.num_levels - 1, position, values=[0.5, -1.0])
    latents = model.encode(out.flatten(0, 1))[0].view(2, 2, 3, 8, 8)
    torch.testing.assert_close(latents[1, 1, :, position[0], position[1]], torch.full((3,), -1.0, dtype=torch.float64))


# ----------------------------------------------------------------------------- mixed temperatures
def test_temperature_zero_at_every_level_gives_decode_of_zero():
    model = tiny_model(L=8, C=3, k=2)
    H = model.num_levels
    settings = [(0.0,) * H, 1.0, (0.2,) + (0.6,) * (H - 1)]
    grid = explain.mixed_temperature_grid(model, settings, n=3, generator=torch.Generator().manual_seed(6))
    assert grid.shape == (3, 3, 3, 8, 8)
    zero = model.decode(torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    torch.testing.assert_close(grid[0], zero.expand(3, -1, -1, -1))
    # rows share one unit-temperature draw: row 1 (T = 1) is that draw decoded
    unit = model.sample_latents(3, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(grid[1], model.decode(unit))
    defaults = explain.default_temperature_settings(H)
    assert (0.2,) + (0.6,) * (H - 1) in defaults and len(explain.mixed_temperature_grid(model, n=1)) == len(defaults)


# ----------------------------------------------------------------------------- scale mixing
def test_scale_mix_cut_above_the_top_returns_the_first_image_and_below_level0_the_second():
    model = tiny_model(L=16, C=3, k=4)
    x_a, x_b = random_images(model, 2, seed=7), random_images(model, 2, seed=8)
    H = model.num_levels
    torch.testing.assert_close(explain.scale_mix(model, x_a, x_b, H), x_a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(explain.scale_mix(model, x_a, x_b, 0), x_b, rtol=1e-9, atol=1e-9)
    all_cuts = explain.scale_mix_all_cuts(model, x_a, x_b)
    assert all_cuts.shape == (2, H + 1, 3, 16, 16)
    levels = model.geometry.latent_level_of_elements()
    z_a, z_b = model.encode(x_a)[0], model.encode(x_b)[0]
    for cut in range(H + 1):
        z = model.encode(all_cuts[:, cut])[0]
        torch.testing.assert_close(z, torch.where(levels < cut, z_a, z_b))


def test_scale_mix_of_uint8_images():
    model = tiny_model(L=8, C=3, k=2)
    g = torch.Generator().manual_seed(9)
    a, b = (torch.randint(0, 256, (1, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2))
    from rgkern import postprocess

    assert torch.equal(postprocess(explain.scale_mix(model, a, b, model.num_levels)), a)
    assert torch.equal(postprocess(explain.scale_mix(model, a, b, 0)), b)


# ----------------------------------------------------------------------------- progressive generation
def test_progressive_generation_runs_from_decode_of_zero_to_the_full_decode():
    model = tiny_model(L=8, C=3, k=2)
    z = model.sample_latents(2, generator=torch.Generator().manual_seed(10))
    columns = explain.progressive_generation(model, z)
    H = model.num_levels
    assert columns.shape == (2, H + 1, 3, 8, 8)
    torch.testing.assert_close(columns[:, 0], model.decode(torch.zeros_like(z)))
    torch.testing.assert_close(columns[:, H], model.decode(z))
    levels = model.geometry.latent_level_of_elements()
    for t in range(H + 1):
        kept = model.encode(columns[:, t])[0]
        torch.testing.assert_close(kept, torch.where(levels >= H - t, z, torch.zeros_like(z)), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_value_and_the_expected_range():
    model = tiny_model(L=8, C=3, k=2)  # H = 3
    z = model.sample_latents(1)
    with pytest.raises(ValueError, match=r"level 3 .*0\.\.2"):
        explain.receptive_field(model, 3, (0, 0), z)
    with pytest.raises(ValueError, match=r"level -1 .*0\.\.2"):
        explain.traverse(model, z, -1, (0, 1))
    with pytest.raises(ValueError, match=r"\(8, 1\) is outside the image.*7"):
        explain.traverse(model, z, 0, (8, 1))
    with pytest.raises(ValueError, match=r"\(0, 0\) holds a latent of RG level 2, not level 0"):
        explain.receptive_field(model, 0, [(0, 1), (0, 0)], z)
    with pytest.raises(ValueError, match=r"channel 3 .*0\.\.2"):
        explain.traverse(model, z, 0, (0, 1), channel=3)
    x = random_images(model, 1)
    for cut in (-1, 4):
        with pytest.raises(ValueError, match=rf"cut {cut} .*0\.\.3"):
            explain.scale_mix(model, x, x, cut)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 3, 8, 8\).*\(2, 3, 8, 8\)"):
        explain.scale_mix(model, x, random_images(model, 2), 1)
    with pytest.raises(ValueError, match=r"same shape.*\(1, 3, 8, 8\).*\(1, 3, 16, 16\)"):
        explain.scale_mix(model, x, torch.zeros(1, 3, 16, 16, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match=r"temperature has 2 entries"):
        explain.mixed_temperature_grid(model, [(0.1, 0.2)], n=1)
    with pytest.raises(ValueError, match=r"per_level"):
        explain.receptive_fields_per_level(model, per_level=0, z=z)


# ----------------------------------------------------------------------------- command line
def run_cli(argv):
    """Run a subcommand's handler directly (exceptions propagate), as ``python -m rgkern`` parses it."""
    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(L=8, C=3, k=2, dtype=torch.float32)
    return save_checkpoint(tmp_path_factory.mktemp("explain") / "tiny.safetensors", model)


def grid_size(rows, columns, L=8, scale=2):
    return ((columns * (L + 1) + 1) * scale, (rows * (L + 1) + 1) * scale)


@pytest.mark.parametrize(
    "command, extra, rows, columns",
    [
        ("traverse", ["--level", "0", "--channel", "1", "--values", "-1", "0", "1"], 2, 3),
        ("traverse", ["--level", "2"], 2, 7),  # strongest top-level latent, all channels, default values
        ("mix-temperature", ["--setting", "0.2,0.6,0.6", "--setting", "0"], 2, 2),
        ("mix-temperature", [], 5, 2),
        ("scale-mix", [], 2, 3 + 3),  # first image, cuts 3..0, second image
        ("scale-mix", ["--cut", "1"], 2, 3),
        ("progressive", [], 2, 3 + 1),
    ],
)
def test_cli_commands_write_pngs_of_the_expected_size(checkpoint, tmp_path, command, extra, rows, columns):
    out = tmp_path / f"{command}.png"
    argv = [command, "--checkpoint", str(checkpoint), "--out", str(out), "--num", "2", "--scale", "2", "--no-progress"]
    assert main(argv + extra) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == grid_size(rows, columns)


def test_cli_receptive_fields_writes_the_grid_and_the_histogram(checkpoint, tmp_path):
    out = tmp_path / "rf.png"
    argv = ["receptive-fields", "--checkpoint", str(checkpoint), "--out", str(out), "--num", "2", "--per-level", "3"]
    assert main(argv + ["--no-progress"]) == 0
    # matplotlib figures at 100 dpi: (0.9 * 3 columns + 0.6, 0.9 * 3 levels + 0.3) and (2.2 * 3 levels, 2) inches
    for path, size in ((out, (330, 300)), (tmp_path / "rf-hist.png", (660, 200))):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == size


def test_cli_on_msds1_test_images(tmp_path):
    model = tiny_model(L=32, C=3, k=4, dtype=torch.float32)
    path = save_checkpoint(tmp_path / "run" / "model.safetensors", model)
    out = tmp_path / "progressive.png"
    argv = ["progressive", "--checkpoint", str(path.parent), "--out", str(out), "--data", "msds1", "--num", "2"]
    assert main(argv + ["--scale", "1", "--no-progress"]) == 0
    with Image.open(out) as image:
        assert image.size == grid_size(2, model.num_levels + 2, L=32, scale=1)  # h = H .. 0, then the original


def test_cli_errors(checkpoint, tmp_path, capsys):
    missing = tmp_path / "no-such-run" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        run_cli(["progressive", "--checkpoint", str(missing), "--out", str(tmp_path / "p.png")])
    common = ["--checkpoint", str(checkpoint), "--no-progress"]
    with pytest.raises(ValueError, match=r"cut 9 .*0\.\.3"):
        run_cli(["scale-mix", *common, "--out", str(tmp_path / "s.png"), "--cut", "9"])
    with pytest.raises(ValueError, match=r"level 5 .*0\.\.2"):
        run_cli(["traverse", *common, "--out", str(tmp_path / "t.png"), "--level", "5"])
    with pytest.raises(ValueError, match=r"\(0, 0\) holds a latent of RG level 2"):
        run_cli(["traverse", *common, "--out", str(tmp_path / "t.png"), "--level", "0", "--position", "0", "0"])
    with pytest.raises(ValueError, match=r"--data msds1 has images of shape \(3, 32, 32\).*\(3, 8, 8\)"):
        run_cli(["progressive", *common, "--out", str(tmp_path / "p.png"), "--data", "msds1", "--num", "1"])
    # through the command line: one line on stderr, exit code 2
    assert main(["scale-mix", *common, "--out", str(tmp_path / "s.png"), "--cut", "-1"]) == 2
    assert "rgkern scale-mix: error: cut -1 is out of range; expected an int in 0..3" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "command, extra, frames",
    [
        ("traverse", ["--level", "0", "--channel", "1", "--values", "-1", "0", "1"], 3),
        ("traverse", ["--level", "2"], 7),  # the default values
        ("progressive", [], 3 + 1),  # h = H .. 0
    ],
)
def test_cli_gif_has_one_frame_per_value_or_step(checkpoint, tmp_path, command, extra, frames):
    import numpy as np

    from rgkern.tools.plots import GROUP_LABEL_HEIGHT

    out, gif = tmp_path / f"{command}.png", tmp_path / f"{command}.gif"
    argv = [command, "--checkpoint", str(checkpoint), "--out", str(out), "--num", "2", "--scale", "2", "--no-progress"]
    assert main(argv + extra + ["--gif", str(gif), "--frame-ms", "200"]) == 0
    with Image.open(out) as image:
        picture = np.asarray(image.convert("RGB"))
    width, height = grid_size(1, 2)  # each frame: the 2 images side by side, under its label
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.is_animated and image.n_frames == frames
        assert image.size == (width, height + GROUP_LABEL_HEIGHT)
        assert image.info["duration"] == 200 and image.info["loop"] == 0
        for t in range(frames):
            image.seek(t)
            frame = np.asarray(image.convert("RGB"))[GROUP_LABEL_HEIGHT:]
            # Frame t holds column t of the PNG (its rows side by side); the few colours of these
            # pictures fit the GIF palette exactly.
            cell = 9 * 2  # (L + padding) * scale
            for row in range(2):
                expected = picture[2 + row * cell : (row + 1) * cell, 2 + t * cell : (t + 1) * cell]
                assert np.array_equal(frame[2 : cell, 2 + row * cell : (row + 1) * cell], expected), (t, row)


def test_cli_progressive_gif_on_msds1_test_images_ends_with_the_original(tmp_path):
    from rgkern.tools.plots import GROUP_LABEL_HEIGHT

    model = tiny_model(L=32, C=3, k=4, dtype=torch.float32)
    path = save_checkpoint(tmp_path / "run" / "model.safetensors", model)
    gif = tmp_path / "progressive.gif"
    argv = ["progressive", "--checkpoint", str(path.parent), "--out", str(tmp_path / "p.png"), "--data", "msds1", "--num", "1"]
    assert main(argv + ["--scale", "1", "--gif", str(gif), "--no-progress"]) == 0
    with Image.open(gif) as image:
        assert image.n_frames == model.num_levels + 2  # h = H .. 0, then the original
        assert image.size == (34, 34 + GROUP_LABEL_HEIGHT)  # one 32x32 image, padding 1


def test_cli_gif_must_be_a_gif_and_writable(checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "t.png"), "--no-progress"]
    assert main(["traverse", *common, "--gif", str(tmp_path / "t.png.anim")]) == 2
    assert "--gif takes a file name ending in .gif" in capsys.readouterr().err
    (tmp_path / "folder.gif").mkdir()
    assert main(["progressive", *common, "--gif", str(tmp_path / "folder.gif")]) == 2
    assert "it is a folder" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()  # refused before any work
