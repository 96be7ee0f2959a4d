"""``openood-diffguard report``: gallery choice and storage, the three run-folder readers, the metrics the
page shows (against ``metrics.ood_metrics`` and the files' own tables), a self-contained page, the CLI."""
import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from openood_diffguard.cli import main
from openood_diffguard.metrics import ood_metrics
from openood_diffguard.report import gallery as G
from openood_diffguard.report.page import render, write_report
from openood_diffguard.report.runs import Method, Split, load_run

from ood_toys import ToyDetector, batches, tiny_net


# ---------------------------------------------------------------------------------------- gallery choice
def test_select_known_answer_ties_by_key_and_nan_never_chosen():
    conf = np.array([0.5, 0.9, 0.9, np.nan, 0.1, 0.1, 0.7])
    keys = ["e", "d", "b", "z", "c", "a", "f"]
    got = G.select(conf, keys, k=2)
    assert [keys[i] for i in got["high"]] == ["b", "d"]  # 0.9 twice: key order
    assert [keys[i] for i in got["low"]] == ["a", "c"]
    assert 3 not in np.concatenate(list(got.values()))  # NaN (never scored) is never shown
    assert len(got["sample"]) == 4


def test_select_is_order_invariant():
    rng = np.random.default_rng(0)
    conf = np.round(rng.normal(size=300), 1)  # many ties
    keys = [f"s::{i:04d}.png" for i in range(300)]
    ref = {r: sorted(keys[i] for i in idx) for r, idx in G.select(conf, keys, 5).items()}
    perm = rng.permutation(300)
    got = G.select(conf[perm], [keys[i] for i in perm], 5)
    assert {r: sorted(keys[perm[i]] for i in idx) for r, idx in got.items()} == ref


def test_key_hash_is_stable():
    h = G.key_hash(["a", "b", "a"])
    assert h[0] == h[2] != h[1]
    assert G.key_hash(["a"], seed=1)[0] != h[0]
    # a fixed value: the draw must not change between releases / processes
    assert int(G.key_hash(["digits/7/0001.png"])[0]) == int.from_bytes(
        __import__("hashlib").blake2b(b"digits/7/0001.png", digest_size=8, key=b"0").digest(), "little")


def test_threshold_is_the_papers_fpr95_operating_point():
    rng = np.random.default_rng(1)
    id_conf, ood_conf = np.round(rng.normal(1, 1, 401), 1), np.round(rng.normal(-1, 1, 333), 1)
    m = Method("m", {"id": Split(id_conf, np.zeros(401))}, {"ood": Split(ood_conf, -np.ones(333))})
    thr = m.threshold()
    met = ood_metrics(np.r_[id_conf, ood_conf], np.r_[np.zeros(401), -np.ones(333)])
    assert np.mean(id_conf >= thr) >= 0.95
    assert np.mean(ood_conf >= thr) == pytest.approx(met.fpr95_id_positive)
    # known answer without ties: of 0..99, the values 5..99 are 95 % of them
    assert Method("m", {"id": Split(np.arange(100.0)[::-1], np.zeros(100))}, {}).threshold() == 5.0


def test_to_uint8_ranges_and_shrinking():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    assert G.to_uint8(x).reshape(-1).tolist() == [0, 128, 255, 255]
    big = torch.zeros(2, 4, 300, 150)  # latent-like: 4 channels -> first 3; longest side -> 128
    assert G.to_uint8(big, size=128, scale="minmax").shape == (2, 128, 64, 3)


# ---------------------------------------------------------------------------------------- gallery collection
class PictureToy(ToyDetector):
    """Toy with DiffGuard's ``synthesise`` surface: the 'synthesis' is the negated input (easy to check)."""

    def __init__(self, **params):
        super().__init__(**params)
        self.synthesised = 0

    def synthesise(self, net, images, labels=None):
        self.synthesised += images.shape[0]
        return {"latents": images * 2, "synthesis": (-images).clamp(-1, 1), "reference": None}


def _scored(det, net, loader):
    from openood_diffguard.runtime.cache import cached_statistics

    out = cached_statistics(det, net, loader, progress=False)
    conf = det.confidence({k: torch.as_tensor(v) for k, v in out.stats.items()}).numpy()
    return out, conf


def test_collect_pictures_roles_image_cache_and_roundtrip(tmp_path):
    net, det = tiny_net(), PictureToy(normalization="none")
    loader = batches(n=40, bs=7)
    out, conf = _scored(det, net, loader)
    keys = G.loader_keys(loader)
    cache = G.image_cache_for(det, net, tmp_path / "cache", 64)
    src = keys[0].split("::")[0]
    from openood_diffguard.runtime.cache import sample_keys

    kw = dict(keys=keys, stats=out.stats, conf=conf, labels=out.labels, method="toy", split="id_test", role="id",
              k=3, image_size=64, image_cache=cache, key_of=lambda b: sample_keys(b, src))
    g = G.collect(det, net, loader, **kw)
    assert det.synthesised == len(g) <= 12 and g.meta["recomputed"] == len(g)
    assert set(g.images) == {"input", "inversion", "synthesis"}
    order = np.argsort(-conf, kind="stable")
    assert g.positions[g.picked("high")][0] == order[0] and g.conf[g.picked("high")[0]] == conf.max()
    assert g.conf[g.picked("low")[0]] == conf.min()
    # the pictures are those of the chosen samples: input in [0, 1] -> synthesis = 1 - input (normalization 0.5/0.5)
    x = torch.cat([b["data"] for b in loader])[torch.as_tensor(g.positions)]
    np.testing.assert_array_equal(g.images["input"], G.to_uint8(x * 0.5 + 0.5, 0, 1))
    np.testing.assert_array_equal(g.images["synthesis"], G.to_uint8((-x).clamp(-1, 1)))
    # a second collection (e.g. main.py's second ID-test pass) takes every picture from the image cache
    g2 = G.collect(det, net, loader, **kw)
    assert det.synthesised == len(g) and g2.meta["recomputed"] == 0
    for name in g.images:
        np.testing.assert_array_equal(g.images[name], g2.images[name])
    back = G.Gallery.load(g.save(tmp_path / "g" / "toy" / "id_test.npz"))
    assert back.method == "toy" and back.meta["k"] == 3
    for r in G.ROLES:
        np.testing.assert_array_equal(back.picked(r), g.picked(r))
    np.testing.assert_array_equal(back.images["inversion"], g.images["inversion"])


class CapturingToy(ToyDetector):
    """Toy with DiffNB's gallery hook: ``statistics(..., keep_images=True)`` -> (stats, pictures)."""

    captures_images = True
    gallery_kinds = {"neighbour": "the toy's neighbour"}

    def statistics(self, net, images, labels=None, keep_images=False):
        stats = super().statistics(net, images, labels)
        return (stats, {"neighbour": images.flip(-1)}) if keep_images else stats


def test_collect_uses_a_detectors_own_pictures(tmp_path):
    net, det = tiny_net(), CapturingToy(normalization="none")
    loader = batches(n=20, bs=6)
    out, conf = _scored(det, net, loader)
    path = G.save_gallery(det, net, loader, stats=out.stats, conf=conf, labels=out.labels, folder=tmp_path,
                          method="toy", split="ood_test", role="ood", k=2)
    g = G.Gallery.load(path)
    assert set(g.images) == {"input", "neighbour"} and g.meta["image_kinds"]["neighbour"] == "the toy's neighbour"
    x = torch.cat([b["data"] for b in loader])[torch.as_tensor(g.positions)]
    np.testing.assert_array_equal(g.images["neighbour"], G.to_uint8(x.flip(-1)))
    assert g.stats.keys() == {"maxlogit"}  # scalar statistics only (no logits vectors, no pred)


def test_fetch_inputs_indexing_and_loader_pass_agree():
    from torch.utils.data import DataLoader

    from openood_diffguard.runtime.cache import loader_source, sample_keys
    from openood_diffguard.data import DigitsOpenSet

    ds = DigitsOpenSet(size=8).dataset("id", "test")
    loader = DataLoader(ds, batch_size=32)
    keys = G.loader_keys(loader)
    pos = np.array([40, 3, 17])
    src = loader_source(loader)
    x1, y1 = G.fetch_inputs(loader, pos, [keys[i] for i in pos], lambda b: sample_keys(b, src))
    x2, y2 = G.fetch_inputs(list(loader), pos, [keys[i] for i in pos], lambda b: sample_keys(b, src))  # no dataset
    torch.testing.assert_close(x1, ds.images[torch.as_tensor(pos)])
    torch.testing.assert_close(x1, x2)
    assert y1.tolist() == y2.tolist() == ds.labels[torch.as_tensor(pos)].tolist()
    with pytest.raises(KeyError, match="not found"):
        G.fetch_inputs(list(loader), pos, ["nope"] * 3, lambda b: sample_keys(b, src))


# ---------------------------------------------------------------------------------------- run folders
def _fake_scores(rng, n_id=60, n_ood=50, shift=1.5):
    return (rng.normal(shift, 1, n_id), rng.integers(0, 6, n_id), rng.integers(0, 6, n_id)), rng.normal(0, 1, n_ood)


def make_demo_dir(root: Path, with_gallery: bool = True) -> Path:
    """A demo output folder written the way ``demo.run`` writes it (scores/<method>.npz, metrics.csv,
    summary.json)."""
    from openood_diffguard.demo.run import DemoConfig, score_file_stem
    from openood_diffguard.fusion.scores_io import save_scores_npz
    from openood_diffguard.metrics import METRIC_COLUMNS, table_row

    rng = np.random.default_rng(0)
    (root / "scores").mkdir(parents=True, exist_ok=True)
    arrays, rows, auroc = {}, [], {}
    for i, name in enumerate(["EBO", "DiffGuard"]):
        (cid, lab, pred), cood = _fake_scores(rng, shift=1 + i)
        pood = rng.integers(0, 6, cood.size)
        conf, label, p = np.r_[cid, cood], np.r_[lab, -np.ones(cood.size, int)], np.r_[pred, pood]
        arrays.update({f"{name}/pred": p, f"{name}/conf": conf, f"{name}/label": label})
        save_scores_npz(root / "scores" / f"{score_file_stem(name)}.npz",
                        {"id_test": {"conf": cid, "label": lab, "pred": pred},
                         "near/digits_6_9": {"conf": cood, "label": -np.ones(cood.size, int), "pred": pood}})
        m = ood_metrics(conf, label, p)
        auroc[name] = m.auroc
        rows.append([name, *(f"{v:.2f}" for v in table_row(m))])
    with open(root / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", *METRIC_COLUMNS])
        w.writerows(rows)
    from dataclasses import asdict

    (root / "summary.json").write_text(json.dumps({"config": asdict(DemoConfig()), "classifier_accuracy": 0.9876,
                                                   "seconds": 12.5, "timings_s": {"classifier": 2.0, "DiffGuard": 9.0},
                                                   "n_id": 60, "n_ood": 50, "auroc": auroc}))
    if with_gallery:
        net, det = tiny_net(), PictureToy(normalization="none")
        for split, role, n in (("id_test", "id", 60), ("ood_test", "ood", 50)):
            lab = arrays["DiffGuard/label"]
            sel = lab >= 0 if role == "id" else lab < 0
            loader = batches(n=n, bs=16, prefix=split)
            out, _ = _scored(det, net, loader)
            G.save_gallery(det, net, loader, stats=out.stats, conf=arrays["DiffGuard/conf"][sel],
                           labels=lab[sel], folder=root / "gallery", method="DiffGuard", split=split, role=role, k=3)
    return root


def demo_scores(root: Path) -> dict[str, np.ndarray]:
    """``<method>/{conf,label,pred}`` over ID then OOD test, read back from the demo folder's score files."""
    from openood_diffguard.fusion.scores_io import load_npz

    out = {}
    for name in ("EBO", "DiffGuard"):
        splits = load_npz(root / "scores" / f"{name}.npz")
        for f in ("conf", "label", "pred"):
            out[f"{name}/{f}"] = np.concatenate([splits[k][f] for k in ("id_test", "near/digits_6_9")])
    return out


def test_demo_folder_metrics_equal_ood_metrics_and_csv(tmp_path):
    run = load_run(make_demo_dir(tmp_path / "demo"))
    assert run.kind == "demo" and list(run.methods) == ["EBO", "DiffGuard"]
    z = demo_scores(tmp_path / "demo")
    for name, m in run.methods.items():
        (ds, got), = m.metrics().items()
        assert got == ood_metrics(z[f"{name}/conf"], z[f"{name}/label"], z[f"{name}/pred"])
    assert any("metrics.csv equals" in c for c in run.checks)
    assert run.classifier_accuracy == pytest.approx(0.9876)
    assert set(run.methods["DiffGuard"].galleries) == {"id_test", "ood_test"}


def test_demo_folder_with_foreign_csv_is_refused(tmp_path):
    root = make_demo_dir(tmp_path / "demo", with_gallery=False)
    text = (root / "metrics.csv").read_text().splitlines()
    parts = text[1].split(",")
    parts[1] = f"{float(parts[1]) - 1:.2f}"  # AUROC off by one point: another run's csv
    (root / "metrics.csv").write_text("\n".join([text[0], ",".join(parts), *text[2:]]) + "\n")
    with pytest.raises(ValueError, match="different runs"):
        load_run(root)


def make_openood_dir(root: Path, n_id=40, sets=(("nearood", ["cifar100", "tin"]), ("farood", ["mnist", "svhn"])),
                     csv_ok=True) -> Path:
    """An OpenOOD main.py output directory (ood.csv, scores/*.npz, config.yml with OpenOOD's python tag)."""
    rng = np.random.default_rng(3)
    (root / "scores").mkdir(parents=True)
    id_conf = rng.normal(1, 1, n_id)
    id_label, id_pred = rng.integers(0, 10, n_id), rng.integers(0, 10, n_id)
    np.savez(root / "scores" / "cifar10.npz", pred=id_pred, conf=id_conf, label=id_label)
    rows, cfg_ood = [], {"name": "cifar10_ood", "split_names": ["val", *(g for g, _ in sets)]}
    for group, names in sets:
        means = []
        for j, name in enumerate(names):
            conf = rng.normal(-0.5 * j, 1, 30)
            pred = rng.integers(0, 10, 30)
            np.savez(root / "scores" / f"{name}.npz", pred=pred, conf=conf, label=-np.ones(30, int))
            m = ood_metrics(np.r_[id_conf, conf], np.r_[id_label, -np.ones(30, int)], np.r_[id_pred, pred])
            means.append(m.as_openood())
            rows.append([name, *m.as_openood()])
        rows.append([group, *np.mean(means, axis=0)])
        cfg_ood[group] = {"datasets": list(names), **{n: {"imglist_pth": f"./data/test_{n}.txt"} for n in names}}
    with open(root / "ood.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"])
        for r in rows:
            w.writerow([r[0], *(f"{100 * v + (0 if csv_ok else 0.5):.2f}" for v in r[1:])])
    cfg = {"dataset": {"name": "cifar10", "test": {"imglist_pth": "./data/test_cifar10.txt"}}, "ood_dataset": cfg_ood,
           "postprocessor": {"name": "diffguard", "postprocessor_args": {"num_steps": 4}}, "exp_name": "x",
           "evaluator": {"name": "ood", "ood_scheme": "ood"}}
    text = yaml.dump(cfg, sort_keys=False)
    text = "!!python/object/new:openood.utils.config.Config\nstate:\n" + "".join(f"  {l}\n" for l in text.splitlines())
    (root / "config.yml").write_text(text)
    (root / "log.txt").write_text("...\nAccuracy 91.25%\n...\nTime used for eval_ood: 42s\nCompleted!\n")
    return root


def test_openood_folder_metrics_groups_and_csv_check(tmp_path):
    root = make_openood_dir(tmp_path / "results" / "exp" / "s0" / "ood")
    run = load_run(tmp_path / "results")  # found by searching below the given folder
    assert run.kind == "openood" and run.folder == root and list(run.methods) == ["diffguard"]
    m = run.methods["diffguard"]
    rows = m.metrics()
    assert list(rows) == ["cifar100", "tin", "mnist", "svhn", "nearood", "farood"]
    assert rows["nearood"].auroc == pytest.approx((rows["cifar100"].auroc + rows["tin"].auroc) / 2)
    assert run.classifier_accuracy == pytest.approx(0.9125) and run.timings == {"eval_ood (OpenOOD log)": 42.0}
    assert any("ood.csv equals" in c for c in run.checks)
    assert run.class_name(3) == "3 cat" and run.class_name(-1) == "OOD"


def test_openood_folder_mismatched_csv_and_missing_scores(tmp_path):
    with pytest.raises(ValueError, match="different runs"):
        load_run(make_openood_dir(tmp_path / "a", csv_ok=False))
    root = make_openood_dir(tmp_path / "b")
    for p in (root / "scores").glob("*.npz"):
        p.unlink()
    (root / "scores").rmdir()
    run = load_run(root)
    assert not run.methods and run.tables and "save_scores" in run.notes[0]
    assert "FPR@95" in render(run)
    with pytest.raises(ValueError, match="2 OpenOOD result folders"):
        make_openood_dir(tmp_path / "many" / "x")
        make_openood_dir(tmp_path / "many" / "y")
        load_run(tmp_path / "many")


def test_score_files_and_fuse_json(tmp_path, capsys):
    """A folder with fuse's inputs and the JSON that ``openood-diffguard fuse --json`` wrote from them."""
    from openood_diffguard.fusion.scores_io import save_scores_npz

    rng = np.random.default_rng(5)
    folder = tmp_path / "fuse"
    folder.mkdir()
    sizes = {"id_val": 40, "id_test": 50, "near/cifar100": 40, "far/svhn": 30}
    labels = {s: rng.integers(0, 10, n) if s.startswith("id") else -np.ones(n, int) for s, n in sizes.items()}
    for name, shift in (("ebo", 1.0), ("diffguard", 1.5)):
        save_scores_npz(folder / f"{name}.npz", {
            s: {"conf": rng.normal(shift if s.startswith("id") else 0, 1, n), "label": labels[s],
                "key": np.array([f"{s}/{i}" for i in range(n)])} for s, n in sizes.items()})
    assert main(["fuse", "--scores", str(folder / "ebo.npz"), str(folder / "diffguard.npz"), "--rule", "cascade",
                 "--json", str(folder / "fused.json")]) == 0
    capsys.readouterr()
    fused = json.loads((folder / "fused.json").read_text())
    run = load_run(folder)
    assert run.kind == "scores" and set(run.methods) == {"ebo", "diffguard"}
    assert run.methods["ebo"].groups == {"nearood": ["near/cifar100"], "farood": ["far/svhn"]}
    (table,) = run.tables
    row = next(r for r in fused["rows"] if r["score"] == "fused" and r["dataset"] == "far/svhn")
    assert ["far/svhn", "fused", row["FPR@95_OpenOOD"], row["FPR@95_IDpos"], row["AUROC"]] == next(
        r for r in table.rows if r[:2] == ["far/svhn", "fused"])[:5]
    page = render(run)
    assert "cascade" in page and f"{100 * row['AUROC']:.2f}" in page
    assert f"{100 * fused['routed_id_test']:.1f} % of ID test routed" in page
    # the component rows of the fuse table equal the report's own metrics of the score files
    ours = run.methods["diffguard"].metrics()["far/svhn"]
    comp = next(r for r in fused["rows"] if r["score"] == "diffguard" and r["dataset"] == "far/svhn")
    assert comp["AUROC"] == pytest.approx(ours.auroc) and comp["FPR@95_IDpos"] == pytest.approx(ours.fpr95_id_positive)


# ---------------------------------------------------------------------------------------- the page
def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_page_is_self_contained_and_complete(tmp_path):
    from PIL import Image

    root = make_demo_dir(tmp_path / "demo")
    path = write_report(root, generated="2026-11-30")
    page = path.read_text()
    assert path == root / "report.html"
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing but inline images and in-page links
    assert not re.search(r"url\(|@import|https?://", page)
    srcs = _images(page)
    # 1 curves figure + 1 histogram figure + 3 pictures x 12 gallery cards at most
    assert len(srcs) >= 2 + 3 * 4
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        Image.open(__import__("io").BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    for text in ("FPR@95 (OOD+, OpenOOD v1.5)", "FPR@95 (ID+, papers)", "AUROC", "Classifier accuracy",
                 "98.76 %", "OOD scored as ID", "ID scored as OOD", "typical correct ID", "typical correct OOD",
                 "classifier_epochs", "2026-11-30"):
        assert text in page, text
    # both methods' rows, with the metric values of scores.npz
    z = demo_scores(root)
    m = ood_metrics(z["DiffGuard/conf"], z["DiffGuard/label"], z["DiffGuard/pred"])
    assert f"{100 * m.fpr95_id_positive:.2f}" in page and f"{100 * m.fpr95_ood_positive:.2f}" in page


def test_page_escapes_names(tmp_path):
    root = make_demo_dir(tmp_path / "demo", with_gallery=False)
    from openood_diffguard.demo.run import score_file_stem

    summary = json.loads((root / "summary.json").read_text())
    summary["auroc"] = {k.replace("EBO", "<b>EBO</b>"): v for k, v in summary["auroc"].items()}
    (root / "summary.json").write_text(json.dumps(summary))
    (root / "scores" / "EBO.npz").rename(root / "scores" / f"{score_file_stem('<b>EBO</b>')}.npz")
    (root / "metrics.csv").unlink()
    page = render(load_run(root))
    assert "&lt;b&gt;EBO&lt;/b&gt;" in page and "<b>EBO</b>" not in page


# ---------------------------------------------------------------------------------------- command line
def test_cli_report_and_clear_errors(tmp_path, capsys):
    root = make_demo_dir(tmp_path / "demo", with_gallery=False)
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(root), "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a run folder" in capsys.readouterr().err
