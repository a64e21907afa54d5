"""Image files as data: folders and CSV file lists, resident or streamed from disk, bad files, exact resume."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_config
from ssltrain import ConfigError, SSLPlugin, checkpoint, hookimpl
from ssltrain.cli import main as cli_main
from ssltrain.errors import DataError
from ssltrain.imagefiles import ImageSpec, find_image_files, list_images, read_image
from ssltrain.loop import Trainer, train
from ssltrain.plugins import discover
from ssltrain.streaming import StepBatches

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
from make_image_folder import make_image_folder  # noqa: E402

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes x 10 train, 200 unlabeled (nested), 4 x 10 test: 280 small JPEG/PNG files of assorted sizes."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "shapes", train=10, unlabeled=200, test=10, size=24)


def folder_config(root, *overrides, plugins=("pi_model",)):
    return make_config("data.name=image_folder", "data.options={}", f"data.root={root}", "data.image_size=16",
                       "data.num_labeled=20", "data.stream.workers=1", "model.name=small_cnn",
                       "model.options={width: 8}", "train.steps=8", "train.eval_every=4", *overrides,
                       plugins=list(plugins))


def corrupt_copy(folder: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of `folder` with one corrupt unlabeled file (a JPEG header, then text) and one truncated test file."""
    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    bad_u = Path(list_images(root / "unlabeled")[3])
    bad_u.write_bytes(b"\xff\xd8 not really a jpeg")
    bad_t = Path(list_images(root / "test")[0])
    bad_t.write_bytes(bad_t.read_bytes()[:40])
    return root, bad_u, bad_t


def weights(run_dir: Path) -> dict:
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# ----------------------------------------------------------------------------- finding files
def test_folders_labels_and_nested_unlabeled(folder):
    files = find_image_files(str(folder))
    assert files.classes == ["circle", "cross", "square", "triangle"]
    assert len(files.train) == 40 and files.train_y.tolist() == sorted(files.train_y.tolist())
    assert len(files.unlabeled) == 200 and len(files.test) == 40
    assert {Path(p.decode()).suffix for p in files.unlabeled} == {".jpg", ".png"}
    assert all(b"/unlabeled/part0/" in p for p in files.unlabeled)  # found two levels down


def test_csv_file_lists(folder, tmp_path):
    train = list_images(folder / "train" / "circle")[:3] + list_images(folder / "train" / "square")[:2]
    lines = ["path,label"] + [f"{p},{7 if 'circle' in p else 10}" for p in train] + [f"{train[0]},"]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "more.csv").write_text("path\n" + "\n".join(list_images(folder / "unlabeled")[:4]) + "\n")
    rel = os.path.relpath(list_images(folder / "test" / "square")[0], tmp_path)
    (tmp_path / "test.csv").write_text(f"label,path\n10,{rel}\n")  # relative to the CSV's folder
    files = find_image_files(str(tmp_path), train="train.csv", unlabeled="more.csv", test="test.csv")
    assert files.classes == ["7", "10"]  # integer labels in numeric order
    assert files.train_y.tolist() == [0, 0, 0, 1, 1] and files.test_y.tolist() == [1]
    assert len(files.unlabeled) == 1 + 4  # the unlabeled row of train.csv, then more.csv
    assert Path(files.test[0].decode()).is_file()


def test_every_format_decodes_to_the_requested_size_and_channels(tmp_path):
    from PIL import Image
    red = [Image.new("RGB", (12, 7), (255, 0, 0)), Image.new("RGB", (12, 7), (0, 255, 0))]
    red[0].save(tmp_path / "animated.gif", save_all=True, append_images=red[1:])
    Image.new("RGBA", (12, 7), (255, 0, 0, 9)).save(tmp_path / "alpha.webp", lossless=True)
    Image.new("RGB", (12, 7), (255, 0, 0)).save(tmp_path / "plain.bmp")
    Image.new("LA", (12, 7), (76, 9)).save(tmp_path / "gray_alpha.png")
    Image.new("I;16", (12, 7), 19532).save(tmp_path / "sixteen_bit.png")  # 19532 / 65535 * 255 = 76
    Image.new("RGB", (12, 7), (255, 0, 0)).save(tmp_path / "photo.jpg", quality=100)
    for path in sorted(tmp_path.iterdir()):
        for channels in (1, 3):
            image = read_image(str(path), ImageSpec(5, channels, "center"))
            assert image.shape == (channels, 5, 5) and image.dtype == torch.uint8, path.name
            assert abs(int(image[0, 2, 2]) - (76 if channels == 1 or path.stem in ("gray_alpha", "sixteen_bit")
                                              else 255)) <= 2, (path.name, channels)


@pytest.mark.parametrize("case, message", [
    ("empty_unlabeled", "has no images"),
    ("empty_class", "class folder"),
    ("no_class_folders", "no class subfolders"),
    ("no_path_column", "no `path` column"),
    ("mixed_labels", "mix numbers"),
    ("ragged_row", "line 3"),
    ("test_without_label", "no label"),
    ("unknown_test_class", "have no labeled train images"),
    ("missing_root", "data.root"),
])
def test_layout_errors_name_the_fix(folder, tmp_path, case, message):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            shutil.copy(list_images(folder / "train")[0], root / split / name / "0.png")
    options = {}
    if case == "empty_unlabeled":
        (root / "unlabeled" / "nested").mkdir(parents=True)
    elif case == "empty_class":
        (root / "train" / "c").mkdir()
    elif case == "no_class_folders":
        options["train"] = "flat"
        (root / "flat").mkdir()
        shutil.copy(list_images(folder / "train")[0], root / "flat" / "0.png")
    elif case in ("no_path_column", "mixed_labels", "ragged_row"):
        text = {"no_path_column": "file,label\na.png,1\n", "mixed_labels": "path,label\nx.png,1\ny.png,cat\n",
                "ragged_row": "path,label\nx.png,1\ny.png,1,extra\n"}[case]
        (root / "list.csv").write_text(text)
        options["train"] = "list.csv"
    elif case == "test_without_label":
        (root / "t.csv").write_text("path,label\nx.png,a\ny.png,\n")
        options["test"] = "t.csv"
    elif case == "unknown_test_class":
        (root / "test" / "zebra").mkdir()
        shutil.copy(list_images(folder / "train")[0], root / "test" / "zebra" / "0.png")
    else:
        root = tmp_path / "nowhere"
    config = make_config("data.name=image_folder", f"data.options={json.dumps(options)}", f"data.root={root}",
                         "data.image_size=8", "data.num_labeled=null")
    with pytest.raises(ConfigError, match=message):
        Trainer(config, tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=null"], "needs data.image_size"),
    (["data.options={image_size: 8}"], "data.image_size"),
    (["data.streaming=false", "data.stream.crop=random_resized_crop"], "crops while streaming"),
    (["data.num_labeled=100"], "set it to null"),
])
def test_setting_errors_name_the_fix(folder, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(folder_config(folder, *overrides), tmp_path)


def test_image_size_and_streaming_need_image_files(tmp_path):
    for setting in ("data.image_size=32", "data.streaming=true"):
        with pytest.raises(ConfigError, match="apply to image files"):
            Trainer(make_config(setting), tmp_path)


# ----------------------------------------------------------------------------- resident or streamed
def test_auto_streams_over_the_memory_budget(folder, tmp_path):
    size = 280 * 3 * 16 * 16 / 2**30  # GiB of the decoded images
    small = Trainer(folder_config(folder, f"data.stream.memory_budget_gb={size * 0.99}"), tmp_path).data
    big = Trainer(folder_config(folder, f"data.stream.memory_budget_gb={size * 1.01}"), tmp_path).data
    assert small.streamed and "streamed from disk" in small.input_path and "over the memory budget" in small.input_path
    assert not big.streamed and "held decoded on cpu" in big.input_path and "within" in big.input_path
    assert torch.is_tensor(big.train_x) and not torch.is_tensor(small.train_x)
    crop = Trainer(folder_config(folder, "data.stream.crop=random_resized_crop"), tmp_path).data
    assert crop.streamed and "random_resized_crop" in crop.input_path


@pytest.mark.parametrize("plugins, overrides", [
    (["pi_model"], []),
    (["pi_model", "ds3l"], ["data.num_labeled=8", "data.class_mismatch={seen_classes: [0, 1], unseen_ratio: 0.5}",
                            "ds3l.eval_rows=50"]),
    (["sla"], ["sla.log_all_modes=true"]),
])
def test_streamed_run_equals_resident_run(folder, tmp_path, plugins, overrides):
    """Plugins cannot tell the paths apart: the same rows, views, weights and evaluations (also for the
    plugins that read data.train_x / data.test_x in ssl_evaluate_end)."""
    runs = {}
    for streaming in ("false", "true"):
        runs[streaming] = train(folder_config(folder, f"data.streaming={streaming}", *overrides, plugins=plugins),
                                tmp_path / streaming)
    assert_same_weights(tmp_path / "false", tmp_path / "true")
    assert runs["false"]["final_eval"] == runs["true"]["final_eval"]
    assert (tmp_path / "true" / "labeled_files.json").read_text() == (tmp_path / "false" / "labeled_files.json").read_text()


def test_streamed_resume_is_exact(folder, tmp_path):
    """Stopped at step 6 and resumed (new workers started at step 6), a streamed run with random crops in the
    workers ends bit-identical to an uninterrupted one: the batch of step s depends only on (seed, s). The
    Pi-model ramp has a fixed length: its default follows train.steps, which differs between the two runs."""
    full = folder_config(folder, "train.steps=12", "train.checkpoint_every=6", "data.streaming=true",
                         "data.stream.crop=random_resized_crop", "data.stream.crop_scale=[0.3, 1.0]",
                         "data.stream.workers=2", "pi_model.rampup_steps=5")
    train(full, tmp_path / "full")
    assert "image files streamed from disk" in (tmp_path / "full" / "console.log").read_text()
    half = full.model_copy(deep=True)
    half.train.steps = 6
    train(half, tmp_path / "resumed")
    assert train(full, tmp_path / "resumed", resume=True)["steps"] == 12
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")


def test_resume_refuses_changed_files(folder, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(folder, root)
    config = folder_config(root, "train.steps=2", "train.eval_every=2")
    train(config, tmp_path / "run")
    Path(list_images(root / "train" / "circle")[0]).unlink()
    config.train.steps = 4
    with pytest.raises(ConfigError, match="image files changed"):
        train(config, tmp_path / "run", resume=True)


def test_worker_batches_depend_only_on_seed_and_step(folder, tmp_path):
    config = folder_config(folder, "data.streaming=true", "data.stream.crop=random_resized_crop")
    a, b = Trainer(config, tmp_path), Trainer(folder_config(folder, "data.streaming=true", "data.stream.workers=0",
                                                            "data.stream.crop=random_resized_crop"), tmp_path)
    rows_a = [a.source.rows(s) for s in (0, 1, 2, 3)]
    rows_b = {s: b.source.rows(s) for s in (3, 1, 2, 0)}  # any order, decoded in this process
    for ra, rb in zip(rows_a, [rows_b[s] for s in (0, 1, 2, 3)]):
        assert torch.equal(ra.x_l, rb.x_l) and torch.equal(ra.x_u, rb.x_u) and torch.equal(ra.idx_u, rb.idx_u)
    assert not torch.equal(rows_a[0].x_u, rows_a[1].x_u)
    assert rows_a[0].x_l.shape == (16, 3, 16, 16) and rows_a[0].x_u.shape == (32, 3, 16, 16)
    assert rows_a[0].x_l.dtype == torch.uint8


def test_labeled_rows_are_seeded_and_saved_with_paths(folder, tmp_path):
    for seed in (0, 1):
        train(folder_config(folder, f"seed={seed}", "train.steps=1"), tmp_path / str(seed))
    saved = [json.loads((tmp_path / str(s) / "labeled_files.json").read_text()) for s in (0, 1)]
    assert len(saved[0]) == 20 and saved[0] != saved[1]
    for path, label in saved[0]:
        assert Path(path).parent.name == label and Path(path).is_file()
    index = json.loads((tmp_path / "0" / "labeled_indices.json").read_text())
    assert len(index) == 20


def test_image_rows_decode_what_plugins_index(folder, tmp_path):
    resident = Trainer(folder_config(folder, "data.streaming=false"), tmp_path).data
    streamed = Trainer(folder_config(folder, "data.streaming=true"), tmp_path).data
    assert streamed.test_x.shape == resident.test_x.shape and len(streamed.train_x) == len(resident.train_x) == 240
    for key in (5, slice(3, 9), torch.tensor([7, 0, 200]), [1, 2]):
        assert torch.equal(streamed.train_x[key], resident.train_x[key])
    assert torch.equal(streamed.test_x[-4:], resident.test_x[-4:])


# ----------------------------------------------------------------------------- bad files
def test_bad_files_are_skipped_with_their_path_and_a_count(folder, tmp_path, capfd):
    root, bad_u, bad_t = corrupt_copy(folder, tmp_path)
    streamed = Trainer(folder_config(root, "data.streaming=true"), tmp_path / "s")
    bad_row = len(streamed.data.files.train) + [p.decode() for p in streamed.data.files.unlabeled].index(str(bad_u))
    drawn = [streamed.source.rows(s).idx_u for s in range(8)]  # 8 x 32 rows of 200 + 40: every row is drawn
    assert bad_row not in torch.cat(drawn).tolist()  # replaced by the next unlabeled row
    assert sum(map(sum, streamed.evaluate(0)["confusion"])) == 39  # the unreadable test image is left out
    err = capfd.readouterr().err
    assert f"skipped unreadable image {bad_u}" in err and f"skipped unreadable image {bad_t}" in err
    assert "2 skipped so far" in err
    resident = Trainer(folder_config(root, "data.streaming=false"), tmp_path / "r")
    assert len(resident.data.files.unlabeled) == 199 and len(resident.data.test_y) == 39
    assert "2 skipped so far" in capfd.readouterr().err


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_bad_file_is_fatal_when_asked(folder, tmp_path, streaming):
    root, bad_u, _ = corrupt_copy(folder, tmp_path)
    with pytest.raises(DataError, match=f"cannot read image {bad_u}.*data.on_bad_file=skip"):
        trainer = Trainer(folder_config(root, f"data.streaming={streaming}", "data.on_bad_file=error"), tmp_path)
        for step in range(8):
            trainer.source.rows(step)


def test_decoding_jpegs_on_the_device_gives_the_same_rows(folder, tmp_path):
    """The nvjpeg path (data.stream.decode=device), run with the CPU as the device: workers pass JPEG bytes,
    the training process decodes them in one batch; a JPEG it cannot decode is read again and replaced."""
    root, bad_u, _ = corrupt_copy(folder, tmp_path)
    workers = Trainer(folder_config(root, "data.streaming=true"), tmp_path)
    device = Trainer(folder_config(root, "data.streaming=true", "data.stream.decode=device"), tmp_path)
    for step in range(8):
        a, b = workers.source.rows(step), device.source.rows(step)
        assert torch.equal(a.x_u, b.x_u) and torch.equal(a.idx_u, b.idx_u) and torch.equal(a.x_l, b.x_l)


@pytest.mark.cuda
def test_cuda_stream_copies_and_nvjpeg(folder, tmp_path):
    """On a GPU: pinned batches copied on a side stream equal the resident rows; nvjpeg-decoded JPEGs are
    close to the CPU's (its IDCT differs by a few levels). Marked cuda: run by `pytest -m cuda` (gpu_check);
    its CPU rehearsal skips it, as nvjpeg and side streams have no CPU form."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (nvjpeg, side-stream copies)")
    cuda = ["train.device=cuda", "train.amp=none"]
    resident = Trainer(folder_config(folder, "data.streaming=false", *cuda), tmp_path)
    streamed = Trainer(folder_config(folder, "data.streaming=true", *cuda), tmp_path)
    nvjpeg = Trainer(folder_config(folder, "data.streaming=true", "data.stream.decode=device", *cuda), tmp_path)
    for step in range(4):
        a, b, c = resident.source.rows(step), streamed.source.rows(step), nvjpeg.source.rows(step)
        assert b.x_u.is_cuda and torch.equal(a.x_u, b.x_u) and torch.equal(a.idx_u, b.idx_u)
        assert (c.x_u.float() - b.x_u.float()).abs().mean() < 3
    assert train(folder_config(folder, "data.streaming=true", *cuda), tmp_path / "run")["steps"] == 8


# ----------------------------------------------------------------------------- torchrun
class Probe(SSLPlugin):
    """Saves the unlabeled rows each rank drew and its final parameters."""

    def __init__(self, config=None):
        super().__init__(config)
        self.rows = []

    @hookimpl
    def ssl_step_end(self, batch):
        self.rows.append(batch.idx_u.tolist())

    @hookimpl
    def ssl_evaluate_end(self, model, metrics, step):
        if step == 6:
            params = torch.cat([p.detach().flatten() for p in model.parameters()])
            torch.save({"rows": self.rows, "params": params, "top1": metrics["top1"]},
                       f"{self.out}/rank{torch.distributed.get_rank()}.pt")


def _worker(rank, port, root, run_dir, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    Probe.out = out
    config = make_config("data.name=image_folder", "data.options={}", f"data.root={root}", "data.image_size=16",
                         "data.num_labeled=20", "data.streaming=true", "data.stream.workers=1",
                         "model.name=small_cnn", "model.options={width: 8}", "train.steps=6", "train.eval_every=6",
                         classes={"probe": Probe}, plugins=["pi_model", "probe"])
    try:
        train(config, run_dir, classes={**discover(), "probe": Probe})
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_stream_disjoint_shards(folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "probe"
    out.mkdir()
    mp.spawn(_worker, args=(port, str(folder), tmp_path / "run", str(out)), nprocs=2)
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    for u0, u1 in zip(r0["rows"], r1["rows"]):
        assert len(u0) == len(u1) == 16 and not set(u0) & set(u1)
    assert torch.equal(r0["params"], r1["params"]) and r0["top1"] == r1["top1"]
    # the sharded evaluation of the streamed test set equals one process evaluating all of it
    single = Trainer(folder_config(folder, "data.streaming=true"), tmp_path / "single")
    single.load_state_dict(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt"), weights_only=True)
    assert single.evaluate(6)["top1"] == pytest.approx(r0["top1"])


# ----------------------------------------------------------------------------- the example config
def test_folder_example_config_end_to_end(tmp_path, capsys):
    root = make_image_folder(tmp_path / "example", train=5, unlabeled=60, test=5, size=24)
    out = tmp_path / "run"
    code = cli_main(["train", str(ROOT / "configs" / "folder_example.yaml"), "--out", str(out), "--set",
                     f"data.root={root}", "--set", "train.steps=4", "--set", "train.eval_every=2",
                     "--set", "data.stream.workers=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "input    image files held decoded on cpu" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert len(json.loads((out / "labeled_files.json").read_text())) == 4 * 5
    code = cli_main(["train", str(ROOT / "configs" / "folder_example.yaml"), "--out", str(tmp_path / "streamed"),
                     "--set", f"data.root={root}", "--set", "train.steps=2", "--set", "data.streaming=true",
                     "--set", "data.stream.workers=1"])
    assert code == 0 and "streamed from disk" in capsys.readouterr().out
