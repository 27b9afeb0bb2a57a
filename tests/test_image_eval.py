"""FID on digits end to end: the feature classifier (`dmmd reference train --data digits`), the
image evaluation (`dmmd evaluate --data digits`: FID rows, grids, plot) and the image study's
tables, grids and plot on a tiny run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dmmd.apps.cli import main
from dmmd.data import DataConfig, make_source
from dmmd.models.image_classifier import load_classifier
from dmmd.training.classifier import shift_images

pytest.importorskip("sklearn")
pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    assert main(["reference", "train", "--data", "digits", "--out", str(out), "--no-progress"]) == 0
    return str(out / "model")


def test_digits_classifier_reaches_97_percent_held_out(classifier):
    with open(os.path.join(classifier, "dmmd_classifier.json")) as f:
        meta = json.load(f)
    assert meta["val_accuracy"] >= 0.97 and meta["val_images"] == 180
    assert meta["config"]["run"]["batch_size"] == 64  # the classifier's own defaults, not the LM's
    model = load_classifier(classifier)
    source = make_source(DataConfig(data="digits"))
    pred = model(source.val).argmax(-1)
    assert float((pred == source.labels["val"]).double().mean()) == pytest.approx(meta["val_accuracy"])
    assert model.features(source.val[:5]).shape == (5, 128)


def test_classifier_needs_labelled_images(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((10, 4, 4, 1), np.uint8))
    assert main(["reference", "train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "x.npy" in err and "labelled images" in err and "\n" not in err.strip()


def test_shift_images_moves_each_picture_by_at_most_one_pixel():
    img = torch.zeros(1, 5, 5, 1, dtype=torch.long)
    img[0, 2, 2, 0] = 7
    seen = set()
    for s in range(40):
        out = shift_images(img.reshape(1, -1).repeat(3, 1), (5, 5, 1), torch.Generator().manual_seed(s))
        for row in out.reshape(3, 5, 5):
            (y, x), = torch.nonzero(row == 7).tolist()
            seen.add((y - 2, x - 2))
            assert int((row != 0).sum()) == 1
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_length_zero_takes_the_datas_own():
    assert make_source(cfg := DataConfig(data="digits")).length == 64 and cfg.length == 64
    assert make_source(cfg := DataConfig(data="grids", grid_size=5)).length == 25 and cfg.length == 25
    assert make_source(cfg := DataConfig(data="text")).length == 128 and cfg.length == 128
    with pytest.raises(ValueError, match="length must be >= 1"):
        make_source(DataConfig(data="text", length=-1))


def test_evaluate_digits_gives_fid_rows_grids_and_a_plot(classifier, tmp_path, capsys):
    source = make_source(DataConfig(data="digits"))
    g = torch.Generator().manual_seed(0)
    sets = {"real.json": (source.val, 8),  # the held-out digits themselves: near the floor
            "noise.json": (torch.randint(0, 17, (180, 64), generator=g), 1)}  # uniform pixel noise: far
    for name, (x, steps) in sets.items():
        with open(tmp_path / name, "w") as f:
            json.dump({"steps": steps, "tokens": x.tolist()}, f)
    out = tmp_path / "ev" / "res.json"
    os.makedirs(out.parent)
    assert main(["evaluate", "--data", "digits", "--samples", str(tmp_path / "real.json"),
                 str(tmp_path / "noise.json"), "--reference", classifier, "--out", str(out)]) == 0
    rows = {os.path.basename(r["name"]): r for r in json.loads(out.read_text())}
    assert rows["real.json"]["fid"] == pytest.approx(rows["data (held out)"]["fid"])  # the same images
    assert rows["noise.json"]["fid"] > 20 * rows["real.json"]["fid"]
    assert rows["real.json"]["steps"] == 8 and rows["real.json"]["fid_stderr"] > 0
    assert sorted(os.listdir(tmp_path / "ev" / "res")) == ["data__held_out_.png", "fid_by_steps.png", "noise.png",
                                                          "real.png"]
    assert (tmp_path / "ev" / "res.md").exists()
    # --out without an extension: the figures go to a folder beside it, not over it
    assert main(["evaluate", "--data", "digits", "--samples", str(tmp_path / "real.json"), "--reference", classifier,
                 "--out", str(tmp_path / "ev" / "plain")]) == 0
    assert (tmp_path / "ev" / "plain").is_file() and (tmp_path / "ev" / "plain_figures" / "real.png").exists()
    # a sample file with a mask id left over (17 on 17-level digits) is refused, named
    with open(tmp_path / "masked.json", "w") as f:
        json.dump({"steps": 1, "tokens": torch.full((4, 64), 17).tolist()}, f)
    capsys.readouterr()
    assert main(["evaluate", "--data", "digits", "--samples", str(tmp_path / "masked.json"),
                 "--reference", classifier]) == 2
    assert "masked.json" in capsys.readouterr().err


def test_image_study_writes_tables_grids_and_plot(classifier, tmp_path):
    from dmmd.apps.image_study import ImageStudyConfig, classifier_config, distill_config, run_image_study

    cfg = ImageStudyConfig(out=str(tmp_path / "study"), ks=(2,), teacher_grid=(1, 2), noise_ks=(2,),
                           temperatures=(0.9,), temperature_k=2, samples=64, teacher_steps=4, distill_steps=2,
                           distill_batch=8, teacher_batch=8, teacher_width=16, teacher_depth=1)
    stage = classifier_config(cfg).run.out  # out/classifier-<hash of its settings>
    os.makedirs(stage)
    os.symlink(classifier, os.path.join(stage, "model"))  # not retrained: reused as is
    res = run_image_study(cfg, progress=False, log=lambda *a: None)
    assert sorted(res["teacher"]["masked"]) == [1, 2] and sorted(res["student"]["uniform"]) == [2]
    assert list(res["no_noise"]) == [2] and sorted(res["temperature"]) == [0.9, 1.0]
    table = (tmp_path / "study" / "table.md").read_text()
    assert "| masked D-MMD student |" in table and "no noise input" in table and "| 0.9 |" in table
    grids = sorted(os.listdir(tmp_path / "study" / "grids"))
    assert "teacher_uniform_2.png" in grids and "student_masked_k2_no_noise.png" in grids and len(grids) == 11
    assert "data.png" in grids and "side_by_side_masked_k2.png" in grids
    assert (tmp_path / "study" / "fid_by_steps.png").exists()
    no_noise = distill_config(cfg, "masked", "student_masked_k2_no_noise", 2, {"noise_dim": 0}).run.out
    assert os.path.basename(no_noise).startswith("student_masked_k2_no_noise-")
    with open(os.path.join(no_noise, "checkpoint", "state.json")) as f:
        assert json.load(f)["state"]["config"]["noise_dim"] == 0


def test_image_study_students_over_seeds(classifier, tmp_path):
    from dmmd.apps.image_study import ImageStudyConfig, classifier_config, distill_config, run_image_study

    cfg = ImageStudyConfig(out=str(tmp_path / "study"), processes=("uniform",), parts=("main",), ks=(2,),
                           teacher_grid=(2, 8), student_seeds=(0, 5), samples=64, teacher_steps=4,
                           distill_steps=2, distill_batch=8, teacher_batch=8, teacher_width=16, teacher_depth=1)
    stage = classifier_config(cfg).run.out
    os.makedirs(stage)
    os.symlink(classifier, os.path.join(stage, "model"))
    res = run_image_study(cfg, progress=False, log=lambda *a: None)
    row = res["seeds"]["uniform 2"]
    assert row["student_k"]["n"] == 2 and len(row["fids"]) == 2
    assert row["fids"][0] == res["student"]["uniform"][2]["fid"]  # the study's own seed is the plain student
    assert row["teacher_4k"]["mean"] == res["teacher"]["uniform"][8]["fid"]
    assert row["verdict_4k"] in ("reaches", "short") and row["verdict_k"] in ("reaches", "short")
    assert row["vs_teacher_4k"] == row["student_k"]["mean"] / row["teacher_4k"]["mean"]
    other = distill_config(cfg, "uniform", "student_uniform_k2_seed5", 2, {"seed": 5}).run.out
    with open(os.path.join(other, "checkpoint", "state.json")) as f:
        assert json.load(f)["state"]["config"]["run"]["seed"] == 5
    assert "| uniform | 2 |" in (tmp_path / "study" / "table.md").read_text()
    with pytest.raises(ValueError, match="student_seeds"):
        ImageStudyConfig(student_seeds=(1, 1)).validate()
