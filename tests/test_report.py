"""`vqgen report` and the report training refreshes: the data it plots, a self-contained page, bad input."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_DATA, TINY_TRANSFORMER, TINY_VQVAE, tiny_train, tree_hashes
from stage1_vqvae.train import train_vqvae
from stage2_prior.train import train_prior
from vqgen.cli import main
from vqgen.core.evaluate.measures import code_usage
from vqgen.core.report import figures
from vqgen.core.report import page as report
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store.configs import config_from_dict, config_to_dict
from vqgen.core.store.imageio import save_grid
from vqgen.core.store.jsonl import JsonlLog
from vqgen.core.store.layout import RunLayout, SampleSetDir
from vqgen.core.training import loop as trainer
from vqgen.core.training.config import TrainConfig

pytest.importorskip("matplotlib")


def _train(step: int, loss: float) -> dict:
    return {"split": "train", "step": step, "time": 0.0, "loss": loss, "lr": 1e-3}


def _test(step: int, mse: float, best_step: int, best: float) -> dict:
    return {"split": "test", "step": step, "time": 0.0, "mse": mse, "psnr": 20.0, "best_step": best_step,
            "best_mse": best}


# A run logged steps 1-6 (tests at 3 and 6), was resumed from its state at step 4 and logged 5-8 again.
RESUMED = ([_train(s, 1.0 / s) for s in range(1, 7)] + [_test(3, 0.30, 3, 0.30), _test(6, 0.20, 6, 0.20)]
           + [_train(s, 2.0 / s) for s in range(5, 9)] + [_test(8, 0.25, 3, 0.30)])


def test_curves_follow_the_resumed_run_and_mark_the_best_step():
    curves = report.curves(RESUMED)
    steps, losses = curves.series["train"]["loss"]
    assert steps == list(range(1, 9))
    assert losses == [1.0 / s for s in range(1, 5)] + [2.0 / s for s in range(5, 9)]  # the resumed run's 5-8
    assert curves.series["test"]["mse"] == ([3, 8], [0.30, 0.25])  # the lost run's test at 6 is gone
    assert curves.resumes == [5]
    assert (curves.best_step, curves.held_metric, curves.best_value, curves.latest_step) == (3, "mse", 0.30, 8)
    assert "best_mse" not in curves.series["test"] and "best_step" not in curves.series["test"]


def test_a_run_without_resume_has_no_resume_marks():
    curves = report.curves([_train(1, 1.0), _test(1, 0.5, 1, 0.5), _train(2, 0.5), _test(2, 0.6, 1, 0.5)])
    assert curves.resumes == [] and curves.best_step == 1


def test_the_figure_plots_the_curves_data():
    curves = report.curves(RESUMED)
    fig = figures.curves_figure(curves)
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"loss", "MSE ([0, 1] pixels)", "PSNR (dB)", "learning rate"}
    loss = axes["loss"].lines[0]
    assert list(loss.get_xdata()) == curves.series["train"]["loss"][0]
    assert list(loss.get_ydata()) == curves.series["train"]["loss"][1]
    mse = axes["MSE ([0, 1] pixels)"]
    best_dots = [line for line in mse.lines if line.get_label().startswith("best")]
    assert [(list(d.get_xdata()), list(d.get_ydata())) for d in best_dots] == [([3], [0.30])]
    vertical = sorted(line.get_xdata()[0] for line in mse.lines if len(set(line.get_xdata())) == 1
                      and line.get_linestyle() in (":", "--"))
    assert vertical == [3, 5]  # the best step, then the resume
    assert figures.png(fig).startswith(b"\x89PNG")


def test_an_unknown_metric_gets_its_own_panel():
    curves = report.curves([{"split": "train", "step": 1, "new_thing": 2.0}, {"split": "train", "step": 2,
                                                                             "new_thing": 1.0}])
    assert [(p.title, p.lines) for p in curves.panels()] == [("new thing", (("train", "new_thing", "train"),))]


def test_histogram_is_sorted_with_usage_and_perplexity_of_code_usage():
    codes = torch.tensor([[[0, 0, 0], [1, 1, 3]], [[0, 3, 0], [0, 2, 0]]])  # code 0: 7, 1: 2, 3: 2, 2: 1, 4-7: 0
    hist = report.code_histogram(codes, codebook_size=8)
    assert hist.sorted_counts == [7, 2, 2, 1, 0, 0, 0, 0]
    expected = code_usage(torch.bincount(codes.flatten(), minlength=8))
    assert (hist.usage, hist.perplexity, hist.dead_codes) == (expected["usage"], expected["perplexity"], 4)
    assert hist.usage == 0.5
    (drawn,) = figures.histogram_figure(hist).axes[0].patches
    assert list(drawn.get_data().values) == pytest.approx([c / 12 for c in hist.sorted_counts])


def test_report_field_is_new_in_format_3_and_older_train_configs_load():
    saved = config_to_dict(TrainConfig())
    del saved["report"]
    saved["format_version"] = 2
    for name in ("compile", "tf32", "num_workers"):  # other fields of version 3
        saved.pop(name, None)
    assert config_from_dict(TrainConfig, saved).report is None
    saved["format_version"] = 3
    with pytest.raises(VQGenError, match=r"missing fields \[.*'report'"):
        config_from_dict(TrainConfig, saved)


# -- a whole run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> Path:
    """Both stages trained with the report on (stage 1 evaluated at steps 3 and 6), plus one sample set."""
    run = tmp_path_factory.mktemp("reported") / "run"
    train_vqvae(run, TINY_DATA, tiny_train(max_steps=6, eval_every=3, report=True), TINY_VQVAE)
    train_prior(run, "transformer", tiny_train(max_steps=4, report=True), TINY_TRANSFORMER)
    folder = SampleSetDir(RunLayout(run).samples / "0000")
    folder.path.mkdir(parents=True)
    save_grid(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), folder.grid, nrow=2)
    folder.settings.write_text(json.dumps({"n": 4, "cfg": 1.5, "seed": 0}))
    return run


def test_training_writes_a_self_contained_report(reported_run):
    page = RunLayout(reported_run).report.read_text()
    assert "Stage 1: VQ-VAE" in page and "Stage 2: prior" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)
    sources = re.findall(r"""<img [^>]*src="([^"]*)\"""", page)
    # stage 1: curves, its reconstructions (the best step is the latest), code histogram; stage 2: curves
    # (the sample set came after the training)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page.lower()
    assert "best evaluation: step 6, test mse" in page and "test bits_per_code" in page


def test_vqgen_report_writes_out_only(reported_run, tmp_path, capsys):
    before = tree_hashes(reported_run)
    out = tmp_path / "page.html"
    assert main(["report", "--run", str(reported_run), "--out", str(out)]) == 0
    assert tree_hashes(reported_run) == before and sorted(tmp_path.iterdir()) == [out]
    page = out.read_text()
    assert len(re.findall(r"<img ", page)) == 5  # and now the sample grid
    assert "settings.json" in page and "code grids (codes/meta.json)" in page
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no run", "no metrics", "missing folder", "folder as out"])
def test_bad_input_is_one_line_and_writes_nothing(reported_run, tmp_path, capsys, case):
    run, out = reported_run, tmp_path / "r.html"
    if case == "no run":
        run = tmp_path / "absent"
    elif case == "no metrics":
        run = tmp_path / "fresh"
        (run / "vqvae").mkdir(parents=True)
        (run / "vqvae" / "metrics.jsonl").write_text("")
    elif case == "missing folder":
        out = tmp_path / "absent" / "r.html"
    else:
        out = tmp_path
    before, outside = tree_hashes(reported_run), sorted(tmp_path.rglob("*"))
    assert main(["report", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    named = {"no run": str(run), "no metrics": "no training metrics yet", "missing folder": str(out.parent),
             "folder as out": "is a folder"}[case]
    assert named in " ".join(err.split())
    assert tree_hashes(reported_run) == before and sorted(tmp_path.rglob("*")) == outside


def test_report_needs_matplotlib_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "available", lambda: False)
    with pytest.raises(VQGenError, match=r"report=True needs matplotlib.*vqgen\[report\]"):
        train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=2, report=True), TINY_VQVAE, encode=False)
    assert not (tmp_path / "run").exists()
    train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=2, report=None), TINY_VQVAE,
                encode=False)  # unset: skipped without matplotlib
    assert not RunLayout(tmp_path / "run").report.exists()


@pytest.mark.parametrize("report", [None, False])
def test_report_is_on_by_default_and_off_with_no_report(tmp_path, report):
    train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=2, report=report), TINY_VQVAE, encode=False)
    assert RunLayout(tmp_path / "run").vqvae.trained
    assert RunLayout(tmp_path / "run").report.exists() == (report is None)


def test_a_report_that_fails_warns_and_training_goes_on(tmp_path, monkeypatch, capsys):
    def broken(run_dir):
        raise RuntimeError("no fonts\nsecond line")

    monkeypatch.setattr(trainer, "write_report", broken)
    train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=4, eval_every=2, report=True), TINY_VQVAE,
                encode=False)
    out = capsys.readouterr().out
    assert out.count("warning: the report was not refreshed: no fonts") == 2 and "second line" not in out
    assert RunLayout(tmp_path / "run").vqvae.trained


def test_codes_of_another_vqvae_get_no_histogram(reported_run, monkeypatch):
    assert report.collect(reported_run).histogram is not None
    monkeypatch.setattr(report, "weights_fingerprint", lambda folder: "retrained")  # stage 1 trained again
    assert report.collect(reported_run).histogram is None
    assert "not dumped yet" in report.render_html(report.collect(reported_run))


def test_refreshes_take_at_most_a_twentieth_of_the_time_and_the_last_evaluation_always_gets_one(tmp_path,
                                                                                                 monkeypatch):
    steps = []

    def slow(run_dir):  # a refresh of 1 s: none due again for 19 s, far longer than these steps take
        steps.append(len([r for r in JsonlLog(RunLayout(run_dir).vqvae.metrics).read() if r["split"] == "test"]))
        time.sleep(1.0)

    monkeypatch.setattr(trainer, "write_report", slow)
    train_vqvae(tmp_path / "run", TINY_DATA, tiny_train(max_steps=4, eval_every=1, report=True), TINY_VQVAE,
                encode=False)
    assert steps == [1, 4]  # the first evaluation, then the last
    steps.clear()
    monkeypatch.setattr(trainer, "write_report", lambda run_dir: steps.append(0))  # instant: every evaluation
    train_vqvae(tmp_path / "run2", TINY_DATA, tiny_train(max_steps=4, eval_every=1, report=True), TINY_VQVAE,
                encode=False)
    assert len(steps) == 4


def test_evaluations_show_as_a_table_and_the_newest_sweep_as_fidelity_against_variety(reported_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(reported_run, run)
    log = JsonlLog(RunLayout(run).evaluations)
    log.write({"time": 1, "n": 100, "cfg_scale": 1.5, "temperature": 1.0, "steps": None, "seeds": [0],
               "samples": {"fid": 2.5, "precision": 0.7, "recall": 0.4}, "real": {"fid": 0.3}})  # a plain one
    for cfg, precision, recall, copies in ((1.0, 0.6, 0.6, 0.04), (2.0, 0.8, 0.3, 0.09)):
        log.write({"time": 2, "n": 100, "cfg_scale": cfg, "temperature": 1.0, "steps": None, "seeds": [0, 1],
                   "samples": {"fid": 2.0, "precision": precision, "recall": recall, "near_copies_pixels": copies},
                   "spread": {"samples": {"fid": 0.1}}, "sweep_id": "7", "baseline": None if cfg == 1.0 else 0})
    collected = report.collect(run)
    assert len(collected.evaluations) == 3
    assert report.sweep_points(collected.evaluations) == [report.SweepPoint("cfg 1.0", 0.6, 0.6, 0.04),
                                                         report.SweepPoint("cfg 2.0", 0.8, 0.3, 0.09)]
    page = report.render_html(collected)
    assert 'id="quality"' in page and "2 ± 0.1" in page and "fidelity against variety" in page
    assert report.sweep_points(collected.evaluations[:1]) == []  # no sweep: no plot
