"""``openood-diffguard ncis`` stages end to end on a tiny pixel UNet and a tiny image folder."""
import numpy as np
import pytest
import torch

from openood_diffguard.cli import main


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import DDPMScheduler
    from PIL import Image

    from openood_diffguard.training.diffusion import SCHEDULER, TINY_UNET, build_unet

    root = tmp_path_factory.mktemp("ncis_cli")
    torch.manual_seed(0)
    build_unet(TINY_UNET, 2).save_pretrained(root / "model" / "unet")
    DDPMScheduler(**SCHEDULER).save_pretrained(root / "model" / "scheduler")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    return root


def test_ncis_stages_end_to_end_and_resume(setup, capsys):
    work, model = setup / "work", setup / "model"
    common = ["--backend", "pixel", "--model", str(model)]
    assert main(["ncis", "embed", "--work", str(work), *common, "--image-folder", str(setup / "images"), "--copies", "2",
                 "--batch-images", "3"]) == 0
    emb = torch.load(work / "embeddings.pt", weights_only=False)
    assert emb["done"].all() and emb["embeddings"].shape == (8, 64) and emb["labels"].tolist() == [0] * 4 + [1] * 4
    assert main(["ncis", "embed", "--work", str(work), *common, "--image-folder", str(setup / "images"), "--copies", "2",
                 "--batch-images", "3"]) == 0  # finished: nothing to redo
    torch.testing.assert_close(torch.load(work / "embeddings.pt", weights_only=False)["embeddings"], emb["embeddings"])
    assert main(["ncis", "embed", "--work", str(work), *common, "--image-folder", str(setup / "images"),
                 "--copies", "3"]) == 2
    assert "other settings" in capsys.readouterr().err  # one error line, exit status 2
    assert main(["ncis", "fit", "--work", str(work), "--epochs", "2", "--batch-size", "4", "--layers", "1",
                 "--hidden-mult", "1"]) == 0
    assert "K = " in capsys.readouterr().out
    assert main(["ncis", "sample", "--work", str(work), "--reg", "1e-2", "--per-class", "3", "--candidates", "20",
                 "--keep", "2"]) == 0
    samples = torch.load(work / "samples.pt", weights_only=False)
    assert samples["embeddings"].shape == (6, 64) and samples["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    gen = ["ncis", "generate", "--work", str(work), *common, "--num-steps", "2", "--images-per-embedding", "2",
           "--batch-size", "5", "--guidance-scale", "2.0"]
    assert main(gen) == 0
    lines = (work / "outliers.txt").read_text().splitlines()
    assert len(lines) == 12 and all(line.endswith(" -1") for line in lines)
    first = (work / lines[0].split()[0]).read_bytes()
    assert main(gen) == 0 and (work / lines[0].split()[0]).read_bytes() == first
    import yaml

    oe = yaml.safe_load((work / "openood_oe.yml").read_text())["dataset"]
    assert oe["split_names"] == ["train", "oe", "val", "test"] and oe["oe"]["imglist_pth"].endswith("outliers.txt")
    from openood_diffguard.ncis import load_outlier_images

    assert load_outlier_images(work, 1).shape == (12, 1, 8, 8)


def test_ncis_stage_order_errors(tmp_path, capsys):
    for argv, message in [
        (["ncis", "fit", "--work", str(tmp_path)], "run `openood-diffguard ncis embed` first"),
        (["ncis", "train", "--work", str(tmp_path), "--", "--config", "a.yml"], "ncis generate` first"),
        (["ncis", "embed", "--work", str(tmp_path), "--backend", "sd", "--model", str(tmp_path), "--image-folder",
          str(tmp_path)], "--class-tokens"),
    ]:
        assert main(argv) == 2  # a user's mistake: one error line, exit status 2
        err = capsys.readouterr().err
        assert err.startswith("openood-diffguard ncis: error:") and message in err and err.count("\n") == 1
