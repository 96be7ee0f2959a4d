"""``openood-diffguard ncis <stage>``: one resumable command per NCIS stage, all sharing a work directory.

    embed     training images -> per-image conditioning embeddings        (embeddings.pt, resumed by batch)
    fit       K from per-class PCA, then the cVPN                          (cvpn.pt, resumed by epoch)
    sample    per-class Gaussians + lambda I, boundary samples, f^-1       (samples.pt)
    generate  outlier images + OpenOOD image list + dataset snippet        (images/, outliers.txt, openood_oe.yml)
    train     OpenOOD's train_oe pipeline with the NCIS trainer            (OpenOOD's results/)

Back-ends: ``--backend pixel --model DIR`` (this package's class-conditional pixel UNet, e.g. from
``train-diffusion``) or ``--backend sd --model DIR --class-tokens ...`` (a local diffusers copy of Stable
Diffusion v1.4; never downloaded).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..runtime.devices import add_device_argument
from .defaults import EMBED_DEFAULTS, FIT_DEFAULTS, GENERATE_DEFAULTS  # plain data: --help needs no torch

_EMBED_HELP = {"steps": "Adam steps per image", "lr": "Adam learning rate of the embeddings",
               "copies": "noisy copies of each image per step", "num_timesteps": "DDIM steps the timesteps come from",
               "batch_images": "images optimised together", "seed": "seed of the noise and timesteps"}
_FIT_HELP = {"epochs": "cVPN training epochs", "batch_size": "embeddings per step", "lr": "Adam learning rate",
             "hidden_mult": "width of the class embedding h(y), in multiples of ceil(D/2)", "seed": "seed of the weights"}
_GENERATE_HELP = {"guidance_scale": "classifier-free guidance scale", "num_steps": "DDIM sampling steps",
                  "images_per_embedding": "images generated per sampled embedding", "batch_size": "images per batch",
                  "save_size": "side of the saved images in pixels (default: the model's)",
                  "seed": "seed of the sampling noise (per image index, so resumed runs write the same images)"}


def _backend(args):
    from .backends import PixelUNetBackend, StableDiffusionBackend

    from ..runtime.devices import resolve_device

    device = str(resolve_device(args.device))
    if args.backend == "pixel":
        return PixelUNetBackend.from_pretrained(args.model, device=device)
    if not args.class_tokens:
        raise SystemExit("--backend sd needs --class-tokens (one word per class, comma-separated or a file)")
    words = args.class_tokens
    words = Path(words).read_text().split() if Path(words).is_file() else [w.strip() for w in words.split(",")]
    names = None
    if args.generate_names:
        g = args.generate_names
        names = Path(g).read_text().splitlines() if Path(g).is_file() else [w.strip() for w in g.split(",")]
    return StableDiffusionBackend.from_pretrained(args.model, words, device=device, generate_names=names)


def _backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("pixel", "sd"), required=True,
                   help="pixel: this package's class-conditional pixel UNet; sd: Stable Diffusion v1.4")
    p.add_argument("--model", required=True, help="local diffusers directory (pixel UNet, or SD v1.4 pipeline)")
    p.add_argument("--class-tokens", default=None, help="sd: class words, comma-separated or a file (first BPE "
                   "token carries the embedding; required with --backend sd, default: none)")
    p.add_argument("--generate-names", default=None, help="sd: class names in the generation prompt (default: the tokens)")
    add_device_argument(p)


def _save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _load(path: Path, stage: str):
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `openood-diffguard ncis {stage}` first")
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


class _Images:
    """Images of an (image, label) dataset, for ``learn_embeddings``."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds[i][0]


def run_embed(args) -> int:
    import torch

    from ..training.data import ImageFolderDataset, ImageListDataset
    from .backends import StableDiffusionBackend
    from .embed import learn_embeddings

    backend = _backend(args)
    size = backend.image_size if isinstance(backend, StableDiffusionBackend) else backend.unet.config.sample_size
    ch = 3 if isinstance(backend, StableDiffusionBackend) else backend.unet.config.in_channels
    ds = ImageListDataset(args.imglist, args.data_root, size, ch) if args.imglist else ImageFolderDataset(args.image_folder, size, ch)
    labels = torch.tensor([y for _, y in ds.items])
    cfg = {k: getattr(args, k) for k in EMBED_DEFAULTS}
    path = args.work / "embeddings.pt"
    state = {"embeddings": torch.full((len(ds), backend.dim), float("nan")), "labels": labels,
             "done": torch.zeros(len(ds), dtype=torch.bool), "config": cfg, "items": ds.items}
    if path.is_file():
        old = _load(path, "embed")
        if old["config"] != cfg or old["items"] != ds.items:
            raise SystemExit(f"{path} was made with other settings or images; use another --work directory")
        state = old

    def on_batch(idx, e, loss):
        state["embeddings"][idx] = e
        state["done"][idx] = True
        _save(state, path)

    learn_embeddings(backend, _Images(ds), labels, cfg, done=state["done"], on_batch=on_batch)
    print(f"{int(state['done'].sum())} / {len(ds)} images embedded -> {path}")
    return 0


def run_fit(args) -> int:
    import torch

    from .cvpn import fit_cvpn, num_invariants

    emb = _load(args.work / "embeddings.pt", "embed")
    if not bool(emb["done"].all()):
        raise SystemExit("embeddings.pt is incomplete: run `ncis embed` again to finish it")
    x, y = emb["embeddings"], emb["labels"]
    k = args.k or num_invariants(x, y, args.p, args.k_convention)
    cfg = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "num_layers": args.layers,
           "hidden_mult": args.hidden_mult, "seed": args.seed}
    path = args.work / "cvpn.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
    if saved is not None and "final" in saved and saved["state"]["config"] == {**FIT_DEFAULTS, **cfg}:
        print(f"cVPN already fitted (K = {saved['k']}) -> {path}")
        return 0
    resume = saved["state"] if saved is not None and saved["state"]["config"] == {**FIT_DEFAULTS, **cfg} else None
    model, info = fit_cvpn(x, y, k, cfg, state=resume, on_epoch=lambda st: _save({"state": st, "k": k}, path))
    _save({"state": info | {"config": info["config"]}, "final": model.state_dict(), "model_config": model.config,
           "k": k}, path)
    print(f"K = {k} of {x.shape[1]}; best invariant MSE {info['best_mse']:.4g} at epoch {info['best_epoch']} -> {path}")
    return 0


def run_sample(args) -> int:
    import torch

    from .cvpn import CVPN
    from .sampler import ClassGaussians

    emb = _load(args.work / "embeddings.pt", "embed")
    x, y = emb["embeddings"], emb["labels"]
    transform = None
    if not args.no_cvpn:
        saved = _load(args.work / "cvpn.pt", "fit")
        if "final" not in saved:
            raise SystemExit("cvpn.pt is unfinished: run `ncis fit` again")
        model = CVPN(**saved["model_config"])
        model.load_state_dict(saved["final"])
        model.eval()
        with torch.no_grad():
            x = model(x, y)
        transform = model.reverse
    gauss = ClassGaussians(args.reg).fit(x, y)
    e, lab = gauss.sample_boundary(args.per_class, args.candidates, args.keep, args.seed, transform=transform)
    _save({"embeddings": e, "labels": lab, "config": vars(args) | {"work": str(args.work)}}, args.work / "samples.pt")
    print(f"{len(e)} outlier embeddings ({'cVPN' if transform else 'no cVPN'}, lambda {args.reg:g}) -> {args.work / 'samples.pt'}")
    return 0


def run_generate(args) -> int:
    from .generate import generate_outliers, write_openood_files

    s = _load(args.work / "samples.pt", "sample")
    backend = _backend(args)
    cfg = {k: getattr(args, k) for k in GENERATE_DEFAULTS}
    generate_outliers(backend, s["embeddings"], s["labels"], cfg, out_dir=args.work)
    files = write_openood_files(args.work, len(s["labels"]) * args.images_per_embedding, args.oe_batch_size)
    print(f"image list {files['imglist']}; add {files['openood_yml']} after the dataset yml (see `ncis train`)")
    return 0


def run_train(args) -> int:
    from ..openood.main import main as launcher

    yml = args.work / "openood_oe.yml"
    if not yml.is_file():
        raise SystemExit(f"{yml} not found: run `openood-diffguard ncis generate` first")
    rest = list(args.openood_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if "--config" not in rest:
        raise SystemExit("give OpenOOD's configs: ncis train --work DIR -- --config <dataset>.yml <network>.yml "
                         "configs/pipelines/train/baseline.yml configs/preprocessors/base_preprocessor.yml [--key value]")
    i = rest.index("--config") + 1
    while i < len(rest) and not rest[i].startswith("--"):
        i += 1
    return launcher(rest[:i] + ["train_ncis", str(yml)] + rest[i:])


def add_arguments(p: argparse.ArgumentParser) -> None:
    parent_add = p.add_subparsers(dest="stage", required=True).add_parser

    def add_stage(name: str, help: str) -> argparse.ArgumentParser:  # the command line's formatter shows defaults
        return parent_add(name, help=help, description=help, formatter_class=p.formatter_class)


    e = add_stage("embed", "per-image conditioning embeddings (resumable)")
    _backend_args(e)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--imglist", help="OpenOOD image list of the ID training set (with --data-root)")
    src.add_argument("--image-folder", help="class-per-folder image directory")
    e.add_argument("--data-root", default=".",
                   help="folder the image list's paths are relative to (OpenOOD: data/images_classic)")
    for k, v in EMBED_DEFAULTS.items():
        e.add_argument("--" + k.replace("_", "-"), type=type(v), default=v, help=_EMBED_HELP[k])

    f = add_stage("fit", "number of invariants K and the cVPN (resumable)")
    f.add_argument("--p", type=float, default=2.0, help="PCA variance percentage for K (paper 2, released code 5)")
    f.add_argument("--k", type=int, default=None, help="K directly (default: from the PCA rule, --p)")
    f.add_argument("--k-convention", choices=("paper", "code"), default="paper",
                   help="K rule: the paper's, or the released code's (one direction more)")
    f.add_argument("--layers", type=int, default=FIT_DEFAULTS["num_layers"], help="coupling layers of the cVPN")
    for k in ("epochs", "batch_size", "lr", "hidden_mult", "seed"):
        f.add_argument("--" + k.replace("_", "-"), type=type(FIT_DEFAULTS[k]), default=FIT_DEFAULTS[k], help=_FIT_HELP[k])

    s = add_stage("sample", "low-likelihood samples of per-class Gaussians, mapped back with the cVPN")
    s.add_argument("--reg", type=float, default=1e-5, help="lambda added to each covariance (released: 1e-5)")
    s.add_argument("--per-class", type=int, default=100, help="outlier embeddings per class")
    s.add_argument("--candidates", type=int, default=3330, help="draws per round, of which --keep are kept")
    s.add_argument("--keep", type=int, default=10, help="least likely draws kept per round")
    s.add_argument("--seed", type=int, default=0, help="seed of the draws")
    s.add_argument("--no-cvpn", action="store_true", help="Gaussians in the embedding space itself (ablation)")

    g = add_stage("generate", "outlier images, OpenOOD image list and dataset snippet (resumable)")
    _backend_args(g)
    for k, v in GENERATE_DEFAULTS.items():
        g.add_argument("--" + k.replace("_", "-"), type=int if k == "save_size" else type(v), default=v,
                       help=_GENERATE_HELP[k])
    g.add_argument("--oe-batch-size", type=int, default=128, help="outlier batch size in openood_oe.yml")

    t = add_stage("train", "OpenOOD train_oe pipeline with the NCIS trainer; OpenOOD arguments after --")
    t.add_argument("openood_args", nargs=argparse.REMAINDER, help="-- --config <dataset>.yml ... [--key value ...]")

    for q in (e, f, s, g, t):
        q.add_argument("--work", type=Path, required=True, help="NCIS work directory (shared by all stages)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "device", None) is not None:
        from ..runtime.devices import resolve_device

        resolve_device(args.device)  # an unavailable device fails before the work directory is touched
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / f"{args.stage}_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()
                                                                   if not k.startswith("_")}, indent=1))
    return {"embed": run_embed, "fit": run_fit, "sample": run_sample, "generate": run_generate, "train": run_train}[args.stage](args)
