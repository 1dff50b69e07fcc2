"""Data larger than memory: streamed images give the batches in-memory ones give, resume exactly,
are converted into the Arrow cache once; the code dump is written in shards, every image once, in order."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_TRANSFORMER, TINY_VQVAE, tiny_train
from stage1_vqvae.train import train_vqvae
from vqgen.core.data import arrow
from vqgen.core.data.config import DataConfig
from vqgen.core.data.images import ImageDataset, load_image_data, to_model_range
from vqgen.core.data.loaders import make_loader
from vqgen.core.data.shapes import make_shapes
from vqgen.core.runtime.errors import VQGenError
from vqgen.core.store import codes as codes_module
from vqgen.core.store.codes import CodesMeta, CodeSplit, load_codes
from vqgen.core.store.configs import save_config

ROOT = Path(__file__).resolve().parents[1]


def png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def parquet(tmp_path) -> Path:
    """60 shapes 16x16 with labels, as PNG bytes in one parquet file."""
    images, labels, _ = make_shapes(60, seed=5, size=16)
    table = pa.table({"image": pa.array([png(x) for x in images], pa.binary()), "label": labels.numpy()})
    path = tmp_path / "shapes.parquet"
    pq.write_table(table, path, row_group_size=16)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """30 shapes 16x16 in two class folders."""
    images, labels, _ = make_shapes(30, seed=7, size=16)
    for i, (x, y) in enumerate(zip(images, labels)):
        (tmp_path / "imgs" / f"c{int(y) % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / f"c{int(y) % 2}" / f"{i:03d}.png").write_bytes(png(x))
    return tmp_path / "imgs"


def data(source: Path, stream: str, **kw):
    return load_image_data(DataConfig(source=str(source), stream=stream, **kw))


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_streamed_split_holds_the_same_images_as_the_one_in_memory(kind, request):
    source = request.getfixturevalue(kind)
    memory, streamed = data(source, "never"), data(source, "always")
    assert not memory.train.streamed and streamed.train.streamed
    assert "in memory" in memory.storage and "streamed" in streamed.storage and "stream='always'" in streamed.storage
    for a, b in ((memory.train, streamed.train), (memory.test, streamed.test)):
        assert len(a) == len(b) and a.shape == b.shape
        assert torch.equal(a.images, b.take(np.arange(len(b))))
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.take([2, 0, 2]), b.take([2, 0, 2]))  # any order, repeats allowed
    assert (memory.channels, memory.height, memory.width) == (streamed.channels, streamed.height, streamed.width)


def test_auto_streams_by_decoded_size(parquet, monkeypatch):
    assert not data(parquet, "auto").train.streamed
    assert "within" in data(parquet, "auto").storage
    monkeypatch.setattr("vqgen.core.data.images.STREAM_ABOVE", 1000)  # 60 x 3x16x16 bytes is more
    auto = data(parquet, "auto")
    assert auto.train.streamed and "over" in auto.storage


def epoch_batches(split, workers: int, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    """The batches the trainer's loader would give (Accelerate's seedable sampler), over `epochs` epochs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=3))
    loader = accelerator.prepare(make_loader(ImageDataset(split), 8, train=True, seed=3, num_workers=workers))
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out += [{k: v.clone() for k, v in b.items()} for b in loader]
    return out


def test_same_batches_in_memory_streamed_and_with_workers(parquet):
    memory, streamed = data(parquet, "never"), data(parquet, "always")
    a = epoch_batches(memory.train, 0)
    b = epoch_batches(streamed.train, 0)
    c = epoch_batches(streamed.train, 2)
    assert len(a) == len(b) == len(c) == 2 * (len(memory.train) // 8)
    assert not torch.equal(a[0]["index"], a[len(a) // 2]["index"])  # epochs differ: the sampler shuffles
    for x, y, z in zip(a, b, c):
        for key in ("image", "label", "index"):
            assert torch.equal(x[key], y[key]) and torch.equal(x[key], z[key]), key


def test_streamed_loader_defaults_to_workers_and_memory_to_none(parquet):
    """Workers decode a streamed split's batches; a training loader keeps them from epoch to epoch."""
    memory, streamed = data(parquet, "never"), data(parquet, "always")
    assert make_loader(ImageDataset(memory.train), 4).num_workers == 0
    loader = make_loader(ImageDataset(streamed.train), 4, train=True)
    assert loader.num_workers >= 1 and loader.persistent_workers
    evaluation = make_loader(ImageDataset(streamed.test), 4)  # its workers end with each pass
    assert evaluation.num_workers >= 1 and not evaluation.persistent_workers
    assert make_loader(ImageDataset(streamed.train), 4, num_workers=0).num_workers == 0
    # workers come from the fork server, never forked from the (threaded) training process itself
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert evaluation.multiprocessing_context.get_start_method() == "forkserver"


def test_streamed_training_resumes_exactly_mid_epoch(parquet, tmp_path):
    """2 + 3 steps with a resume between equals 5 straight steps; 5 steps are mid-epoch (6 batches of 8)."""
    cfg = DataConfig(source=str(parquet), stream="always")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train = dict(batch_size=8, num_workers=2)
    train_vqvae(straight, cfg, tiny_train(max_steps=5, save_every=2, **train), TINY_VQVAE, encode=False)
    train_vqvae(split, cfg, tiny_train(max_steps=2, save_every=2, **train), TINY_VQVAE, encode=False)
    train_vqvae(split, cfg, tiny_train(max_steps=5, save_every=2, **train), resume=True, encode=False)
    a, b = load_file(straight / "vqvae" / "model.safetensors"), load_file(split / "vqvae" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (run / "vqvae" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line] for run in (straight, split)]
    assert losses[0][2:] == losses[1][2:] and len(losses[0]) == 5


def test_code_dump_shards_hold_every_image_once_in_order(parquet, tmp_path, monkeypatch):
    monkeypatch.setattr(codes_module, "SHARD_SIZE", 7)
    run = tmp_path / "run"
    cfg = DataConfig(source=str(parquet), stream="always")
    train_vqvae(run, cfg, tiny_train(max_steps=2, batch_size=8), TINY_VQVAE)
    meta = json.loads((run / "codes" / "meta.json").read_text())
    shards = dict((k, v) for k, v in meta["shards"])
    images = data(parquet, "never")
    n_train, n_test = len(images.train), len(images.test)
    assert [Path(f).name for f in shards["train"]] == [f"shard-{i:05d}.safetensors" for i in range(-(-n_train // 7))]
    parts = [load_file(str(run / "codes" / f))["codes"] for f in shards["train"]]
    assert all(len(p) == 7 for p in parts[:-1]) and sum(len(p) for p in parts) == n_train
    assert parts[0].dtype == torch.int16
    from stage1_vqvae.config import VQVAEConfig
    from stage1_vqvae.model import VQVAE
    from vqgen.core.store.weights import load_model

    model = load_model(VQVAE, VQVAEConfig, run / "vqvae").eval()
    splits, loaded = load_codes(run / "codes")
    with torch.no_grad():
        for name, split in (("train", images.train), ("test", images.test)):
            assert torch.equal(splits[name].codes, model.encode(to_model_range(split.images))), name
            assert torch.equal(splits[name].labels, split.labels)
    assert dict(loaded.split_sizes) == {"train": n_train, "test": n_test}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_codes_of_format_2_still_load(tmp_path):
    """A codes folder as format 2 wrote it: one datasets DatasetDict and a meta.json without shards."""
    from datasets import Array2D, Dataset, DatasetDict, Features, Value

    folder = tmp_path / "codes"
    codes = {"train": torch.randint(0, 16, (9, 2, 3)), "test": torch.randint(0, 16, (4, 2, 3))}
    labels = {"train": torch.arange(9) % 2, "test": torch.arange(4) % 2}
    features = Features({"codes": Array2D(shape=(2, 3), dtype="int16"), "label": Value("int64")})
    DatasetDict({k: Dataset.from_dict({"codes": codes[k].to(torch.int16).numpy(), "label": labels[k].numpy()},
                                      features=features) for k in codes}).save_to_disk(str(folder))
    meta = CodesMeta(codebook_size=16, grid_height=2, grid_width=3, num_classes=2, class_names=("a", "b"),
                     vqvae_fingerprint="x", vqvae_dir="y", data_source="z", image_channels=3, image_height=8,
                     image_width=12, split_sizes=(("train", 9), ("test", 4)))
    save_config(meta, folder / "meta.json")
    saved = json.loads((folder / "meta.json").read_text())
    del saved["shards"]
    saved["format_version"] = 2
    (folder / "meta.json").write_text(json.dumps(saved))
    splits, loaded = load_codes(folder)
    assert loaded.shards == ()
    for k in codes:
        assert torch.equal(splits[k].codes, codes[k]) and torch.equal(splits[k].labels, labels[k])


def test_save_codes_round_trip_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(codes_module, "SHARD_SIZE", 4)
    meta = CodesMeta(codebook_size=16, grid_height=2, grid_width=2, num_classes=0, class_names=(),
                     vqvae_fingerprint="x", vqvae_dir="y", data_source="z", image_channels=1, image_height=8,
                     image_width=8, split_sizes=())
    splits = {"train": CodeSplit(torch.randint(0, 16, (10, 2, 2)), None), "test": CodeSplit(torch.zeros(0, 2, 2,
                                                                                             dtype=torch.long), None)}
    codes_module.save_codes(tmp_path / "codes", splits, meta)
    loaded, m = load_codes(tmp_path / "codes")
    assert torch.equal(loaded["train"].codes, splits["train"].codes) and len(loaded["test"]) == 0
    assert [len(v) for _, v in m.shards] == [3, 1] and dict(m.split_sizes) == {"train": 10, "test": 0}


@pytest.mark.parametrize("size, message", [(9, "holds more code grids than the 9 of meta.json"),
                                           (11, "holds 10 code grids but meta.json says 11")])
def test_shards_that_disagree_with_meta_json_are_refused_by_count(tmp_path, monkeypatch, size, message):
    monkeypatch.setattr(codes_module, "SHARD_SIZE", 4)
    meta = CodesMeta(codebook_size=16, grid_height=2, grid_width=2, num_classes=0, class_names=(),
                     vqvae_fingerprint="x", vqvae_dir="y", data_source="z", image_channels=1, image_height=8,
                     image_width=8, split_sizes=())
    codes_module.save_codes(tmp_path / "codes", {"train": CodeSplit(torch.randint(0, 16, (10, 2, 2)), None)}, meta)
    meta_file = tmp_path / "codes" / "meta.json"
    saved = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**saved, "split_sizes": [["train", size]]}))
    with pytest.raises(VQGenError, match=message):
        load_codes(tmp_path / "codes")


@pytest.mark.parametrize("kind", ["parquet", "folder"])
def test_the_arrow_cache_is_converted_once_and_reused(kind, request, monkeypatch):
    source = request.getfixturevalue(kind)
    first = data(source, "always")
    entries = sorted(p.name for p in arrow.cache_root().iterdir())
    assert entries and all((arrow.cache_root() / e / arrow.INFO).is_file() for e in entries)

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(arrow.pa.ipc, "new_stream", no_conversion)
    again = data(source, "always")
    assert sorted(p.name for p in arrow.cache_root().iterdir()) == entries
    assert torch.equal(first.train.take(range(len(first.train))), again.train.take(range(len(again.train))))


def test_a_changed_folder_is_converted_again(folder):
    data(folder, "always")
    before = {p.name for p in arrow.cache_root().iterdir()}
    victim = next(folder.rglob("*.png"))
    victim.write_bytes(png(make_shapes(1, seed=99, size=16)[0][0]))
    data(folder, "always")
    assert len({p.name for p in arrow.cache_root().iterdir()} - before) >= 1


def test_streamed_refs_travel_as_file_names(parquet):
    """What a DataLoader worker receives (the object's state, as copy and multiprocessing take it): the file
    names and row numbers, never the mapped column; the copy maps the files again on its first read."""
    import copy

    refs = data(parquet, "always").train.raw.refs
    refs[0]  # maps the files
    state = refs.__getstate__()
    assert state["_column"] is None and set(state) == {"files", "column", "_column", "rows"}
    twin = copy.deepcopy(refs)
    assert twin._column is None and twin.files == refs.files
    assert twin[5] == refs[5]


def test_code_copies_are_refused_for_streamed_images(parquet):
    with pytest.raises(VQGenError, match="code_copies=1 needs the images in memory"):
        data(parquet, "always", augment="flip", code_copies=1)


@pytest.mark.parametrize("value", ["-1", "-3"])
def test_negative_num_workers_is_refused_by_name_before_anything_is_written(value, tmp_path, capsys):
    from conftest import load_script

    script = load_script("train_vqvae")
    run = tmp_path / "run"
    assert script.main(["--run", str(run), "--num-workers", value]) == 2
    err = capsys.readouterr().err
    assert "num_workers must be >= 0" in err and f"got {value}" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_stream_mode_is_checked():
    with pytest.raises(VQGenError, match="stream must be one of auto, always, never, got 'sometimes'"):
        DataConfig(stream="sometimes")


def test_stop_workers_ends_a_training_loaders_processes(parquet):
    loader = make_loader(ImageDataset(data(parquet, "always").train), 8, train=True, num_workers=2)
    next(iter(loader))
    workers = loader._iterator._workers
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    from vqgen.core.data.loaders import stop_workers

    stop_workers(loader)
    assert loader._iterator is None and not any(w.is_alive() for w in workers)


@pytest.mark.slow
def test_two_processes_dump_every_streamed_image_once_in_order(spawn, parquet, tmp_path):
    """torch.distributed.run with 2 CPU processes, streamed images with 2 workers each: the dump's grids
    are the images' codes in dataset order, none lost or doubled (the held-out test split is odd: 6)."""
    import os

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--",
           str(ROOT / "scripts" / "train_vqvae.py"), "--run", str(run), "--data", str(parquet), "--stream", "always",
           "--num-workers", "2", "--batch-size", "4", "--max-steps", "3", "--hidden-channels", "16",
           "--res-channels", "8", "--codebook-size", "16", "--code-dim", "8", "--restart-after", "2",
           "--eval-every", "0", "--save-every", "0", "--log-every", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    proc = spawn.run(cmd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from stage1_vqvae.config import VQVAEConfig
    from stage1_vqvae.model import VQVAE
    from vqgen.core.store.weights import load_model

    model = load_model(VQVAE, VQVAEConfig, run / "vqvae").eval()
    images = data(parquet, "never")
    splits, _ = load_codes(run / "codes")
    with torch.no_grad():
        for name, split in (("train", images.train), ("test", images.test)):
            assert torch.equal(splits[name].codes, model.encode(to_model_range(split.images))), name


def test_evaluation_and_sample_scores_never_decode_a_whole_streamed_split(parquet, tmp_path, monkeypatch):
    """`vqgen eval` (with --samples) on streamed data reads the test split a batch at a time and judges
    on a seeded subset; in memory and streamed give the same numbers."""
    from accelerate import Accelerator

    from stage2_prior.train import train_prior
    from vqgen.run import Run, judging_images

    run = tmp_path / "run"
    train_vqvae(run, DataConfig(source=str(parquet), stream="never"), tiny_train(max_steps=4, batch_size=8),
                TINY_VQVAE)
    train_prior(run, "transformer", tiny_train(max_steps=4, batch_size=8), TINY_TRANSFORMER)
    loaded = Run.load(run)
    in_memory, streamed = data(parquet, "never"), data(parquet, "always")
    expected = loaded.evaluate(in_memory, batch_size=5)
    scores_memory = loaded.sample_quality(Accelerator(cpu=True), 8, in_memory, judge_steps=5)

    def whole_split(self):
        raise AssertionError("a whole streamed split was decoded")

    with monkeypatch.context() as patched:
        patched.setattr(type(streamed.test), "images", property(whole_split))
        assert loaded.evaluate(streamed, batch_size=5) == pytest.approx(expected)
    # a split within JUDGING_IMAGES is judged whole: the same scores as in memory
    scores_streamed = loaded.sample_quality(Accelerator(cpu=True), 8, streamed, judge_steps=5)
    assert all(scores_streamed[k] == pytest.approx(scores_memory[k]) for k in ("samples", "reconstructed", "real"))
    monkeypatch.setattr(type(streamed.test), "images", property(whole_split))
    # a larger split: a seeded subset of 20, in dataset order
    monkeypatch.setattr("vqgen.core.evaluate.quality.JUDGING_IMAGES", 20)
    images, labels = judging_images(streamed.train, seed=3)
    rows = [i for i in range(len(in_memory.train)) if any(torch.equal(in_memory.train.images[i], x) for x in images)]
    assert len(images) == 20 and len(rows) >= 20
    assert images.shape[1:] == in_memory.train.images.shape[1:] and labels.shape == (20,)
    again, _ = judging_images(streamed.train, seed=3)
    assert torch.equal(images, again)
    assert judging_images(in_memory.train, seed=3)[0] is in_memory.train.images  # in memory: all of it
