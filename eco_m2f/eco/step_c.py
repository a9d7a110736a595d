"""ECO-M2F step C from files: the derived records of step B in, a gate and a gated model out.

:func:`run_step_c` reads ``DERIVED_DIR`` (records, ``meta.json``), computes or loads the cached
gate inputs, trains the gate (:mod:`.gate_training`) and writes ``gate.pth``, ``metrics.json``,
``model_gated.pth`` (step-A weights + ``gate.*``) and a ``config.yaml`` that evaluates the gated
model; :func:`format_step_c_report` is what the command line prints.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config.eco import DEFAULT_GATE_LOSS
from ..checkpoint import load_state_dict_file, load_weights, save_checkpoint
from ..utils.file_io import atomic_open, atomic_torch_save, atomic_write_text
from .exits import check_exits
from .meta_arch import eco_architecture_overrides
from .gate_training import GateInput, GateResult, extract_features, features_for_records, train_gate
from .records import feature_matrix, load_records, read_meta
from .targets import format_histogram

__all__ = [
    "FEATURE_CACHE",
    "StepCOutput",
    "format_step_c_report",
    "gate_output_dir",
    "resolve_weights",
    "run_step_c",
]

logger = logging.getLogger(__name__)

FEATURE_CACHE = "gate_features.npz"


def _load_feature_cache(path: Path, weights: str) -> Optional[Dict[Any, np.ndarray]]:
    if not path.is_file():
        return None
    data = np.load(path, allow_pickle=False)
    if str(data["weights"]) != weights:
        logger.info("%s was computed with other weights (%s); recomputing", path, data["weights"])
        return None
    ids = json.loads(str(data["image_ids"]))
    return dict(zip(ids, data["features"]))


def _save_feature_cache(path: Path, weights: str, feature_map: Mapping[Any, np.ndarray]) -> None:
    ids = list(feature_map)
    with atomic_open(path, "wb") as f:
        np.savez(f, image_ids=np.asarray(json.dumps(ids)), weights=np.asarray(weights),
                 features=np.stack([feature_map[i] for i in ids]).astype(np.float32))


def _model_feature_source(cfg: Any, weights: str, dataset: str) -> Tuple[GateInput, Iterable]:
    """The frozen model's ``gate_input`` and a test-mode loader over ``dataset`` (lazy imports:
    only needed when step B cached no features)."""
    from ..architectures import build_model
    from ..data import build_detection_test_loader

    model = build_model(cfg)
    sd = load_state_dict_file(weights)
    missing = set(model.state_dict()) - set(sd)
    # A gate missing from the step-A weights does not matter: gate_input stops before it.
    load_weights(model, sd, allow_missing=all(k.startswith("gate.") for k in missing))
    model.eval()
    if not hasattr(model, "gate_input"):
        raise AttributeError(f"{type(model).__name__} has no gate_input(batched_inputs) method")
    return model.gate_input, build_detection_test_loader(cfg, dataset)


# ------------------------------------------------------------------------------------------ step C
@dataclass
class StepCOutput:
    result: GateResult
    output_dir: Path
    paths: Dict[str, Path]
    eval_overrides: List[str]  # config overrides (on the step-B config) that evaluate the gated model
    timings: Dict[str, float]


def gate_output_dir(derived_dir: str | os.PathLike, beta: float, k_user: int, loss: str = DEFAULT_GATE_LOSS) -> Path:
    """DERIVED_DIR/gate_beta{beta}_k{k_user}, with ``_{loss}`` appended for a loss other than the
    default hard-CE (so that comparing the losses at one beta keeps every gate)."""
    suffix = "" if loss == DEFAULT_GATE_LOSS else f"_{loss}"
    return Path(derived_dir) / f"gate_beta{float(beta):g}_k{int(k_user)}{suffix}"


def resolve_weights(weights: str, derived_dir: Path) -> Optional[Path]:
    """The step-A checkpoint ``weights`` as given or relative to ``derived_dir``; None if unreadable."""
    if not weights:
        return None
    for cand in (Path(weights), derived_dir / weights):
        if cand.is_file() and os.access(cand, os.R_OK):
            return cand.resolve()
    return None


def run_step_c(
    config_file: str,
    derived_dir: str | os.PathLike,
    beta: float,
    k_user: Optional[int] = None,
    opts: Sequence[str] = (),
    output_dir: Optional[str | os.PathLike] = None,
    device: str = "cpu",
    feature_source: Optional[Callable[[Any, str, str], Tuple[GateInput, Iterable]]] = None,
    records: Optional[List[Dict[str, Any]]] = None,
) -> StepCOutput:
    """Step C from files: records of ``derived_dir`` -> gate.pth, metrics.json, model_gated.pth,
    config.yaml in ``output_dir`` (default :func:`gate_output_dir`).

    ``opts`` are KEY VALUE overrides of ``config_file`` (the step-B config); the gate's loss and
    optimisation settings come from MODEL.ECO.GATE.*, the exits from MODEL.ECO.EXITS, the seed from
    SEED. ``feature_source(cfg, weights, dataset) -> (gate_input, data_loader)`` is used only when
    the records carry no feature (default: build the model and use ``model.gate_input``).
    ``records`` (``load_records(derived_dir)``, optional) saves reading them again in a sweep.
    """
    from ..config import setup_cfg

    t0 = time.perf_counter()
    derived = Path(derived_dir)
    cfg = setup_cfg(config_file, list(opts))
    g = cfg.MODEL.ECO.GATE
    k_user = int(g.K_USER if k_user is None else k_user)
    meta = read_meta(derived)
    if records is None:
        records = load_records(derived)
    if not records:
        raise ValueError(f"{derived}: the derived dataset has no records")
    exits = check_exits(cfg.MODEL.ECO.EXITS, name="MODEL.ECO.EXITS")
    weights_name = str(meta.get("weights") or cfg.MODEL.WEIGHTS or "")
    weights_path = resolve_weights(weights_name, derived)
    t_loaded = time.perf_counter()

    features = feature_matrix(records)
    feature_seconds = 0.0
    if features is None:
        cache = derived / FEATURE_CACHE
        fmap = _load_feature_cache(cache, weights_name)
        ids = [r["image_id"] for r in records]
        if fmap is None or any(i not in fmap for i in ids):
            if weights_path is None:
                raise FileNotFoundError(
                    f"records in {derived} carry no gate feature and the step-A weights "
                    f"'{weights_name}' (meta.json 'weights') cannot be read to compute them"
                )
            source = feature_source or _model_feature_source
            dataset = str(meta.get("dataset") or cfg.DATASETS.TRAIN[0])
            tf = time.perf_counter()
            gate_input, loader = source(cfg, str(weights_path), dataset)
            fmap = extract_features(gate_input, loader, image_ids=ids)
            feature_seconds = time.perf_counter() - tf
            _save_feature_cache(cache, weights_name, fmap)
        features = features_for_records(records, fmap)

    seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else 0
    result = train_gate(
        records, beta=beta, k_user=k_user, exits=exits, loss=g.LOSS, epochs=int(g.EPOCHS), lr=float(g.LR),
        batch_size=int(g.BATCH_SIZE), val_fraction=float(g.VAL_FRACTION), seed=seed, features=features,
        device=device,
    )

    out = Path(output_dir) if output_dir is not None else gate_output_dir(derived, beta, k_user, str(g.LOSS))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    paths: Dict[str, Path] = {"gate": out / "gate.pth", "metrics": out / "metrics.json", "config": out / "config.yaml"}
    gate_sd = result.gate.state_dict()
    atomic_torch_save(
        {"gate": gate_sd, "exits": result.exits, "beta": result.beta, "k_user": result.k_user,
         "loss": result.loss, "metrics": result.metrics},
        paths["gate"],
    )

    eval_overrides = eco_architecture_overrides(cfg) + [
        "MODEL.ECO.GATE.ENABLED", "True",
        "MODEL.ECO.GATE.K_USER", str(k_user),
        "MODEL.ECO.GATE.BETA", repr(float(beta)),
        "MODEL.ECO.GATE.LOSS", result.loss,
        "TEST.ECO.EXIT", "0",
        "OUTPUT_DIR", str(out),
    ]
    if weights_path is not None:
        model_sd = load_state_dict_file(weights_path)
        stale = [k for k in model_sd if k.startswith("gate.")]
        for k in stale:  # a gate already in the step-A checkpoint is replaced, not mixed
            del model_sd[k]
        model_sd.update({f"gate.{k}": v.detach().cpu() for k, v in gate_sd.items()})
        paths["model"] = save_checkpoint(
            out / "model_gated.pth", model_sd,
            eco_gate={"exits": result.exits, "beta": result.beta, "k_user": result.k_user, "loss": result.loss},
        )
        eval_overrides += ["MODEL.WEIGHTS", str(paths["model"]), "MODEL.ECO.GATE.WEIGHTS", ""]
    else:
        logger.warning("step-A weights '%s' are not readable here; config.yaml loads gate.pth on top of them",
                       weights_name)
        eval_overrides += ["MODEL.WEIGHTS", weights_name, "MODEL.ECO.GATE.WEIGHTS", str(paths["gate"])]

    eval_cfg = setup_cfg(config_file, list(opts) + eval_overrides)
    atomic_write_text(paths["config"], eval_cfg.dump())

    t_end = time.perf_counter()
    timings = {
        "load_records_seconds": t_loaded - t0,
        "feature_seconds": feature_seconds,
        "train_seconds": result.metrics["train_seconds"],
        "total_seconds": t_end - t0,
    }
    result.metrics["timings"] = timings
    result.metrics["num_records"] = len(records)
    result.metrics["derived_dir"] = str(derived.resolve())
    result.metrics["weights"] = weights_name
    atomic_write_text(paths["metrics"], json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
    return StepCOutput(result, out, paths, eval_overrides, timings)


def _fmt_part(name: str, m: Mapping[str, Any]) -> List[str]:
    if not m.get("num_images"):
        return [f"{name}: no images"]
    return [
        f"{name}: {m['num_images']} images, gate accuracy (chosen exit == target) {100 * m['accuracy']:.1f}%",
        f"  mean PQ      gate {100 * m['pq_gate']:6.2f}  oracle {100 * m['pq_oracle']:6.2f}  "
        f"full depth {100 * m['pq_full_depth']:6.2f}",
        f"  mean utility gate {m['utility_gate']:.4f}  oracle {m['utility_oracle']:.4f}  "
        f"full depth {m['utility_full_depth']:.4f}",
        f"  mean encoder layers gate {m['layers_gate']:.2f}  oracle {m['layers_oracle']:.2f}  "
        f"full depth {m['layers_full_depth']:.0f}",
    ]


def format_step_c_report(out: StepCOutput) -> str:
    """Target histograms, held-out accuracy, output paths and wall time, as the CLI prints them."""
    r, m = out.result, out.result.metrics
    lines = [
        f"Step C: beta={r.beta:g} K_USER={r.k_user} loss={r.loss} exits={r.exits} "
        f"({m['num_records']} records, feature dim {m['feature_dim']})",
        f"Target exits, train ({m['train']['num_images']} images):",
        format_histogram(m["train"]["target_histogram"]),
    ]
    if m["heldout"].get("num_images"):
        lines += [f"Target exits, held-out ({m['heldout']['num_images']} images):",
                  format_histogram(m["heldout"]["target_histogram"]),
                  "Gate's exits, held-out:", format_histogram(m["heldout"]["pred_histogram"])]
    lines += _fmt_part("train", m["train"]) + _fmt_part("held-out", m["heldout"])
    lines += [f"wrote {key}: {path}" for key, path in out.paths.items()]
    t = out.timings
    lines.append(
        f"step C wall time {t['total_seconds']:.2f}s (load records {t['load_records_seconds']:.2f}s, "
        f"features {t['feature_seconds']:.2f}s, gate training {t['train_seconds']:.2f}s)"
    )
    return "\n".join(lines)
