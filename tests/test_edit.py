"""Editing with any mask: pixel masks mapped to the code grid, kept codes never changed, canvases larger than the
trained grid filled window by window, and every bad input refused in one line with nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tree_hashes
from PIL import Image

from stage2_prior.config import SamplingConfig
from vqgen.cli import main
from vqgen.core.runtime.errors import VQGenError
from vqgen.draws import sample_seeds
from vqgen.edit import (
    blind_kept,
    box_mask,
    check_canvas,
    code_mask,
    extend,
    fill_canvas,
    load_mask,
    parse_box,
    window_plan,
)
from vqgen.run import Run


def test_a_pixel_mask_hides_every_code_whose_cell_it_touches():
    pixels = torch.zeros(32, 32, dtype=torch.bool)
    pixels[9, 22] = True                      # one pixel: the code of its 4x4 cell, row 2, column 5
    grid = code_mask(pixels, 4)
    assert grid.shape == (8, 8) and grid.sum() == 1 and grid[2, 5]
    box = code_mask(box_mask(parse_box("8,8,24,24"), 32, 32), 4)   # a box on cell borders: exactly its cells
    assert box.sum() == 16 and box[2:6, 2:6].all()
    touching = code_mask(box_mask((7, 7, 9, 9), 32, 32), 4)        # two pixels either side of a border: four codes
    assert touching.sum() == 4 and touching[1:3, 1:3].all()


@pytest.mark.parametrize("text,message", [
    ("8,8,24", "--box must be x0,y0,x1,y1"), ("a,b,c,d", "--box must be x0,y0,x1,y1"),
    ("0,0,40,8", "must lie inside the 32x32 image"), ("8,8,8,20", "x0 < x1"), ("-1,0,4,4", "inside"),
])
def test_a_bad_box_is_one_line(text, message):
    with pytest.raises(VQGenError, match=message):
        box_mask(parse_box(text), 32, 32)


def test_a_mask_image_must_have_the_images_size(tmp_path):
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    with pytest.raises(VQGenError, match="is 16x16 but the images are 32x32"):
        load_mask(tmp_path / "small.png", 32, 32)
    image = Image.new("RGB", (32, 32))
    image.putpixel((3, 5), (0, 10, 0))
    image.save(tmp_path / "one.png")
    mask = load_mask(tmp_path / "one.png", 32, 32)
    assert mask.sum() == 1 and mask[5, 3]


def test_raster_blindness_counts_the_kept_codes_after_the_first_hole():
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[3, 2:] = False                       # a hole at the end: a raster prior sees everything kept
    assert blind_kept(keep) == 0
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1, 1] = False                        # a hole in the middle: the 10 kept codes after it are unseen
    assert blind_kept(keep) == 10


def test_an_extended_canvas_holds_the_codes_where_they_were_put():
    codes = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    canvas, keep = extend(codes, top=1, bottom=2, left=3, right=0)
    assert canvas.shape == (2, 6, 7) and keep.shape == (6, 7) and keep.sum() == 12
    assert torch.equal(canvas[:, 1:4, 3:7], codes) and keep[1:4, 3:7].all()


def test_the_window_plan_covers_the_canvas_and_starts_beside_what_is_known():
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, 4:12] = True                      # an 8x8 original in the middle of an 8x16 canvas
    plan = window_plan(keep, (8, 8))
    covered = keep.clone()
    for top, left in plan:
        assert 0 <= top <= 0 and 0 <= left <= 8  # inside the canvas
        covered[top:top + 8, left:left + 8] = True
    assert covered.all()
    first = plan[0]
    assert keep[first[0]:first[0] + 8, first[1]:first[1] + 8].sum() == 48  # the best-known window goes first
    assert window_plan(torch.ones(8, 8, dtype=torch.bool), (8, 8)) == []


def test_canvas_bounds_are_one_line():
    with pytest.raises(VQGenError, match="smaller than the trained grid of 8x8"):
        check_canvas(4, 16, (8, 8))
    with pytest.raises(VQGenError, match="more than 8 times the trained grid"):
        check_canvas(8, 100, (8, 8))


@pytest.mark.parametrize("prior", ["transformer", "masked"])
def test_kept_codes_never_change_and_fill_depends_on_the_seed_alone(tiny_run, tiny_masked_run, prior):
    run = Run.load(tiny_run if prior == "transformer" else tiny_masked_run)
    codes = torch.randint(16, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    labels = torch.tensor([0, 1, 2, 3])
    seeds = sample_seeds(5, torch.arange(4))
    out = run.fill(4, labels, seeds, SamplingConfig(), codes, keep)
    assert torch.equal(out[keep], codes[keep])
    alone = run.fill(1, labels[2:3], seeds[2:3], SamplingConfig(), codes[2:3], keep[2:3])
    assert torch.equal(alone, out[2:3])


@pytest.mark.parametrize("prior", ["transformer", "masked"])
def test_an_outpainted_canvas_holds_the_original_codes(tiny_run, tiny_masked_run, prior):
    run = Run.load(tiny_run if prior == "transformer" else tiny_masked_run)
    codes = torch.randint(16, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    canvas, keep = extend(codes, top=2, bottom=0, left=0, right=5)
    filled = fill_canvas(run, canvas, keep, torch.tensor([0, 1]), seed=3)
    assert filled.shape == (2, 10, 13) and torch.equal(filled[:, 2:, :8], codes)
    assert 0 <= int(filled.min()) and int(filled.max()) < 16
    again = fill_canvas(run, canvas[1:], keep, torch.tensor([1]), seed=3, first=1)
    assert torch.equal(again, filled[1:])
    assert run.decode(filled).shape == (2, 3, 40, 52)  # the convolutional decoder takes any grid


def test_inpaint_and_outpaint_write_their_pictures(tiny_run, tiny_masked_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["inpaint", "--run", str(run), "--n", "3", "--box", "8,8,24,24"]) == 0
    assert Image.open(run / "inpainted.png").size == (2 + 3 * 34, 2 + 3 * 34)  # originals, hole, inpainted
    assert "raster order" in capsys.readouterr().out  # a transformer cannot see the codes below the hole
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    mask = Image.new("L", (32, 32))
    mask.putpixel((31, 31), 255)
    mask.save(tmp_path / "corner.png")
    assert main(["inpaint", "--run", str(run), "--images", str(tmp_path / "red.png"), "--mask",
                 str(tmp_path / "corner.png"), "--out", str(tmp_path / "corner-out.png")]) == 0
    assert "raster order" not in capsys.readouterr().out  # the last code: everything kept comes before it
    assert main(["outpaint", "--run", str(tiny_masked_run), "--n", "2", "--left", "2", "--right", "2", "--steps",
                 "4", "--out", str(tmp_path / "wide.png")]) == 0
    assert Image.open(tmp_path / "wide.png").size == (2 + 2 * 50, 2 + 2 * 34)  # 12x8 codes: 48x32 pixels
    assert main(["outpaint", "--run", str(tiny_masked_run), "--canvas", "16,8", "--n", "2",
                 "--out", str(tmp_path / "canvas.png")]) == 0
    assert Image.open(tmp_path / "canvas.png").size == (2 + 2 * 66, 2 + 34)


BAD_EDITS = [
    (["inpaint", "--box", "0,0,40,8"], "must lie inside the 32x32 image"),
    (["inpaint", "--mask", "{small}"], "is 16x16 but the images are 32x32"),
    (["inpaint", "--mask", "{empty}"], "the mask covers no code"),
    (["inpaint", "--mask", "{full}"], "covers every code"),
    (["inpaint", "--box", "0,0,8,8", "--images", "{small}"], "is 16x16 but the run's images are 32x32"),
    (["inpaint", "--box", "0,0,8,8", "--steps", "4"], "--steps 4 applies to a masked prior"),
    (["inpaint", "--box", "0,0,8,8", "--n", "0"], "--n must be >= 1, got 0"),
    (["sample", "--steps", "0", "--run", "{masked}"], "steps must be >= 1, got 0"),
    (["sample", "--steps", "65", "--run", "{masked}"], "--steps 65 is more than the 64 codes"),
    (["sample", "--choice-noise", "-1", "--run", "{masked}"], "choice_noise must be a number >= 0, got -1.0"),
    (["sample", "--choice-noise", "2"], "--choice-noise 2.0 applies to a masked prior"),
    (["outpaint", "--left", "70"], "more than 8 times the trained grid"),
    (["outpaint"], "nothing to outpaint"),
    (["outpaint", "--top", "-1"], "must be >= 0"),
    (["outpaint", "--canvas", "4,4"], "smaller than the trained grid of 8x8"),
    (["outpaint", "--canvas", "wide"], "--canvas must be W,H in codes"),
    (["outpaint", "--canvas", "16,8", "--left", "2"], "--canvas draws from nothing"),
]


@pytest.mark.parametrize("argv,message", BAD_EDITS, ids=[" ".join(a) for a, _ in BAD_EDITS])
def test_bad_edits_are_one_line_and_write_nothing(tiny_run, tiny_masked_run, tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    Image.new("L", (32, 32)).save(tmp_path / "empty.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "full.png")
    argv = [a.format(small=tmp_path / "small.png", empty=tmp_path / "empty.png", full=tmp_path / "full.png",
                     masked=tiny_masked_run) for a in argv]
    if "--run" not in argv:
        argv += ["--run", str(run)]
    before, masked_before = tree_hashes(run), tree_hashes(tiny_masked_run)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert tree_hashes(run) == before and tree_hashes(tiny_masked_run) == masked_before
