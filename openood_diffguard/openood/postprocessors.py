"""OpenOOD postprocessors around our detectors (subclasses of OpenOOD's real ``BasePostprocessor``).

Importing this module imports OpenOOD (ImportError with the install command if it is missing).

yml (``configs/postprocessors/<name>.yml``)::

    postprocessor:
      name: diffnb
      APS_mode: False
      postprocessor_args:      # detector parameters, plus the wrapper's own keys below
        timesteps: [300]
        cache_dir: null        # null: $OPENOOD_DIFFGUARD_CACHE or ~/.cache/openood_diffguard
      postprocessor_sweep:     # <param>_list, values tried by APS in key order (cheap params re-score the cache)
        aggregate_list: [mean, max]

Wrapper keys in ``postprocessor_args``: ``detector`` (registered detector name; default: the class's,
else ``postprocessor.name``), ``cache_dir``, ``cache`` (False: keep scores in memory only), ``gallery``
(samples per kind kept for ``openood-diffguard report``, written to ``<output_dir>/gallery/`` next to
main.py's score files; 0 = none).
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from . import require_openood

require_openood()
from openood.postprocessors import BasePostprocessor  # noqa: E402
from openood.utils import Config  # noqa: E402

from ..fusion.baselines import BASELINE_ARGS  # noqa: E402
from ..runtime.cache import ScoreCache, atomic_write, default_cache_root, module_fingerprint  # noqa: E402
from . import inference as shared  # noqa: E402  (the OpenOOD-free scoring path the demo uses too)
from .sections import (aps_flag, detector_from_section, fusion_detector_section, section,  # noqa: E402
                       split_wrapper_args, sweep_parameters)
from ..report.gallery import DEFAULT_K, openood_output_dir, openood_split, save_gallery  # noqa: E402


def _gallery_size(value: Any) -> int:
    from ..detectors.base import ParameterError

    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(f"postprocessor_args.gallery must be a non-negative integer (samples per kind kept for "
                         f"the report; 0 = none), got {value!r}")
    return value


class DetectorPostprocessor(BasePostprocessor):
    """Any registered ``Detector`` as an OpenOOD postprocessor, with the per-sample score cache."""

    #: registered detector name (None: ``postprocessor_args.detector`` or ``postprocessor.name``)
    detector_name: ClassVar[str | None] = None

    def __init__(self, config: Any, detector: Any = None) -> None:
        super().__init__(config)
        pp = section(config, "postprocessor")
        if detector is None:
            detector, wrapper = detector_from_section(pp, section(config, "dataset"), self.detector_name)
        else:
            wrapper = split_wrapper_args(pp)[0]
        self.detector = detector
        self.cache_dir = wrapper.get("cache_dir")
        self.use_disk_cache = wrapper.get("cache", True)  # parsed strictly: "false" is false
        self.gallery_k = _gallery_size(wrapper.get("gallery", DEFAULT_K))
        self.args_dict = dict(pp.get("postprocessor_sweep") or {})
        self._sweep = sweep_parameters(self.args_dict, self.detector.params, type(self).__name__)
        expensive = [p for p in self._sweep if p not in self.detector.cheap_params]
        if expensive:
            warnings.warn(f"{type(self).__name__}: sweeping expensive parameter(s) {expensive}: every grid point "
                          "re-runs the detector (cached separately); only cheap parameters "
                          f"{list(self.detector.cheap_params)} re-score cached statistics")
        # the Evaluator's by-name factory sets these, main.py and passed objects do not (AttributeError)
        self.APS_mode = aps_flag(pp, self.args_dict, type(self).__name__)
        self.hyperparam_search_done = False
        self.setup_flag = False
        self._transient()

    def _transient(self) -> None:
        self._stores: dict[str, ScoreCache] = {}
        self._setup_for: int | None = None

    # ------------------------------------------------------------------ OpenOOD hooks
    def setup(self, net: torch.nn.Module, id_loader_dict: Any, ood_loader_dict: Any) -> None:
        if self._setup_for == id(net):
            return
        net.eval()  # neither OpenOOD path calls eval() before setup
        self.detector.setup(net, id_loader_dict, ood_loader_dict)
        self._setup_for = id(net)
        self.setup_flag = True

    @property
    def needs_grad(self) -> bool:
        return shared.needs_grad(self.detector)

    def postprocess(self, net: torch.nn.Module, data: torch.Tensor):  # no @no_grad: guidance needs gradients
        with torch.set_grad_enabled(self.needs_grad):
            stats = self.detector.statistics(net, data, None)
        return torch.as_tensor(stats["pred"]), torch.as_tensor(self.detector.confidence(stats)).detach()

    def scored(self, net: torch.nn.Module, loader: Any, progress: bool = True, batch_hook: Any = None):
        """Cached statistics of a loader (see ``cache.cached_statistics``)."""
        return shared.scored(self.detector, net, loader, self.store(net), progress, batch_hook)

    def confidence(self, stats: Mapping[str, np.ndarray]) -> np.ndarray:
        return shared.confidence(self.detector, stats)

    def inference(self, net: torch.nn.Module, data_loader: Any, progress: bool = True):
        out, conf = shared.score(self.detector, net, data_loader, self.store(net), progress)
        self._save_gallery(net, data_loader, out, conf)
        return out.stats["pred"].astype(int), conf, out.labels.astype(int)

    def _save_gallery(self, net: torch.nn.Module, loader: Any, out: Any, conf: np.ndarray) -> None:
        """main.py test sets: the report's gallery samples, next to OpenOOD's ``scores/<dataset>.npz``."""
        folder = openood_output_dir(self.config) if self.gallery_k else None
        split = openood_split(self.config, loader) if folder is not None else None
        if split is None:
            return  # validation / APS passes, the Evaluator (no output dir), torchrun ranks > 0
        root = (Path(self.cache_dir) if self.cache_dir else default_cache_root()) if self.use_disk_cache else None
        with torch.set_grad_enabled(self.needs_grad):
            save_gallery(self.detector, net, loader, stats=out.stats, conf=conf, labels=out.labels,
                         folder=folder / "gallery", method=str(section(self.config, "postprocessor").get("name")),
                         split=split[0], role=split[1], cache_root=root, k=self.gallery_k)

    # ------------------------------------------------------------------ cache
    def store(self, net: torch.nn.Module) -> ScoreCache:
        """Score store of the detector's current expensive parameters and this classifier's weights.

        The classifier is hashed on every call (once per loader pass; a ResNet50 hash costs far less than its
        forward over a test set): a memo by object would serve old scores after ``net.load_state_dict(...)``
        or an in-place edit of the same object."""
        ns = shared.store_namespace(self.detector, net)
        if ns not in self._stores:
            root = (Path(self.cache_dir) if self.cache_dir else default_cache_root()) if self.use_disk_cache else None
            self._stores[ns] = ScoreCache(root, ns)
        return self._stores[ns]

    # ------------------------------------------------------------------ APS
    def set_hyperparam(self, hyperparam: list) -> None:
        if len(hyperparam) != len(self._sweep):
            raise ValueError(f"expected {len(self._sweep)} values for {self._sweep}, got {hyperparam}")
        self.detector.set_params(**dict(zip(self._sweep, hyperparam)))

    def get_hyperparam(self) -> list:
        return [self.detector.params[p] for p in self._sweep]

    # ------------------------------------------------------------------ pickling (scripts/eval_ood.py)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # the detector drops its heavy models in its own __getstate__
        for k in ("_stores", "_setup_for"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._transient()  # setup() runs again after unpickling and reloads the models


class DiffGuardPostprocessor(DetectorPostprocessor):
    detector_name = "diffguard"  # DiffGuardGDM or DiffGuardCFG, by postprocessor_args.guidance


class DiffGuardGDMPostprocessor(DiffGuardPostprocessor):
    detector_name = "diffguard_gdm"


class DiffGuardCFGPostprocessor(DiffGuardPostprocessor):
    detector_name = "diffguard_cfg"


class DiffNBPostprocessor(DetectorPostprocessor):
    detector_name = "diffnb"


class LFDNPostprocessor(DetectorPostprocessor):
    detector_name = "lfdn"


# ---------------------------------------------------------------------- fusion with OpenOOD baselines
def openood_postprocessor(name: str, args: Mapping[str, Any], dataset: Mapping[str, Any]) -> Any:
    """One of OpenOOD's own postprocessors, built by its own (main.py) factory from a small Config."""
    from openood.postprocessors import utils as pp_utils

    cfg = Config({"postprocessor": {"name": name, "APS_mode": False, "postprocessor_args": dict(args),
                                    "postprocessor_sweep": {f"{k}_list": [v] for k, v in args.items()}},
                  "dataset": dict(dataset)})
    factory = getattr(pp_utils.get_postprocessor, "openood_original", pp_utils.get_postprocessor)
    return factory(cfg)


class FusionPostprocessor(BasePostprocessor):
    """Our detector fused with one of OpenOOD's ebo / knn / vim / mls postprocessors (docs/fusion.md).

    The yml schema is ``fusion.presets`` (shared with the standalone path): ``detector``, ``detector_preset``
    (a packaged detector yml whose args are used), ``detector_args``, ``baseline``, ``baseline_args``, ``rule``,
    ``rule_args``, ``cache_dir``, ``cache``.
    The baseline runs on every sample (cheap); our detector only where the fusion rule needs it (the
    cascade routes), with its statistics cached. Calibration (ECDFs) uses ID ``val`` only, never the
    augmented ``main.py`` train loader; rules fitted on OOD-val (logistic) also read ``ood['val']``.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        pp = section(config, "postprocessor")
        fusion_cfg, det_section = fusion_detector_section(pp)  # unknown keys fail here
        self.baseline_name = fusion_cfg.baseline
        self.baseline_args = {**BASELINE_ARGS[self.baseline_name], **fusion_cfg.baseline_args}
        dataset = section(config, "dataset")
        self._baseline_dataset = dataset
        # ViM's dim may be null (safe default from the feature size): the baseline is then built in setup()
        self.baseline = None if self.baseline_args.get("dim", 0) is None else \
            openood_postprocessor(self.baseline_name, self.baseline_args, dataset)
        self.diffusion = DetectorPostprocessor(Config({"postprocessor": det_section, "dataset": dataset}))
        self.fusion = fusion_cfg.build_fusion()
        self.args_dict = dict(pp.get("postprocessor_sweep") or {})
        allowed = {**self.fusion.get_params(), **{p: None for p in self.diffusion.detector.cheap_params}}
        self._sweep = sweep_parameters(self.args_dict, allowed, "FusionPostprocessor")
        self.APS_mode = aps_flag(pp, self.args_dict, "FusionPostprocessor")
        self.hyperparam_search_done = False
        self.setup_flag = False
        self._fit_for: int | None = None
        self._calibration_data: tuple | None = None
        self.routing: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ setup
    def _build_vim(self, net: torch.nn.Module) -> None:
        from ..fusion.baselines import check_vim_dim, vim_default_dim

        w, _ = net.get_fc()
        dim = self.baseline_args["dim"]
        dim = vim_default_dim(w.shape[1]) if dim is None else check_vim_dim(dim, w.shape[1])
        if self.baseline is None or self.baseline.dim != dim:
            self.baseline_args["dim"] = dim
            self.baseline = openood_postprocessor("vim", self.baseline_args, self._baseline_dataset)

    def _knn_cache_file(self, net: torch.nn.Module, loader: Any) -> Path:
        from ..runtime.cache import loader_source

        key = json.dumps([module_fingerprint(net), loader_source(loader), len(getattr(loader, "dataset", []))])
        root = Path(self.diffusion.cache_dir) if self.diffusion.cache_dir else default_cache_root()
        # the classifier's raw features (before KNN's normalizer); "knn_features/" held normalised ones
        return root / "knn_train_features" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"

    def _setup_baseline(self, net: torch.nn.Module, id_loader_dict: Any, ood_loader_dict: Any) -> None:
        if self.baseline_name == "vim":
            self._build_vim(net)  # before OpenOOD's setup: a bad dim would give NaN scores, not an error
        if getattr(self.baseline, "setup_flag", False):
            return
        if self.baseline_name == "knn" and self.diffusion.use_disk_cache:
            # KNN's setup re-extracts every ID train feature: keep them on disk per (net, train set)
            path = self._knn_cache_file(net, id_loader_dict["train"])
            if path.is_file():  # OpenOOD's own setup builds its index from them (_FeatureReplay)
                replay = _FeatureReplay(np.load(path, allow_pickle=False))
                self.baseline.setup(replay, {"train": replay.loader()}, ood_loader_dict)
                return
            recorder = _FeatureRecorder(net)
            self.baseline.setup(recorder, id_loader_dict, ood_loader_dict)
            atomic_write(path, lambda f: np.save(f, recorder.features()))  # all or nothing, per writer
            return
        self.baseline.setup(net, id_loader_dict, ood_loader_dict)

    def setup(self, net: torch.nn.Module, id_loader_dict: Any, ood_loader_dict: Any) -> None:
        net.eval()
        self.diffusion.setup(net, id_loader_dict, ood_loader_dict)
        self._setup_baseline(net, id_loader_dict, ood_loader_dict)
        if self._fit_for != id(net):
            self._calibration_data = (net, id_loader_dict["val"], ood_loader_dict["val"])
            self._calibrate()
            self._fit_for = id(net)
        self.setup_flag = True

    def _calibrate(self) -> None:
        """Fit the fusion on ID-val scores (plus OOD-val for rules that need it); cached, so cheap to redo.
        With a band (cascade, budget) the detector runs only on the val samples inside it: the band comes
        from a first, baseline-only pass over ID-val (order-free: it needs the scores' distribution only)."""
        net, id_val, ood_val = self._calibration_data
        pick = lambda s: {"baseline": s["baseline"], "diffusion": s["diffusion"]}  # noqa: E731
        routed = self.fusion.rule.routes
        if routed:
            self.fusion.fit_band(self._baseline_only(net, id_val))
        id_scores = pick(self._scores(net, id_val, route=routed))
        ood_scores = pick(self._scores(net, ood_val, route=routed)) if self.fusion.uses_ood_val else None
        self.fusion.fit(id_scores, ood_scores)

    def _baseline_only(self, net: torch.nn.Module, loader: Any) -> np.ndarray:
        device = next(net.parameters()).device
        return np.concatenate([self._baseline_batch(net, batch["data"].to(device))[1].numpy() for batch in loader])

    # ------------------------------------------------------------------ scoring
    def _baseline_batch(self, net: torch.nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            pred, conf = self.baseline.postprocess(net, data)
        return torch.as_tensor(pred).cpu(), torch.as_tensor(conf).float().cpu()

    def _scores(self, net: torch.nn.Module, loader: Any, route: bool = True, progress: bool = True) -> dict:
        """One pass: baseline on every batch, diffusion statistics where routed (cached)."""
        def hook(data: torch.Tensor):
            pred, b = self._baseline_batch(net, data)
            mask = self.fusion.route(b.numpy()) if route and self.fusion.band_ecdf is not None else None
            return mask, {"baseline": b, "pred": pred}

        out = self.diffusion.scored(net, loader, progress, batch_hook=hook)
        d = np.full(out.labels.shape, np.nan)
        if out.selected.any():
            d[out.selected] = self.diffusion.confidence({k: v[out.selected] for k, v in out.stats.items()})
        return {"baseline": out.extras["baseline"], "diffusion": d, "pred": out.extras["pred"],
                "label": out.labels, "selected": out.selected}

    def postprocess(self, net: torch.nn.Module, data: torch.Tensor):
        pred, b = self._baseline_batch(net, data)
        fused, _ = self.fusion.fuse_batch(b.numpy(), lambda x: self.diffusion.postprocess(net, x)[1].cpu(), data)
        self._log_routing(self.fusion.route(b.numpy()))
        return pred, torch.as_tensor(fused)

    def inference(self, net: torch.nn.Module, data_loader: Any, progress: bool = True):
        s = self._scores(net, data_loader, progress=progress)
        conf = np.asarray(self.fusion({"baseline": s["baseline"], "diffusion": s["diffusion"]}), dtype=np.float64)
        self._log_routing(s["selected"], progress)
        return s["pred"].astype(int), conf, s["label"].astype(int)

    def _log_routing(self, selected: np.ndarray, show: bool = False) -> None:
        """``routing``: (routed, total) per inference / postprocess call, the realised share of the budget."""
        self.routing.append((int(np.sum(selected)), int(np.size(selected))))
        if show and self.fusion.rule.routes:
            k, n = self.routing[-1]
            print(f"diffguard_fusion: {k} of {n} samples ({100 * k / max(n, 1):.1f} %) reached the diffusion "
                  f"detector (band: {100 * self.fusion.expected_routed_fraction:.1f} % of ID)", flush=True)

    # ------------------------------------------------------------------ APS
    def set_hyperparam(self, hyperparam: list) -> None:
        if len(hyperparam) != len(self._sweep):
            raise ValueError(f"expected {len(self._sweep)} values for {self._sweep}, got {hyperparam}")
        values = dict(zip(self._sweep, hyperparam))
        rule = {k: v for k, v in values.items() if k in self.fusion.get_params()}
        det = {k: v for k, v in values.items() if k not in rule}
        if rule:
            self.fusion.set_params(**rule)
        if det:
            self.diffusion.detector.set_params(**det)
        if self._fit_for is not None and (det or self.fusion.missing_fit):
            # the detector's scores changed, or the band moved onto val samples not scored yet: refit (cached rows)
            self._calibrate()

    def get_hyperparam(self) -> list:
        params = {**self.diffusion.detector.params, **self.fusion.get_params()}
        return [params[p] for p in self._sweep]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["baseline"] = copy.copy(self.baseline)
        index = getattr(self.baseline, "index", None) if self.baseline_name == "knn" else None
        if index is not None:  # faiss indexes do not pickle: faiss's own byte form travels instead
            import faiss

            state["baseline"].index = faiss.serialize_index(index)
            # OpenOOD's KNN reads only the index after setup; its activation_log is the same vectors again
            state["baseline"].activation_log = None
        state["_fit_for"] = None  # setup() refits after unpickling (from cached rows)
        state.pop("_calibration_data", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if isinstance(getattr(self.baseline, "index", None), np.ndarray):
            import faiss

            self.baseline.index = faiss.deserialize_index(self.baseline.index)
        elif self.baseline_name == "knn" and not hasattr(self.baseline, "index"):
            self.baseline.setup_flag = False  # pickled by an older version without its index: setup() rebuilds it


class _FeatureRecorder:
    """The classifier as OpenOOD's KNN setup sees it (``eval()``, ``net(x, return_feature=True)``), keeping a
    copy of each batch's features exactly as KNN receives them, before its normaliser."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self._batches = net, []

    def eval(self) -> "_FeatureRecorder":
        self.net.eval()
        return self

    def __call__(self, data: torch.Tensor, return_feature: bool = False):
        out = self.net(data, return_feature=return_feature)
        if return_feature:
            self._batches.append(out[1].detach().cpu().numpy())
        return out

    def features(self) -> np.ndarray:
        return np.concatenate(self._batches)


class _FeatureReplay:
    """Stands in for the classifier in OpenOOD's KNN setup: batch ``i`` of :meth:`loader` returns the ``i``-th
    block of recorded features, so OpenOOD normalises them and builds its index itself (its normaliser works
    row by row: the blocks need not match the original batches)."""

    def __init__(self, features: np.ndarray, block: int = 4096) -> None:
        self.blocks = np.array_split(features, range(block, len(features), block))

    def loader(self) -> list[dict]:
        return [{"data": torch.tensor([float(i)])} for i in range(len(self.blocks))]

    def eval(self) -> "_FeatureReplay":
        return self

    def __call__(self, data: torch.Tensor, return_feature: bool = False):
        feature = torch.from_numpy(self.blocks[int(data[0])])
        return torch.zeros(len(feature), 1), feature
