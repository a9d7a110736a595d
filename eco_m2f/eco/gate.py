"""ECO-M2F step C: train the gating network on the derived dataset (papers/004 section 3.3).

Everything but the gate is frozen and the gate input z(s1) does not depend on the encoder, so
step B caches z(s1) per image and step C is a linear classifier trained on that cache: seconds,
and a new beta or K_user retrains only the gate. When the records carry no feature, the caller
supplies a ``gate_input(batched_inputs) -> Tensor[B, C]`` callable (the frozen model's pooled
s1) and :func:`extract_features` runs it over a data loader once; the result is cached beside the
records for the next run.

:func:`train_gate` is the model-agnostic core; :func:`run_step_c` adds the files: ``gate.pth``,
``metrics.json``, ``model_gated.pth`` (step-A weights + ``gate.*``) and a ``config.yaml`` that
evaluates the gated model.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoint import load_state_dict_file, load_weights, save_checkpoint
from ..modeling.gating import ExitGate
from .gate_losses import get_gate_loss
from .records import feature_matrix, load_records, quality_matrix, read_meta
from .targets import allowed_exits, check_exits, exit_histogram, format_histogram, targets, utility

__all__ = [
    "GateResult",
    "StepCOutput",
    "split_indices",
    "train_gate",
    "extract_features",
    "features_for_records",
    "gate_output_dir",
    "run_step_c",
    "format_step_c_report",
]

logger = logging.getLogger(__name__)

FEATURE_CACHE = "gate_features.npz"
GateInput = Callable[[List[Dict[str, Any]]], torch.Tensor]


# ----------------------------------------------------------------------------------------- training
@dataclass
class GateResult:
    """A trained gate, what it was trained for, and how it does on the derived records."""

    gate: ExitGate
    exits: List[int]  # allowed exits = the gate's logits, in order
    all_exits: List[int]  # every exit of the records used (full depth = the last)
    beta: float
    k_user: int
    loss: str
    metrics: Dict[str, Any]
    train_index: np.ndarray = field(repr=False)
    heldout_index: np.ndarray = field(repr=False)


def split_indices(image_ids: Sequence[Any], val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic train / held-out split: a seeded permutation of the records ordered by image id.

    Ordering by id first makes the split depend on the set of images, not on the order of the list.
    At least one image stays in each part when ``val_fraction`` > 0 and there are two or more images.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"MODEL.ECO.GATE.VAL_FRACTION must be in [0, 1); got {val_fraction}")
    n = len(image_ids)
    if n == 0:
        raise ValueError("no derived records to train the gate on")
    by_id = sorted(range(n), key=lambda i: (isinstance(image_ids[i], str), image_ids[i]))
    perm = np.asarray(by_id)[np.random.default_rng(seed).permutation(n)]
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _split_metrics(
    gate: ExitGate, z: torch.Tensor, q: np.ndarray, t_idx: np.ndarray, allowed: List[int],
    all_exits: List[int], beta: float,
) -> Dict[str, Any]:
    """What the gate's choices are worth on one split, next to full depth and the oracle targets."""
    if len(t_idx) == 0:
        return {"num_images": 0}
    with torch.no_grad():
        pred_idx = gate(z).argmax(dim=1).cpu().numpy()  # index into allowed
    u_all = utility(q, all_exits, beta)  # [N, |all_exits|]
    col = {k: j for j, k in enumerate(all_exits)}
    allowed_cols = np.asarray([col[k] for k in allowed])
    rows = np.arange(len(t_idx))
    chosen_cols, target_cols, full = allowed_cols[pred_idx], allowed_cols[t_idx], len(all_exits) - 1
    layers_pred = np.asarray(allowed)[pred_idx]
    return {
        "num_images": int(len(t_idx)),
        "accuracy": float(np.mean(pred_idx == t_idx)),
        "target_histogram": exit_histogram(t_idx, allowed, as_index=True),
        "pred_histogram": exit_histogram(pred_idx, allowed, as_index=True),
        "pq_gate": float(q[rows, chosen_cols].mean()),
        "pq_oracle": float(q[rows, target_cols].mean()),
        "pq_full_depth": float(q[:, full].mean()),
        "utility_gate": float(u_all[rows, chosen_cols].mean()),
        "utility_oracle": float(u_all[rows, target_cols].mean()),
        "utility_full_depth": float(u_all[:, full].mean()),
        "layers_gate": float(layers_pred.mean()),
        "layers_oracle": float(np.asarray(allowed)[t_idx].mean()),
        "layers_full_depth": float(all_exits[-1]),
    }


def _fit(gate: ExitGate, opt: torch.optim.Optimizer, loss_fn: Callable, z: torch.Tensor, u: torch.Tensor,
         t: torch.Tensor, train_idx: torch.Tensor, epochs: int, batch_size: int, gen: torch.Generator,
         dev: torch.device) -> float:
    """Minibatch Adam epochs over ``train_idx``; returns the mean loss of the last epoch."""
    last_loss = float("nan")
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total, count = torch.zeros((), device=dev), 0  # summed on the device: no sync per step
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size].to(dev)
            value = loss_fn(gate(z[idx]), u[idx], t[idx])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.detach() * len(idx)
            count += len(idx)
        last_loss = float(total) / max(count, 1)
    return last_loss


def train_gate(
    records: Sequence[Mapping[str, Any]],
    beta: float,
    k_user: int,
    exits: Sequence[int],
    loss: str = "hard-CE",
    epochs: int = 50,
    lr: float = 1e-3,
    batch_size: int = 64,
    val_fraction: float = 0.1,
    seed: int = 0,
    features: Optional[np.ndarray] = None,
    device: str | torch.device = "cpu",
) -> GateResult:
    """Train ExitGate with Adam on the records' cached features (or ``features`` [N, C] aligned
    with ``records``); targets t = argmax_{k in exits, k <= k_user} (q_k - beta k), ties -> smaller k.

    ``exits`` are the encoder exits whose PQ columns are read from the records; the gate gets one
    logit per allowed exit. Metrics cover the training part and the held-out part of the records.
    """
    t0 = time.perf_counter()
    all_exits = check_exits(exits, name="MODEL.ECO.EXITS")
    allowed = allowed_exits(all_exits, k_user)
    loss_fn = get_gate_loss(loss)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need EPOCHS >= 1, BATCH_SIZE >= 1, LR > 0; got {epochs}, {batch_size}, {lr}")
    if features is None:
        features = feature_matrix(records)
        if features is None:
            raise ValueError(
                "the derived records carry no 'feature' (z(s1)); pass features from extract_features()"
            )
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(records):
        raise ValueError(f"features must be [N={len(records)}, C]; got shape {features.shape}")

    q = quality_matrix(records, all_exits, "pq")  # [N, |all_exits|]
    t_idx = targets(q, all_exits, beta, k_user)  # [N] index into allowed
    u = utility(q[:, : len(allowed)], allowed, beta)  # [N, |allowed|]
    train_i, val_i = split_indices([r["image_id"] for r in records], val_fraction, seed)
    if len(train_i) == 0:
        raise ValueError("no records left to train on after the held-out split")

    dev = torch.device(device)
    z = torch.from_numpy(features).to(dev)
    u_t = torch.from_numpy(u.astype(np.float32)).to(dev)
    t_t = torch.from_numpy(t_idx).to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gate = ExitGate(features.shape[1], allowed).to(dev)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    gate.train()
    # The batches are tiny ([B, C] x [C, |E|]): on a CPU, intra-op threads only add synchronisation
    # (measured 15x slower with 2 threads on a busy machine), so train on one thread.
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        last_loss = _fit(gate, opt, loss_fn, z, u_t, t_t, torch.from_numpy(train_i), int(epochs),
                         int(batch_size), gen, dev)
    finally:
        torch.set_num_threads(threads)
    gate.eval()
    train_seconds = time.perf_counter() - t0

    def part(ix: np.ndarray) -> Dict[str, Any]:
        return _split_metrics(gate, z[torch.from_numpy(ix).to(dev)], q[ix], t_idx[ix], allowed, all_exits, beta)

    metrics = {
        "beta": float(beta),
        "k_user": int(k_user),
        "loss": loss,
        "exits": allowed,
        "all_exits": all_exits,
        "epochs": int(epochs),
        "lr": float(lr),
        "batch_size": int(batch_size),
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "feature_dim": int(features.shape[1]),
        "final_train_loss": last_loss,
        "train_seconds": train_seconds,
        "train": part(train_i),
        "heldout": part(val_i),
    }
    gate = gate.cpu()
    return GateResult(gate, allowed, all_exits, float(beta), int(k_user), loss, metrics, train_i, val_i)


# ------------------------------------------------------------------------------------------ features
@torch.no_grad()
def extract_features(
    gate_input: GateInput,
    data_loader: Iterable[List[Dict[str, Any]]],
    image_ids: Optional[Iterable[Any]] = None,
    progress: bool = True,
) -> Dict[Any, np.ndarray]:
    """z(s1) per image id, by calling ``gate_input(batched_inputs) -> Tensor[B, C]`` on each batch.

    ``gate_input`` is the frozen model's pooled gate input (backbone + input projection + pooling);
    this loop knows nothing else about the model. With ``image_ids`` only those images are run,
    and the loop stops once all are seen.
    """
    wanted = None if image_ids is None else set(image_ids)
    out: Dict[Any, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        total = len(wanted) if wanted is not None else (len(data_loader) if hasattr(data_loader, "__len__") else None)
        bar = tqdm(total=total, desc="gate features", unit="img")
    try:
        for batch in data_loader:
            if wanted is not None:
                batch = [x for x in batch if x["image_id"] in wanted and x["image_id"] not in out]
            if not batch:
                continue
            z = gate_input(batch)
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != len(batch):
                shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"gate_input must return a Tensor [B={len(batch)}, C]; got {shape}")
            z = z.detach().float().cpu().numpy()
            for inp, zi in zip(batch, z):
                out[inp["image_id"]] = zi
            if bar is not None:
                bar.update(len(batch))
            if wanted is not None and len(out) >= len(wanted):
                break
    finally:
        if bar is not None:
            bar.close()
    return out


def features_for_records(records: Sequence[Mapping[str, Any]], feature_map: Mapping[Any, np.ndarray]) -> np.ndarray:
    """[N, C] features aligned with ``records``; error naming the image ids that have none."""
    missing = [r["image_id"] for r in records if r["image_id"] not in feature_map]
    if missing:
        raise ValueError(f"no gate feature for {len(missing)} records, e.g. image ids {missing[:10]}")
    return np.stack([np.asarray(feature_map[r["image_id"]], dtype=np.float32) for r in records])


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
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.npz")
    np.savez(tmp, image_ids=np.asarray(json.dumps(ids)), weights=np.asarray(weights),
             features=np.stack([feature_map[i] for i in ids]).astype(np.float32))
    os.replace(tmp, path)


def _model_feature_source(cfg: Any, weights: str, dataset: str) -> Tuple[GateInput, Iterable]:
    """The frozen model's ``gate_input`` and a test-mode loader over ``dataset`` (lazy imports:
    only needed when step B cached no features)."""
    from ..data import build_detection_test_loader
    from ..modeling import build_model

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


def gate_output_dir(derived_dir: str | os.PathLike, beta: float, k_user: int) -> Path:
    """DERIVED_DIR/gate_beta{beta}_k{k_user}."""
    return Path(derived_dir) / f"gate_beta{float(beta):g}_k{int(k_user)}"


def _resolve_weights(weights: str, derived_dir: Path) -> Optional[Path]:
    if not weights:
        return None
    for cand in (Path(weights), derived_dir / weights):
        if cand.is_file() and os.access(cand, os.R_OK):
            return cand.resolve()
    return None


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    config.yaml in ``output_dir`` (default DERIVED_DIR/gate_beta{beta}_k{k_user}).

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
    weights_path = _resolve_weights(weights_name, derived)
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

    out = Path(output_dir) if output_dir is not None else gate_output_dir(derived, beta, k_user)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    paths: Dict[str, Path] = {"gate": out / "gate.pth", "metrics": out / "metrics.json", "config": out / "config.yaml"}
    gate_sd = result.gate.state_dict()
    _atomic_torch_save(
        {"gate": gate_sd, "exits": result.exits, "beta": result.beta, "k_user": result.k_user,
         "loss": result.loss, "metrics": result.metrics},
        paths["gate"],
    )

    eval_overrides = [
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
    _atomic_write_text(paths["config"], eval_cfg.dump())

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
    _atomic_write_text(paths["metrics"], json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
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
