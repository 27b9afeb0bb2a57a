"""Image data as pixel tokens: the formats users have (npy / npz, PNG folders, CIFAR-10 python
batches), scikit-learn's digits, quantisation to ``levels`` tokens and the held-out split."""
from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

from dmmd.data import DataConfig, ImageSource, load_images, make_source
from dmmd.data.images import dequantize, quantize
from dmmd.extras import MissingExtra


def _images(n=6, h=4, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_npy_and_npz_round_trip_and_grey_arrays_get_one_channel(tmp_path):
    x = _images()
    np.save(tmp_path / "a.npy", x)
    assert np.array_equal(load_images(str(tmp_path / "a.npy")), x)
    np.savez(tmp_path / "one.npz", anything=x)
    np.savez(tmp_path / "named.npz", labels=np.arange(6), images=x)
    assert np.array_equal(load_images(str(tmp_path / "one.npz")), x)
    assert np.array_equal(load_images(str(tmp_path / "named.npz")), x)
    np.save(tmp_path / "grey.npy", x[..., 0])
    assert load_images(str(tmp_path / "grey.npy")).shape == (6, 4, 5, 1)


@pytest.mark.parametrize("make,match", [
    (lambda d: np.save(d / "f.npy", np.zeros((2, 3, 3, 1), np.float32)), "uint8"),
    (lambda d: np.save(d / "f.npy", np.zeros((2, 3), np.uint8)), r"\[N, H, W, C\]"),
    (lambda d: np.savez(d / "f.npz", a=np.zeros((2, 3, 3), np.uint8), b=np.zeros(2)), "named 'images'")])
def test_bad_image_files_are_named(tmp_path, make, match):
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=match) as e:
        load_images(str(path))
    assert str(path) in str(e.value)


def test_png_folder(tmp_path):
    image = pytest.importorskip("PIL.Image")
    x = _images(n=3)
    for i, im in enumerate(x):
        image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    assert np.array_equal(load_images(str(tmp_path)), x)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_images(str(empty))


def test_cifar10_python_batches_are_read_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": [0, 1, 2, 3], b"data": data}, f)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"labels": [5], b"data": data[:1]}, f)
    x = load_images(str(tmp_path / "data_batch_1"))
    assert x.shape == (4, 32, 32, 3)
    n, r, c, ch = 2, 5, 17, 2
    assert x[n, r, c, ch] == data[n, ch * 1024 + r * 32 + c]
    assert load_images(str(tmp_path)).shape == (5, 32, 32, 3)  # the folder: every batch
    source = make_source(DataConfig(data=str(tmp_path), length=3072, levels=256))
    assert source.length == 3072 and source.vocab_size == 256
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_images(str(tmp_path / "data_batch_3"))


def test_quantise_to_levels_raster_order_channels_last():
    x = _images(n=2, h=2, w=3, c=3)
    t256 = quantize(x, 256)
    assert t256.shape == (2, 18) and np.array_equal(t256, x.reshape(2, -1))
    assert t256[1, (1 * 3 + 2) * 3 + 1] == x[1, 1, 2, 1]  # row 1, column 2, channel 1
    t4 = quantize(x, 4)
    assert np.array_equal(t4, x.reshape(2, -1).astype(np.int64) // 64)
    back = dequantize(torch.from_numpy(t4), 4, (2, 3, 3))
    assert np.array_equal(quantize(back, 4), t4) and np.abs(back.astype(int) - x.astype(int)).max() <= 32
    with pytest.raises(ValueError, match="levels"):
        quantize(x, 1)


def test_image_source_split_is_held_out_and_length_is_checked(tmp_path):
    x = _images(n=40, h=2, w=2, c=1)
    np.save(tmp_path / "x.npy", x)
    source = make_source(DataConfig(data=str(tmp_path / "x.npy"), length=4, levels=16))
    assert (len(source.train), len(source.val)) == (36, 4)
    rows = {tuple(r) for r in source.train.tolist()}
    assert not rows & {tuple(r) for r in source.val.tolist()} or len(rows) < 36  # disjoint unless duplicates
    g = torch.Generator().manual_seed(0)
    batch = source.sample(100, g, split="validation")
    assert batch.shape == (100, 4) and {tuple(r) for r in batch.tolist()} <= {tuple(r) for r in source.val.tolist()}
    assert int(batch.max()) < 16
    with pytest.raises(ValueError, match="pass --length 4"):
        make_source(DataConfig(data=str(tmp_path / "x.npy"), length=128))


def test_digits_are_17_grey_levels_of_8x8():
    pytest.importorskip("sklearn")
    source = make_source(DataConfig(data="digits", length=64))
    assert isinstance(source, ImageSource) and source.vocab_size == 17 and source.shape == (8, 8, 1)
    assert len(source.train) + len(source.val) == 1797 and len(source.val) == 180
    assert int(source.train.min()) == 0 and int(source.train.max()) == 16
    assert source.to_images(source.val[:2]).shape == (2, 8, 8, 1)


def test_digits_without_scikit_learn_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(MissingExtra, match=r"scikit-learn.*pip install 'dmmd\[images\]'"):
        ImageSource.digits()


def test_sample_writes_a_png_grid_for_image_data(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    from dmmd.apps.cli import main
    from dmmd.training.teacher import TeacherConfig, train_teacher

    x = _images(n=12, h=3, w=2, c=3)
    np.save(tmp_path / "x.npy", x)
    cfg = TeacherConfig.from_dict(dict(data=str(tmp_path / "x.npy"), levels=8, length=18, width=16, depth=1,
                                       heads=2, batch_size=4, steps=2, eval_every=0, out=str(tmp_path / "t")))
    ckpt = train_teacher(cfg, progress=False)["checkpoint"]
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", ckpt, "--steps", "2", "--num", "5", "--png", str(png)]) == 0
    with image.open(png) as im:
        # 3 columns x 2 rows of 3x2 pictures enlarged 22x (to >= 64 px), 2 px apart
        assert im.size == (3 * (2 * 22 + 2) + 2, 2 * (3 * 22 + 2) + 2) and im.mode == "RGB"
        grid = np.asarray(im)
    assert set(np.unique(grid[2:68, 2:46].reshape(-1, 3), axis=0)[:, 0] % 32) <= {16}  # level centres
    markov = TeacherConfig.from_dict(dict(data="markov", vocab_size=4, length=6, width=16, depth=1, heads=2,
                                          batch_size=4, steps=2, eval_every=0, out=str(tmp_path / "m")))
    ckpt = train_teacher(markov, progress=False)["checkpoint"]
    capsys.readouterr()
    assert main(["sample", "--checkpoint", ckpt, "--png", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "--png" in err and "not image data" in err and "\n" not in err.strip()



def test_image_teachers_get_2d_positions_and_their_students_pyramid_noise(tmp_path):
    from dmmd.models.denoiser import Denoiser, DenoiserConfig
    from dmmd.models.noise import NoiseSpec
    from dmmd.training.distill import DistillConfig, distill, load_student
    from dmmd.training.teacher import TeacherConfig, load_teacher, train_teacher

    # positions: row + column + channel embeddings, in raster order with the channels last
    m = Denoiser(DenoiserConfig(num_classes=5, length=24, image_shape=[2, 4, 3], width=8, heads=2, depth=1))
    pos = m.positions()
    assert pos.shape == (24, 8) and m.config.image_shape == (2, 4, 3)
    i = (1 * 4 + 2) * 3 + 1  # row 1, column 2, channel 1
    torch.testing.assert_close(pos[i], m.pos_row[1] + m.pos_col[2] + m.pos_channel[1])
    with pytest.raises(ValueError, match="image_shape"):
        DenoiserConfig(num_classes=5, length=20, image_shape=(2, 4, 3))

    # the pyramid: levels 5x6, 3x3, 2x2, 1x1; a pixel's channels share its vector; coarse
    # levels are shared by neighbouring pixels, the finest is not
    g = torch.Generator().manual_seed(0)
    noise = NoiseSpec(8, "pyramid").draw(7, 5 * 6 * 2, g, (5, 6, 2)).reshape(7, 5, 6, 2, 8)
    torch.testing.assert_close(noise[..., 0, :], noise[..., 1, :])
    fine, coarse, top = noise[..., 0, 0:2], noise[..., 0, 2:4], noise[..., 0, 6:8]
    assert not torch.equal(fine[:, 0, 0], fine[:, 0, 1])
    torch.testing.assert_close(coarse[:, 0, 0], coarse[:, 1, 1])  # both in the 3x3 map's cell (0, 0)
    torch.testing.assert_close(top[:, 0, 0], top[:, 4, 5])  # 1x1: one vector per image
    assert abs(float(noise.std()) - 1) < 0.15
    with pytest.raises(ValueError, match="pyramid"):
        NoiseSpec(4, "pyramid").draw(2, 10, g, None)

    # an image teacher, and a masked student that defaults to pyramid noise and samples
    x = _images(n=16, h=3, w=2, c=1)
    np.save(tmp_path / "x.npy", x)
    tcfg = TeacherConfig.from_dict(dict(data=str(tmp_path / "x.npy"), levels=4, length=6, width=16, depth=1,
                                        heads=2, batch_size=4, steps=2, eval_every=0, out=str(tmp_path / "t")))
    ckpt = train_teacher(tcfg, progress=False)["checkpoint"]
    teacher, _, _ = load_teacher(ckpt)
    assert teacher.config.image_shape == (3, 2, 1) and hasattr(teacher, "pos_row")
    result = distill(DistillConfig.from_dict(dict(teacher=ckpt, student_steps=2, batch_size=4, steps=2,
                                                  out=str(tmp_path / "s"))), progress=False)
    student, _, state = load_student(result["checkpoint"])
    assert student.config.noise_per == "pyramid" and state["config"]["noise_per"] == "pyramid"
    assert student.config.image_shape == (3, 2, 1)
    from dmmd.apps.cli import main

    png = tmp_path / "student.png"
    assert main(["sample", "--checkpoint", result["checkpoint"], "--steps", "2", "--num", "4", "--png", str(png)]) == 0
    assert png.exists()
