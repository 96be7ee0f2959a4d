"""Readers: a run folder -> ``Run`` (per-sample scores per method and split, galleries, configuration).

Three kinds of folders are understood:

- ``demo``: the output of ``openood-diffguard demo`` (``scores/<method>.npz`` in ``fusion.scores_io``'s format,
  ``summary.json``, ``gallery/``).
- ``openood``: an output directory of OpenOOD's ``main.py`` (``ood.csv``, ``scores/<dataset>.npz`` with
  ``pred, conf, label`` per test set when ``recorder.save_scores`` is on, ``config.yml``, ``log.txt``) run
  with our postprocessors, which add ``gallery/<postprocessor>/<dataset>.npz``. A folder holding exactly one
  such directory below it (``results/<experiment>/s0/ood``) is found by searching.
- ``scores``: score files as ``openood-diffguard fuse`` reads them (our ``.npz``, OpenOOD's ``.pkl``) and
  ``fuse --json`` outputs, one method per score file.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from ..metrics import OODMetrics, ood_metrics
from .gallery import Gallery, load_galleries

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Split:
    """Per-sample scores of one split (conf higher = ID; label -1 = OOD; pred = predicted class or -1)."""

    conf: np.ndarray
    label: np.ndarray
    pred: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.conf = np.asarray(self.conf, dtype=np.float64).reshape(-1)
        self.label = np.asarray(self.label).reshape(-1).astype(np.int64)
        if self.pred is not None:
            self.pred = np.asarray(self.pred).reshape(-1).astype(np.int64)
            if self.pred.shape != self.conf.shape:
                raise ValueError(f"pred has {self.pred.size} entries but conf {self.conf.size}")
        if self.conf.shape != self.label.shape:
            raise ValueError(f"conf has {self.conf.size} entries but label {self.label.size}")


@dataclass
class Method:
    """One scoring method of a run: ID test split(s), OOD splits (+ OpenOOD's near/far groups), galleries."""

    name: str
    id: dict[str, Split]
    ood: dict[str, Split]
    groups: dict[str, list[str]] = field(default_factory=dict)
    galleries: dict[str, Gallery] = field(default_factory=dict)

    @property
    def id_split(self) -> Split:
        """All ID test samples (several ID splits, e.g. OpenOOD's full-spectrum csid sets, are pooled)."""
        parts = list(self.id.values())
        if len(parts) == 1:
            return parts[0]
        has_pred = all(p.pred is not None for p in parts)
        return Split(np.concatenate([p.conf for p in parts]), np.concatenate([p.label for p in parts]),
                     np.concatenate([p.pred for p in parts]) if has_pred else None)

    def metrics(self) -> dict[str, OODMetrics]:
        """Per OOD split against the ID test set, plus the unweighted means of the groups (as OpenOOD)."""
        ref = self.id_split
        rows: dict[str, OODMetrics] = {}
        for name, s in self.ood.items():
            finite = np.isfinite(s.conf)
            if not np.isfinite(ref.conf).all() or not finite.all():
                continue  # a cascade's diffusion-only score: not defined for every sample
            pred = None if ref.pred is None or s.pred is None else np.r_[ref.pred, s.pred]
            rows[name] = ood_metrics(np.r_[ref.conf, s.conf], np.r_[ref.label, -np.ones(s.conf.size, np.int64)], pred)
        for group, members in self.groups.items():
            have = [rows[m] for m in members if m in rows]
            if have and len(have) == len(members):
                vals = np.mean([[getattr(m, f) for f in OODMetrics.__dataclass_fields__] for m in have], axis=0)
                rows[group] = OODMetrics(*map(float, vals))
        return rows

    def threshold(self, recall: float = 0.95) -> float:
        """Confidence that accepts ``recall`` of the ID test samples (the papers' FPR@95 operating point):
        samples with conf >= threshold are called ID."""
        c = np.sort(self.id_split.conf[np.isfinite(self.id_split.conf)])
        if c.size == 0:
            return float("nan")
        return float(c[int(np.floor((1 - recall) * c.size))])


@dataclass
class Table:
    """A metrics table read as-is from a file (e.g. ``fuse --json``), values as fractions."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Run:
    kind: str  # demo | openood | scores
    title: str
    folder: Path
    methods: dict[str, Method]
    classifier_accuracy: float | None = None
    accuracy_scope: str = "the ID test set"  # which images classifier_accuracy was measured on
    class_names: list[str] | None = None
    config: Any = None  # shown as YAML
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    tables: list[Table] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # consistency checks that passed
    notes: list[str] = field(default_factory=list)  # what the report could not show, and why
    split_names: dict[str, str] = field(default_factory=dict)  # split -> name shown to readers

    def split_name(self, split: str) -> str:
        return self.split_names.get(split, split)

    def class_name(self, label: int) -> str:
        if label < 0:
            return "OOD"
        if self.class_names and label < len(self.class_names):
            return f"{label} {self.class_names[label]}" if not self.class_names[label].isdigit() else self.class_names[label]
        return str(label)


# ---------------------------------------------------------------------------------------- demo
def read_demo(folder: Path) -> Run:
    from ..demo.run import score_file_stem
    from ..fusion.scores_io import load_npz

    summary = json.loads((folder / "summary.json").read_text())
    galleries = load_galleries(folder / "gallery")
    methods = {}
    for name in summary.get("auroc") or {}:  # the demo's methods, in its table's order
        path = folder / "scores" / f"{score_file_stem(name)}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the demo's score file of {name!r} is missing (is {folder} a complete "
                                    "openood-diffguard demo output?)")
        splits = load_npz(path)
        ood = [k for k in splits if k.startswith(("near/", "far/"))]
        if "id_test" not in splits or len(ood) != 1:
            raise ValueError(f"{path}: expected the splits id_test and one OOD test split, got {sorted(splits)}")
        methods[name] = Method(name, {"id_test": Split(*(splits["id_test"][f] for f in ("conf", "label", "pred")))},
                               {"ood_test": Split(*(splits[ood[0]][f] for f in ("conf", "label", "pred")))},
                               galleries=galleries.get(name, {}))
    cfg = summary.get("config", {})
    run = Run("demo", "openood-diffguard demo: digits open set", folder, methods,
              classifier_accuracy=summary.get("classifier_accuracy"),
              class_names=[str(c) for c in range(6)],
              config={"demo": cfg, "benchmark": "scikit-learn digits: known 0-5 = ID, 6-9 = OOD",
                      "test images": {"ID": summary.get("n_id"), "OOD": summary.get("n_ood")},
                      **_detector_params(galleries)},
              timings={k: float(v) for k, v in (summary.get("timings_s") or {}).items()})
    if "seconds" in summary:
        run.timings["total"] = float(summary["seconds"])
    if cfg.get("n_test") is not None:  # accuracy is measured on every ID test image, the detectors score a subset
        run.accuracy_scope = (f"all ID test images (the ACC column: the {summary.get('n_id')} ID test images the "
                              "detectors scored)")
    run.split_names = {"id_test": "digits 0-5", "ood_test": "digits 6-9"}
    csv_path = folder / "metrics.csv"
    if csv_path.is_file():
        run.checks.append(_check_demo_csv(csv_path, methods))
    return run


def _detector_params(galleries: Mapping[str, Mapping[str, Gallery]]) -> dict:
    """{"detectors": {method: parameters}} as recorded in the galleries (the scoring configuration)."""
    params = {m: next(iter(gs.values())).meta.get("params") for m, gs in galleries.items() if gs}
    return {"detectors": {m: p for m, p in params.items() if p}} if any(params.values()) else {}


def _check_demo_csv(path: Path, methods: Mapping[str, Method]) -> str:
    """The demo's metrics.csv equals the metrics recomputed here from its score files (2 decimals)."""
    from ..metrics import METRIC_COLUMNS

    cols = {c: f for c, f in METRIC_COLUMNS.items() if c != "ACC"}  # ACC: the classifier's, not the scores'
    worst = 0.0
    n = 0
    for row in csv.DictReader(path.open()):
        m = methods.get(row.get("method", ""))
        if m is None:
            continue
        ours = next(iter(m.metrics().values()))
        for col, f in cols.items():
            if col in row:
                worst = max(worst, abs(float(row[col]) - 100 * getattr(ours, f)))
                n += 1
    if n == 0:
        return "metrics.csv has no columns this report recognises; metrics below are recomputed from the score files"
    if worst > 0.0051:
        raise ValueError(f"{path}: differs from the metrics of the score files by {worst:.3f} points; the files are "
                         "from different runs")
    return f"metrics.csv equals the metrics recomputed from the score files ({n} values, to its 2 decimals)"


# ---------------------------------------------------------------------------------------- OpenOOD main.py
class _ConfigLoader(yaml.SafeLoader):
    """OpenOOD dumps its Config object with a python tag: read the mapping without running any code."""


def _config_object(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    value = loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode) else None
    return value.get("state", value) if isinstance(value, dict) else value


_ConfigLoader.add_multi_constructor("tag:yaml.org,2002:python/object", _config_object)


def read_openood_config(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ConfigLoader) or {}  # noqa: S506 - SafeLoader subclass


def find_openood_dirs(folder: Path) -> list[Path]:
    hits = {p.parent for p in folder.rglob("ood.csv")} | {p.parent.parent for p in folder.rglob("scores/*.npz")
                                                          if (p.parent.parent / "config.yml").is_file()}
    return sorted(hits)


def _openood_layout(cfg: Mapping[str, Any]) -> tuple[str, dict[str, list[str]], list[str]]:
    """(ID dataset name, {nearood: [...], farood: [...]}, csid names) from a merged main.py config."""
    id_name = (cfg.get("dataset") or {}).get("name") or "id"
    ood = cfg.get("ood_dataset") or {}
    groups = {g: list((ood.get(g) or {}).get("datasets") or []) for g in ("nearood", "farood")}
    groups = {g: v for g, v in groups.items() if v}
    csid = list((ood.get("csid") or {}).get("datasets") or [])
    return id_name, groups, csid


def read_openood(folder: Path) -> Run:
    cfg = read_openood_config(folder / "config.yml") if (folder / "config.yml").is_file() else {}
    id_name, groups, csid = _openood_layout(cfg)
    method_name = str((cfg.get("postprocessor") or {}).get("name") or "postprocessor")
    score_files = {p.stem: p for p in sorted((folder / "scores").glob("*.npz"))}
    csv_rows = {r["dataset"]: r for r in csv.DictReader((folder / "ood.csv").open())} if (folder / "ood.csv").is_file() else {}
    if not groups and csv_rows:  # no config: the csv's row order gives the datasets, group rows end with 'ood'
        members: list[str] = []
        for name in csv_rows:
            if name in ("nearood", "farood"):
                groups[name], members = members, []
            else:
                members.append(name)
    notes: list[str] = []
    title = f"OpenOOD main.py: {method_name} on {id_name}"
    run = Run("openood", title, folder, {}, config=_shown_config(cfg), notes=notes)
    if id_name == "cifar10":
        run.class_names = list(CIFAR10_CLASSES)
    if not score_files:
        notes.append("no scores/*.npz (OpenOOD's recorder.save_scores was off): the table is ood.csv as written, "
                     "without curves, histograms, galleries or the papers' FPR@95")
        run.tables.append(_csv_table(csv_rows, f"ood.csv ({method_name})"))
        return run
    if id_name not in score_files:
        raise FileNotFoundError(f"{folder}: scores/{id_name}.npz (the ID test scores) is missing; have "
                                f"{sorted(score_files)}")

    def split(name: str) -> Split:
        with np.load(score_files[name], allow_pickle=False) as z:
            return Split(z["conf"], z["label"], z["pred"] if "pred" in z.files else None)

    ood_names = [n for g in groups.values() for n in g] or [n for n in score_files if n != id_name and n not in csid]
    missing = [n for n in ood_names if n not in score_files]
    if missing:
        notes.append(f"no scores for {missing} (run interrupted?): they are left out, and so are their group means")
    ids = {id_name: split(id_name)}
    if (cfg.get("evaluator") or {}).get("ood_scheme") == "fsood":
        ids.update({n: split(n) for n in csid if n in score_files})
    ood = {n: split(n) for n in ood_names if n in score_files}
    for s in ood.values():
        s.label[:] = -1  # the evaluator forces OOD labels to -1 before computing metrics
    galleries = load_galleries(folder / "gallery").get(method_name, {})
    run.methods[method_name] = Method(method_name, ids, ood, groups, galleries)
    run.classifier_accuracy = _accuracy_from_log(folder / "log.txt")
    run.timings = _timings_from_log(folder / "log.txt")
    if csv_rows:
        run.checks.append(_check_openood_csv(csv_rows, run.methods[method_name]))
    return run


def _shown_config(cfg: Mapping[str, Any]) -> dict:
    """The parts of a main.py config a reader of the report needs (the rest is in config.yml)."""
    keep = ("postprocessor", "network", "dataset", "ood_dataset", "evaluator", "preprocessor", "exp_name", "seed")
    out = {k: cfg[k] for k in keep if k in cfg}
    for key in ("dataset", "ood_dataset"):  # loaders' batch sizes etc. are noise here; keep names and lists
        if isinstance(out.get(key), Mapping):
            out[key] = {k: v for k, v in out[key].items() if k not in ("num_workers", "num_gpus", "num_machines")}
    return out


def _accuracy_from_log(path: Path) -> float | None:
    if not path.is_file():
        return None
    m = re.findall(r"^Accuracy ([0-9.]+)%", path.read_text(errors="replace"), flags=re.M)
    return float(m[-1]) / 100 if m else None


def _timings_from_log(path: Path) -> dict[str, float]:
    if not path.is_file():
        return {}
    m = re.findall(r"Time used for eval_ood: ([0-9.]+)s", path.read_text(errors="replace"))
    return {"eval_ood (OpenOOD log)": float(m[-1])} if m else {}


def _csv_table(rows: Mapping[str, Mapping[str, str]], title: str) -> Table:
    cols = ["FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    return Table(title, ["dataset", "FPR@95 (OOD+, OpenOOD v1.5)", "AUROC", "AUPR-In", "AUPR-Out", "ACC"],
                 [[name, *(float(r[c]) / 100 for c in cols)] for name, r in rows.items()])


def _check_openood_csv(rows: Mapping[str, Mapping[str, str]], method: Method) -> str:
    ours = method.metrics()
    fields = {"FPR@95": "fpr95_ood_positive", "AUROC": "auroc", "AUPR_IN": "aupr_in", "AUPR_OUT": "aupr_out"}
    worst, n = 0.0, 0
    for name, row in rows.items():
        if name in ours:
            for col, f in fields.items():
                worst = max(worst, abs(float(row[col]) - 100 * getattr(ours[name], f)))
                n += 1
    if worst > 0.0051:
        raise ValueError(f"ood.csv differs from the metrics of scores/*.npz by {worst:.3f} points: the files "
                         "are from different runs (main.py appends to an existing ood.csv; use a fresh --mark)")
    return f"ood.csv equals the metrics recomputed from scores/*.npz ({n} values, to its 2 decimals)"


# ---------------------------------------------------------------------------------------- score files / fuse
def _fuse_table(path: Path) -> Table | None:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, Mapping) or "rows" not in data or "rule" not in data:
        return None
    cols = ["FPR@95_OpenOOD", "FPR@95_IDpos", "AUROC", "AUPR_IN", "AUPR_OUT"]
    rows = [[r["dataset"], r["score"], *(r.get(c) for c in cols), r.get("routed")] for r in data["rows"]]
    note = (f"rule {data['rule']}, parameters {data.get('params')}, calibrated on {data.get('fit_on')}"
            f"{', uses OOD-val' if data.get('uses_ood_val') else ''}")
    if data.get("routed_id_test") is not None and data.get("banded", data["rule"] == "cascade"):
        note += f"; {100 * data['routed_id_test']:.1f} % of ID test routed to the diffusion detector"
    return Table(f"fuse: {path.name}", ["dataset", "score", "FPR@95 (OOD+, OpenOOD v1.5)", "FPR@95 (ID+, papers)",
                                        "AUROC", "AUPR-In", "AUPR-Out", "routed"], rows, note)


def read_scores(paths: list[Path], folder: Path, trust_pickle: bool = False) -> Run:
    from ..fusion.scores_io import load_scores

    run = Run("scores", f"score files in {folder.name}", folder, {})
    galleries = load_galleries(folder / "gallery")
    for path in paths:
        if path.suffix == ".json":
            table = _fuse_table(path)
            if table is not None:
                run.tables.append(table)
            continue
        splits = load_scores(path, trust_pickle=trust_pickle)
        if "id_test" not in splits:
            run.notes.append(f"{path.name}: no id_test split, left out")
            continue
        ood_names = [s for s in splits if s.startswith(("near/", "far/"))] or [s for s in splits if s == "ood_val"]
        groups = {f"{g}ood": [s for s in ood_names if s.startswith(g + "/")] for g in ("near", "far")}
        to_split = lambda s: Split(s["conf"], s["label"], s.get("pred"))  # noqa: E731
        ood = {s: to_split(splits[s]) for s in ood_names}
        for s in ood.values():
            s.label[:] = -1
        run.methods[path.stem] = Method(path.stem, {"id_test": to_split(splits["id_test"])}, ood,
                                        {g: v for g, v in groups.items() if v}, galleries.get(path.stem, {}))
    if any(t.title.startswith("fuse") for t in run.tables):
        run.notes.append("fuse --json holds the fused metrics, not per-sample fused scores: the curves and "
                         "histograms show the component score files")
    if not run.methods and not run.tables:
        raise ValueError(f"{folder}: no readable score files or fuse --json outputs")
    return run


# ---------------------------------------------------------------------------------------- dispatch
SCORE_SUFFIXES = (".npz", ".pkl", ".pickle", ".json")


def load_run(path: str | Path, trust_pickle: bool = False) -> Run:
    """Read any of the three kinds of run folders (module docstring); a clear error otherwise.
    ``trust_pickle``: unpickle OpenOOD ``.pkl`` score files without restriction (as ``fuse --trust-pickle``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder not found: {path}")
    if path.is_file():
        return read_scores([path], path.parent, trust_pickle)
    if (path / "summary.json").is_file() and (path / "scores").is_dir():
        return read_demo(path)
    if (path / "ood.csv").is_file() or ((path / "scores").is_dir() and (path / "config.yml").is_file()):
        return read_openood(path)
    files = sorted(p for p in path.iterdir() if p.suffix in SCORE_SUFFIXES and p.is_file())
    if files:
        return read_scores(files, path, trust_pickle)
    found = find_openood_dirs(path)
    if len(found) == 1:
        return read_openood(found[0])
    if found:
        raise ValueError(f"{path} holds {len(found)} OpenOOD result folders; pass one of them:\n  "
                         + "\n  ".join(str(p) for p in found))
    raise ValueError(f"{path}: not a run folder. Expected the demo's output (summary.json + scores/), an OpenOOD "
                     "main.py output directory (ood.csv, scores/*.npz, config.yml) or score files (.npz / .pkl, "
                     "fuse --json output)")
