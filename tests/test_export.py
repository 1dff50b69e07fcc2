"""Sharing a trained run: `vqgen export`, loading an exported folder or a Hub repo id, `vqgen push` (no network:
the Hub is faked)."""

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file

from conftest import tree_hashes
from vqgen.cli import main
from vqgen.core.share import hub
from vqgen.core.share.export import locate_run
from vqgen.core.share.modelcard import model_card
from vqgen.core.store.layout import RunLayout
from vqgen.core.store.manifest import manifest_damage
from vqgen.run import Run

EXPORTED = ["README.md", "codes/meta.json", "manifest.json", "prior/config.json", "prior/metrics.jsonl",
            "prior/model.safetensors", "prior/source.json", "prior/train_config.json", "samples.png",
            "vqvae/config.json", "vqvae/data_config.json", "vqvae/metrics.jsonl", "vqvae/model.safetensors",
            "vqvae/train_config.json"]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported once (with the repo id its card names). Treat as read-only."""
    to = tmp_path_factory.mktemp("exports") / "tiny"
    assert main(["export", "--run", str(tiny_run), "--to", str(to), "--repo-id", "me/tiny-shapes"]) == 0
    return to


def codes_of(out: Path) -> torch.Tensor:
    return load_file(out / "codes.safetensors")["codes"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and "Traceback" not in err, err
    return err


def no_hub(monkeypatch):
    """Any download is a failure of the test: local paths never go to the Hub."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"snapshot_download called with {args} {kwargs}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_export_writes_the_model_folder_and_nothing_in_the_run(tiny_run, tmp_path):
    before = tree_hashes(tiny_run)
    to = tmp_path / "out" / "tiny"
    assert main(["export", "--run", str(tiny_run), "--to", str(to)]) == 0
    assert tree_hashes(tiny_run) == before
    assert sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file()) == EXPORTED
    assert sorted(p.name for p in to.parent.iterdir()) == ["tiny"]  # no temporary folder left beside it
    assert manifest_damage(to) is None
    assert set(json.loads((to / "manifest.json").read_text())["files"]) == set(EXPORTED) - {"manifest.json"}
    # the weights are the run's, byte for byte
    assert (to / "prior/model.safetensors").read_bytes() == (tiny_run / "prior/model.safetensors").read_bytes()


def test_the_records_of_an_export_name_no_folder_of_the_authors_machine(tiny_run, exported):
    """The codes' and the prior's records point inside the export, not at the run it came from."""
    assert json.loads((exported / "codes/meta.json").read_text())["vqvae_dir"] == "vqvae"
    assert json.loads((exported / "prior/source.json").read_text())["codes_dir"] == "codes"
    for name in ("codes/meta.json", "prior/source.json"):
        assert str(tiny_run.resolve()) not in (exported / name).read_text()


def test_export_then_load_from_the_folder_gives_identical_samples(tiny_run, exported, tmp_path, monkeypatch):
    no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(exported)
    assert main(["sample", "--run", str(tiny_run), "--n", "6", "--seed", "5", "--out", "a"]) == 0
    assert main(["sample", "--run", str(exported), "--n", "6", "--seed", "5", "--out", "b"]) == 0
    assert torch.equal(codes_of(tmp_path / "a"), codes_of(tmp_path / "b"))
    assert (tmp_path / "a/images/00004.png").read_bytes() == (tmp_path / "b/images/00004.png").read_bytes()
    # without --out, a model that is only read gets its outputs under outputs/NAME/, never in its folder
    assert main(["sample", "--run", str(exported), "--n", "2"]) == 0
    assert (tmp_path / "outputs/tiny/samples/0000/grid.png").is_file()
    assert tree_hashes(exported) == before


def test_eval_and_info_read_an_exported_model(tiny_run, exported, tmp_path, monkeypatch, capsys):
    """The test bits per code of the exported prior, from codes encoded anew, equal the run's from its dump."""
    no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    ours, theirs = Run.load(exported), Run.load(tiny_run)
    assert ours.read_only and ours.outputs.root == Path("outputs/tiny") and not theirs.read_only
    a, b = ours.evaluate(), theirs.evaluate()
    assert a["bits_per_code"] == pytest.approx(b["bits_per_code"], rel=1e-6) and a["mse"] == pytest.approx(b["mse"])
    assert main(["info", "--run", str(exported)]) == 0
    assert "bits_per_code" in capsys.readouterr().out
    assert main(["encode", "--run", str(exported)]) == 2
    assert "is an exported model, which is only read" in one_error_line(capsys)
    # what the other read-only commands make (the judge included) goes under outputs/tiny/, none into the export
    before = tree_hashes(exported)
    for argv in (["reconstruct", "--n", "3"], ["complete", "--n", "2"],
                 ["eval", "--samples", "6", "--judge-steps", "2", "--batch-size", "4"], ["report"]):
        assert main([*argv, "--run", str(exported)]) == 0
    made = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert made == ["outputs/tiny/closest_pairs.png", "outputs/tiny/completions.png", "outputs/tiny/evaluations.jsonl",
                    "outputs/tiny/judge/config.json",
                    "outputs/tiny/judge/model.safetensors", "outputs/tiny/reconstructions.png",
                    "outputs/tiny/report.html"]
    assert tree_hashes(exported) == before


@pytest.mark.parametrize("damage,named", [
    ("flip a byte of prior/model.safetensors", "prior/model.safetensors does not match its sha256"),
    ("remove codes/meta.json", "codes/meta.json is missing"),
    ("remove vqvae/model.safetensors", "vqvae/model.safetensors is missing"),
    ("append to README.md", "README.md has"),
    ("remove manifest.json", "manifest.json is missing"),
])
def test_a_damaged_export_is_refused_by_name_before_any_weight_is_read(exported, tmp_path, monkeypatch, capsys,
                                                                       damage, named):
    no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    verb, name = damage.split()[0], damage.split()[-1]
    if verb == "flip":
        data = bytearray((folder / name).read_bytes())
        data[-3] ^= 0x01  # inside the last tensor: the file still parses
        (folder / name).write_bytes(bytes(data))
    elif verb == "remove":
        (folder / name).unlink()
    else:
        with (folder / name).open("a") as f:
            f.write("\nedited\n")
    monkeypatch.setattr("vqgen.run.load_model", lambda *a, **k: pytest.fail("a weight was read"))
    before = tree_hashes(folder)
    for argv in (["sample", "--run", str(folder), "--n", "2"], ["info", "--run", str(folder)]):
        assert main(argv) == 2
        err = one_error_line(capsys)
        assert f"exported model {folder} is damaged or incomplete" in err and named in err
    assert tree_hashes(folder) == before and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("text,parsed", [
    ("me/model", ("me", "model", None)),
    ("me/model@main", ("me", "model", "main")),
    ("Org-1/my_model.v2@refs/pr/3", ("Org-1", "my_model.v2", "refs/pr/3")),
    ("a/b@0f3c2e1d", ("a", "b", "0f3c2e1d")),
])
def test_repo_ids_that_parse(text, parsed):
    repo = hub.parse_repo_id(text)
    assert (repo.owner, repo.name, repo.revision) == parsed and str(repo) == text


@pytest.mark.parametrize("text", ["model", "a/b/c", "-a/b", "a/b-", "a--b/c", "a/b..c", "a/b.git", "a/b@", "",
                                  "a b/c", "a/", "/a/b", "./a/b", "a/b@x y", "a/" + "b" * 100])
def test_repo_ids_that_do_not_parse(text):
    assert hub.parse_repo_id(text) is None


@pytest.mark.parametrize("repo_id,message", [
    ("not-a-repo", "--repo-id 'not-a-repo' is not a Hugging Face Hub repo id"),
    ("a/b/c", "--repo-id 'a/b/c' is not a Hugging Face Hub repo id"),
    ("me/model@dev", "--repo-id 'me/model@dev' names a revision"),
])
def test_push_refuses_a_bad_repo_id_in_one_line(tiny_run, tmp_path, monkeypatch, capsys, repo_id, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **k: pytest.fail("the Hub was called"))
    assert main(["push", "--run", str(tiny_run), "--repo-id", repo_id]) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_a_readme_of_its_own_is_still_a_run(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "README.md").write_text("---\ntitle: my notes\n---\nwhat I tried\n")
    assert not Run.load(run).read_only
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--run", str(run), "--n", "2"]) == 0 and (run / "samples/0000/grid.png").is_file()


def test_local_paths_never_go_to_the_hub(tiny_run, tmp_path, monkeypatch, capsys):
    no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    shutil.copytree(tiny_run, tmp_path / "mine" / "run")
    assert not locate_run("mine/run").read_only  # an existing path: local, owner/name-shaped or not
    for missing in ("mine/missing", "runs/default", str(tmp_path / "none")):  # a local owner, runs/, a path
        assert main(["sample", "--run", missing]) == 2
        assert f"run not found: {missing}" in one_error_line(capsys)


@pytest.mark.parametrize("offline,why", [(True, "offline mode (HF_HUB_OFFLINE=1)"), (False, "no network")])
def test_a_hub_id_that_cannot_be_downloaded_is_one_line(tmp_path, monkeypatch, capsys, offline, why):
    def unreachable(*args, **kwargs):  # what snapshot_download raises offline or without a network
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder for the specified "
                                      "revision on the local disk and outgoing traffic has been disabled.\nmore")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--run", "someone/shapes@v1", "--n", "2"]) == 2
    err = one_error_line(capsys)
    assert "could not download 'someone/shapes@v1' from the Hugging Face Hub" in err and why in err
    assert list(tmp_path.iterdir()) == []


def test_a_hub_id_loads_from_the_cache_like_the_folder(tiny_run, exported, tmp_path, monkeypatch):
    calls = []

    def snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(exported)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(exported)
    assert main(["sample", "--run", "me/tiny-shapes@v1", "--n", "4", "--seed", "2"]) == 0
    assert main(["sample", "--run", str(tiny_run), "--n", "4", "--seed", "2", "--out", "local"]) == 0
    out = tmp_path / "outputs" / "me--tiny-shapes@v1" / "samples" / "0000"
    assert torch.equal(codes_of(out), codes_of(tmp_path / "local"))
    # the manifest first, then exactly the files it lists, at the revision asked for
    (first, manifest_only), (second, listed) = calls[:2]
    assert first == second == "me/tiny-shapes" and manifest_only["revision"] == listed["revision"] == "v1"
    assert manifest_only["allow_patterns"] == ["manifest.json"] and sorted(listed["allow_patterns"]) == EXPORTED
    assert tree_hashes(exported) == before  # the cache is never written into


def test_a_hub_repo_that_is_not_a_vqgen_model_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path / "snapshot"))
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--run", "someone/bert"]) == 2
    assert "'someone/bert' is not a vqgen model: it has no manifest.json" in one_error_line(capsys)


def test_the_model_card_names_the_data_the_metrics_and_how_to_load_it(exported):
    card = (exported / "README.md").read_text()
    front, body = card.split("---\n", 2)[1:]
    assert "library_name: vqgen" in front and "pipeline_tag: unconditional-image-generation" in front
    assert "- class-conditional" in front and "- transformer" in front
    assert "built-in shapes" in body and "6: circle, square, triangle, cross, ring, diamond" in body
    bits = [json.loads(line) for line in (exported / "prior/metrics.jsonl").read_text().splitlines()]
    best = [r for r in bits if r["split"] == "test"][-1]
    assert f"| prior | bits per code | {best['bits_per_code']:.4g} | {best['step']} |" in body
    assert "| VQ-VAE | PSNR (dB) |" in body
    assert "vqgen sample --run me/tiny-shapes --n 64 --label circle" in body
    assert 'Run.load("me/tiny-shapes")' in body
    assert "![samples drawn from this model](samples.png)" in body


def test_the_card_of_an_unconditional_pixelcnn_on_hub_data(tmp_path):
    """Built from the JSON files alone: the Hub dataset in the front matter, no class tag or --label example."""
    files = {"vqvae/config.json": {"kind": "VQVAEConfig", "in_channels": 1, "image_height": 32, "image_width": 32,
                                   "downsample": 4, "codebook_size": 512, "code_dim": 64},
             "prior/config.json": {"kind": "PixelCNNConfig", "num_classes": 0},
             "prior/source.json": {"class_names": [str(i) for i in range(10)], "pseudo_labels": False},
             "vqvae/data_config.json": {"source": "ylecun/mnist"}}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    card = model_card(RunLayout(tmp_path), sorted(files), name="mnist")
    front, body = card.split("---\n", 2)[1:]
    assert "datasets:\n- ylecun/mnist\n" in front and "- pixelcnn" in front and "class-conditional" not in front
    assert "1×32×32 image into a grid of 8×8 codes, each one of 512 vectors of dimension 64" in body
    assert "gated PixelCNN prior over those grids, unconditional." in body
    assert "[ylecun/mnist](https://huggingface.co/datasets/ylecun/mnist)" in body
    assert "vqgen sample --run path/to/mnist --n 64   # -> outputs/mnist/samples/0000/grid.png" in body
    assert "| VQ-VAE | not recorded | | |" in body and "samples.png" not in body


def test_push_exports_then_uploads_through_the_hub_api(tiny_run, tmp_path, monkeypatch, capsys):
    calls = {}

    class FakeApi:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)  # a temporary folder: look now, it is gone after the push
            calls["upload_folder"] = (repo_id, kwargs)
            calls["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            calls["damage"] = manifest_damage(folder)
            calls["card"] = (folder / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(tiny_run)
    assert main(["push", "--run", str(tiny_run), "--repo-id", "me/tiny-shapes", "--private"]) == 0
    assert calls["create_repo"] == ("me/tiny-shapes", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls["upload_folder"][0] == "me/tiny-shapes" and calls["files"] == EXPORTED and calls["damage"] is None
    assert "vqgen sample --run me/tiny-shapes" in calls["card"]
    assert "https://huggingface.co/me/tiny-shapes" in capsys.readouterr().out
    assert tree_hashes(tiny_run) == before and list(tmp_path.iterdir()) == []


def test_push_offline_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **k: pytest.fail("the Hub was called"))
    monkeypatch.chdir(tmp_path)
    assert main(["push", "--run", str(tiny_run), "--repo-id", "me/tiny-shapes"]) == 2
    assert "cannot push to 'me/tiny-shapes': offline mode (HF_HUB_OFFLINE=1)" in one_error_line(capsys)


def _no_prior(tiny_run, tmp_path):
    run = tmp_path / "no_prior"
    shutil.copytree(tiny_run / "vqvae", run / "vqvae")
    return run


@pytest.mark.parametrize("case,message", [
    ("no prior", "it has no trained prior"),
    ("no run", "run not found"),
    ("not empty", "exists and is not empty: pass --overwrite"),
    ("overwrite a folder that is no export", "holds files that are not an exported vqgen model"),
    ("inside the run", "overlaps the run"),
    ("a file", "is a file, not a folder"),
])
def test_export_refuses_in_one_line_and_writes_nothing(tiny_run, tmp_path, monkeypatch, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    run, to, extra = tiny_run, tmp_path / "to", []
    if case == "no prior":
        run = _no_prior(tiny_run, tmp_path)
    elif case == "no run":
        run = tmp_path / "missing"
    elif case in ("not empty", "overwrite a folder that is no export"):
        to.mkdir()
        (to / "notes.txt").write_text("mine")
        extra = ["--overwrite"] if case.startswith("overwrite") else []
    elif case == "inside the run":
        to = tiny_run / "export"
    elif case == "a file":
        to.write_text("a file")
    before, run_before = tree_hashes(tmp_path), tree_hashes(tiny_run)
    assert main(["export", "--run", str(run), "--to", str(to), *extra]) == 2
    assert message in one_error_line(capsys)
    assert tree_hashes(tmp_path) == before and tree_hashes(tiny_run) == run_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_overwrites_an_export_and_a_failed_export_leaves_the_old_one(tiny_run, exported, tmp_path,
                                                                            monkeypatch, capsys):
    import vqgen.core.share.export as export

    to = tmp_path / "tiny"
    shutil.copytree(exported, to)
    before = tree_hashes(to)

    def full_disk(folder):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "write_manifest", full_disk)
    assert main(["export", "--run", str(tiny_run), "--to", str(to), "--overwrite"]) == 2
    assert f"cannot write {to}: No space left on device" in one_error_line(capsys)
    assert tree_hashes(to) == before and sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    monkeypatch.undo()
    (to / "README.md").write_text("an older card")
    assert main(["export", "--run", str(tiny_run), "--to", str(to), "--overwrite"]) == 0
    assert manifest_damage(to) is None and "an older card" not in (to / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_model_card_shows_samples_beside_reconstructions_and_real_images(tmp_path):
    from vqgen.core.share.modelcard import _sample_rows

    record = {"samples": {"n_samples": 100.0, "fid": 3.5, "coverage": 0.9}, "cfg_scale": 1.5, "seed": 0,
              "reconstructed": {"fid": 2.25, "coverage": 0.95}, "real": {"fid": 0.25}}
    old = {"samples": {"n_samples": 100.0, "fid": 9.0}, "real": {"fid": 0.5}}  # written before reconstructions
    log = tmp_path / "evaluations.jsonl"
    log.write_text(json.dumps(old) + "\n")
    assert _sample_rows(log)[0].endswith("| 9 (real images: 0.5) | |")
    log.write_text(json.dumps(old) + "\n" + json.dumps(record) + "\n")
    rows = _sample_rows(log)
    assert rows[0].endswith("| 3.5 (reconstructions: 2.25; real images: 0.25) | |")
    assert rows[1].endswith("| 0.9 (reconstructions: 0.95) | |")
    assert "100 samples, cfg 1.5, seed 0" in rows[0]  # a record of before the schedule: constant
    log.write_text(json.dumps({**record, "cfg_scale": 8.0, "cfg_schedule": "linear"}) + "\n")
    assert "100 samples, cfg 8.0 (linear), seed 0" in _sample_rows(log)[0]
