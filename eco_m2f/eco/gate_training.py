"""ECO-M2F step C's learning problem: a linear gate on cached gate inputs (papers/004 section 3.3).

Everything but the gate is frozen and the gate input z(s1) does not depend on the encoder, so
step B caches z(s1) per image and the gate is a linear classifier trained on that cache:
seconds, and a new beta or K_user retrains only the gate. When the records carry no feature,
:func:`extract_features` computes z(s1) with a caller's ``gate_input(batched_inputs)`` (the frozen
model's pooled s1) over a data loader. :mod:`.step_c` turns this into files.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .exits import allowed_exits, check_exits
from .gate import ExitGate
from .gate_losses import get_gate_loss
from .records import feature_matrix, quality_matrix
from .targets import exit_histogram, targets, utility

__all__ = ["GateInput", "GateResult", "extract_features", "features_for_records", "split_indices", "train_gate"]

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
