"""DiffGuard's two paths as two detectors: each declares only the parameters it reads, ``DiffGuard(guidance=...)``
and the registered names build them, a parameter of the other path is an error naming that path, and a
detector pickled before the split still unpickles to the right path with the same scores."""
import pickle

import pytest
import torch
import yaml

from diffguard_toys import _mixture, schedule  # noqa: F401 (fixture)
from openood_diffguard.runtime import registry
from openood_diffguard.detectors.base import ParameterError
from openood_diffguard.detectors.diffguard import GUIDANCE, VARIANTS, DiffGuard, path_class
from openood_diffguard.detectors.diffguard_cfg import DiffGuardCFG
from openood_diffguard.detectors.diffguard_gdm import DiffGuardGDM
from openood_diffguard.fusion.presets import preset_dir
from openood_diffguard.openood.sections import detector_from_section

pytestmark = pytest.mark.usefixtures("single_thread")

#: DiffGuard's parameters before the split (one class for both paths)
ALL_PARAMS = {
    "model_type", "model_path", "num_classes", "normalization", "diffusion_size", "dtype", "cast_weights", "compile",
    "variant", "guidance", "num_steps", "timestep_spacing", "steps_offset", "inversion_convention", "clean_level",
    "inversion_refine", "clip_denoised", "max_inversion_steps", "aes", "aes_psnr_db", "aes_psnr_legacy",
    "aes_dists_sim", "forback_skip", "classifier_scale", "guidance_target", "cutouts", "cutout_min_fraction",
    "cutout_seed", "cfg_scale", "cam_cut", "cam_layer", "reference", "similarities", "score_size", "score_antialias",
    "similarity", "label_mode", "oracle_seed", "metric_weights", "pretrained_metrics"}
GDM_ONLY = set(DiffGuardGDM.DEFAULTS) - set(DiffGuardCFG.DEFAULTS)
CFG_ONLY = set(DiffGuardCFG.DEFAULTS) - set(DiffGuardGDM.DEFAULTS)
PRESETS = ["gdm_imagenet", "ldm_imagenet", "dit_imagenet", "cifar10"]


def test_the_two_detectors_partition_the_parameters():
    assert set(DiffGuardGDM.DEFAULTS) | set(DiffGuardCFG.DEFAULTS) == ALL_PARAMS  # nothing lost
    assert set(DiffGuardGDM.DEFAULTS) & set(DiffGuardCFG.DEFAULTS) == set(DiffGuard.DEFAULTS)  # shared = the base's
    assert CFG_ONLY == {"cfg_scale", "cam_cut", "cam_layer"}
    assert {"aes", "classifier_scale", "cutouts", "reference", "clip_denoised", "forback_skip"} <= GDM_ONLY
    # a variant table resolves only its own path's parameters (aes_psnr: the resolved form of the AES PSNR pair)
    for variant, paths in VARIANTS.items():
        for guidance, table in paths.items():
            assert set(table) - {"aes_psnr"} <= set(path_class(guidance).DEFAULTS), (variant, guidance)


def test_factory_and_registered_names_build_the_path_detectors():
    assert type(DiffGuard()) is DiffGuardGDM  # default guidance: classifier, as before the split
    assert type(DiffGuard(guidance="classifier")) is DiffGuardGDM and type(DiffGuard(guidance="cfg")) is DiffGuardCFG
    assert isinstance(DiffGuard(guidance="cfg"), DiffGuard)
    assert type(registry.build_detector("diffguard", guidance="cfg")) is DiffGuardCFG
    assert registry.detector_class("diffguard_gdm") is DiffGuardGDM and registry.detector_class("diffguard_cfg") is DiffGuardCFG
    assert {"diffguard", "diffguard_gdm", "diffguard_cfg"} <= set(registry.POSTPROCESSORS)
    cfg = DiffGuard(guidance="cfg", cfg_scale=3.0, num_steps=7)
    twin = DiffGuardCFG(**cfg.params)  # params round-trip, through either door
    assert twin.params == cfg.params and twin.cache_key() == cfg.cache_key()
    assert DiffGuard(**cfg.params).params == cfg.params
    with pytest.raises(ParameterError, match="'guidance' is fixed to 'classifier'"):
        DiffGuardGDM(guidance="cfg")
    with pytest.raises(ParameterError, match="'guidance' is fixed to 'cfg'"):
        cfg.set_params(guidance="classifier")
    assert GUIDANCE == tuple(VARIANTS["code"]) == tuple(VARIANTS["paper"])


@pytest.mark.parametrize("guidance, name", [("classifier", k) for k in sorted(CFG_ONLY)] +
                         [("cfg", k) for k in sorted(GDM_ONLY)])
def test_a_parameter_of_the_other_path_is_rejected_by_name(guidance, name):
    other = "cfg" if guidance == "classifier" else "classifier"
    value = path_class(other).DEFAULTS[name]  # even its default: it never had an effect on this path
    with pytest.raises(ParameterError, match=f"parameter '{name}' belongs to DiffGuard's '{other}' path"):
        DiffGuard(guidance=guidance, **{name: value})
    det = DiffGuard(guidance=guidance)
    with pytest.raises(ParameterError, match=f"'{name}' belongs"):
        det.set_params(**{name: value})
    assert det.params == DiffGuard(guidance=guidance).params


@pytest.mark.parametrize("preset", PRESETS)
def test_registered_name_builds_what_the_preset_builds(preset):
    """A preset under ``name: diffguard`` + ``guidance`` and the same args under the path's own name give the
    same detector, parameters and cache key."""
    pp = yaml.safe_load((preset_dir() / f"diffguard_{preset}.yml").read_text())["postprocessor"]
    via_alias = detector_from_section(pp)[0]
    args = {k: v for k, v in pp["postprocessor_args"].items() if k != "guidance"}
    own = detector_from_section({**pp, "name": type(via_alias).name, "postprocessor_args": args})[0]
    assert type(own) is type(via_alias) and own.params == via_alias.params
    assert own.cache_key() == via_alias.cache_key()


def _pre_split_pickle(guidance: str, **params) -> bytes:
    """The bytes ``pickle.dumps`` wrote for a DiffGuard before the split: class ``diffguard.DiffGuard``, every
    parameter of both paths, the cutout generator."""
    old = object.__new__(DiffGuard)
    full = {**DiffGuardGDM.DEFAULTS, **DiffGuardCFG.DEFAULTS, "guidance": guidance, **params}
    old.__dict__.update(params=full, model=None, _perceptual=None, _user_model=False,
                        _cutouts=DiffGuardGDM()._cutouts)
    return pickle.dumps(old)


@pytest.mark.parametrize("guidance", GUIDANCE)
def test_a_detector_pickled_before_the_split_scores_the_same(schedule, guidance):
    known, clf, x, _ = _mixture(schedule)
    x = x[::30]
    common = dict(normalization=None, diffusion_size=None, score_size=None, num_steps=10, similarities=("logits_l1",),
                  similarity="logits_l1")
    own = dict(cfg_scale=3.0, cam_cut=False) if guidance == "cfg" else dict(classifier_scale=0.05, cutouts=0, aes=False,
                                                                             max_inversion_steps=8)
    clone = pickle.loads(_pre_split_pickle(guidance, **common, **own))
    fresh = DiffGuard(model=known, guidance=guidance, **common, **own)
    assert type(clone) is type(fresh) and clone.params == fresh.params
    assert hasattr(clone, "_cutouts") == (guidance == "classifier")
    clone.model = known
    torch.testing.assert_close(clone.statistics(clf, x)["sim_logits_l1"], fresh.statistics(clf, x)["sim_logits_l1"],
                               rtol=0, atol=0)


@pytest.mark.parametrize("name", ["diffguard", "diffguard_gdm", "diffguard_cfg", "diffnb", "lfdn"])
def test_every_detector_class_names_its_paper(name):
    doc = registry.detector_class(name).__doc__ or ""
    assert "https://arxiv.org/abs/" in doc and "https://github.com/" in doc, name


@pytest.mark.openood
@pytest.mark.parametrize("name, stem", [("diffguard_gdm", "gdm_imagenet"), ("diffguard_cfg", "cifar10")])
def test_openood_builds_the_path_postprocessors_by_name(name, stem, no_download):
    """main.py's factory on a section named after a path detector (its args without ``guidance``), and the
    Evaluator's by-name factory on the bare name (a packaged preset of that path)."""
    pytest.importorskip("openood.evaluation_api", reason="OpenOOD (with its Evaluator) not installed")
    import openood.evaluation_api.postprocessor as E
    from openood.postprocessors import utils as U
    from openood.utils import Config
    from openood_diffguard.openood import registered

    with registered():  # undone on exit: later tests see OpenOOD as it was (and .cuda() unpatched)
        pp = yaml.safe_load((preset_dir() / f"diffguard_{stem}.yml").read_text())["postprocessor"]
        args = {k: v for k, v in pp["postprocessor_args"].items() if k != "guidance"}
        built = U.get_postprocessor(Config({"postprocessor": {**pp, "name": name, "postprocessor_args": args},
                                            "dataset": {"name": "cifar10"}}))
        assert type(built) is registry.load(registry.POSTPROCESSORS[name])
        assert type(built.detector) is registry.detector_class(name)
        assert built.detector.params == detector_from_section(pp, {"name": "cifar10"})[0].params
        by_name = E.get_postprocessor("/nonexistent/config_root", name, "imagenet")
        assert type(by_name.detector) is registry.detector_class(name)
