"""Step B of ECO-M2F (papers/004 section 3.2): the derived dataset of per-image quality per exit.

Every training image goes once through backbone + encoder (layers run cumulatively); the
decoder branches off at every exit, and the image's PQ (SQ, RQ, things/stuff PQ, mIoU) at each
exit is recorded with the gate input z(s1). Records are appended atomically, one per image, so
a killed run resumes without redoing finished images; images are sharded across processes.

Per-image PQ uses the dataset PQ's matching restricted to the image (eco_m2f.evaluation.pq);
a category set with no segments on either side scores 1 (nothing to find, nothing falsely found).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _semantic_gt(dataset_dict: Dict[str, Any], ignore_label: int) -> Optional[np.ndarray]:
    """H x W contiguous class ids: the semantic PNG, or the panoptic PNG's segments."""
    from ..evaluation.pq import read_panoptic_png
    from ..evaluation.semantic import load_sem_seg_png

    if dataset_dict.get("sem_seg_file_name"):
        return load_sem_seg_png(dataset_dict["sem_seg_file_name"])
    if dataset_dict.get("pan_seg_file_name"):
        ids = read_panoptic_png(dataset_dict["pan_seg_file_name"])
        sem = np.full(ids.shape, ignore_label, dtype=np.int64)
        for seg in dataset_dict["segments_info"]:
            if not seg.get("iscrowd", 0):
                sem[ids == seg["id"]] = seg["category_id"]
        return sem
    return None


def image_record(
    dataset_dict: Dict[str, Any],
    outputs_per_exit: Dict[int, Dict[str, Any]],
    categories: Dict[int, Dict[str, Any]],
    num_classes: int,
    ignore_label: int = 255,
    feature: Optional[torch.Tensor] = None,
) -> Dict[str, Any]:
    """One derived record: the image's qualities at each exit (PQ etc. in [0, 1])."""
    from ..evaluation.pq import pq_for_model_output
    from ..evaluation.semantic import confusion_matrix, sem_seg_metrics

    exits = sorted(outputs_per_exit)
    rec: Dict[str, Any] = {
        "image_id": dataset_dict["image_id"],
        "file_name": os.path.basename(dataset_dict["file_name"]),
        "exits": exits,
    }
    cols: Dict[str, List[Optional[float]]] = {k: [] for k in ("pq", "sq", "rq", "pq_th", "pq_st", "miou")}
    sem_gt = _semantic_gt(dataset_dict, ignore_label)
    for k in exits:
        out = outputs_per_exit[k]
        stat = pq_for_model_output(out["panoptic_seg"], dataset_dict, categories)
        summary = stat.summary(categories)
        cols["pq"].append(summary["All"]["pq"])
        cols["sq"].append(summary["All"]["sq"])
        cols["rq"].append(summary["All"]["rq"])
        cols["pq_th"].append(summary["Things"]["pq"])
        cols["pq_st"].append(summary["Stuff"]["pq"])
        miou = None
        if sem_gt is not None and "sem_seg" in out:
            pred = out["sem_seg"].argmax(dim=0).cpu().numpy()
            conf = confusion_matrix(pred, sem_gt, num_classes, ignore_label, name=rec["file_name"])
            value = sem_seg_metrics(conf)["mIoU"]
            miou = None if np.isnan(value) else float(value) / 100.0
        cols["miou"].append(miou)
    rec.update(cols)
    if feature is not None:
        rec["feature"] = [round(float(x), 6) for x in feature.flatten().tolist()]
    return rec


def _shard(dicts: Sequence[Dict[str, Any]], rank: int, world_size: int) -> List[Dict[str, Any]]:
    return [d for i, d in enumerate(dicts) if i % world_size == rank]


def derive_shard(
    cfg,
    weights: str,
    out_dir: str,
    rank: int = 0,
    world_size: int = 1,
    device: Optional[str] = None,
    max_images: int = 0,
    progress: bool = True,
) -> int:
    """Write the records of this rank's share of the training images; returns how many were new."""
    from tqdm import tqdm

    from ..checkpoint import load_weights
    from ..data.build import MapDataset, SerializedList, get_detection_dataset_dicts, trivial_batch_collator
    from ..data.catalog import MetadataCatalog
    from ..data.mappers import build_test_mapper
    from ..architectures import build_model
    from ..evaluation.pq import panoptic_categories
    from .meta_arch import as_eco_config
    from .records import RecordWriter

    names = list(cfg.DATASETS.TRAIN)
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    if max_images:
        dicts = dicts[:max_images]
    writer = RecordWriter(out_dir, rank, world_size)
    done = writer.done_ids()
    todo = [d for d in _shard(dicts, rank, world_size) if d["image_id"] not in done]
    if not todo:
        writer.close()
        return 0

    if not cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON:
        raise ValueError("Step B needs panoptic predictions: set MODEL.MASK_FORMER.TEST.PANOPTIC_ON True")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # records hold PQ and mIoU only: no top-k instance masks at every exit
    model = build_model(as_eco_config(cfg, ["MODEL.DEVICE", device, "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False"]))
    if weights:
        load_weights(model, weights)
    model.eval()
    exits = list(model.eco_exits)
    meta = MetadataCatalog.get(names[0])
    categories = panoptic_categories(meta)
    ignore_label = int(meta.get("ignore_label", 255))

    mapper = build_test_mapper(cfg)
    loader = torch.utils.data.DataLoader(
        MapDataset(SerializedList(todo), mapper),
        batch_size=1,
        shuffle=False,
        num_workers=int(cfg.DATALOADER.NUM_WORKERS),
        collate_fn=trivial_batch_collator,
    )
    by_id = {d["image_id"]: d for d in todo}
    bar = tqdm(total=len(todo), desc=f"step B [{rank}/{world_size}]", position=rank, disable=not progress, dynamic_ncols=True)
    written = 0
    with writer:
        for batch in loader:
            results, z = model.predict_at_exits(batch, exits)
            for i, x in enumerate(batch):
                per_exit = {k: results[k][i] for k in exits}
                rec = image_record(by_id[x["image_id"]], per_exit, categories, model.num_classes, ignore_label, z[i])
                writer.append(rec)
                written += 1
            bar.update(len(batch))
    bar.close()
    return written


def _worker(local_rank: int, cfg, weights: str, out_dir: str, machine_rank: int, num_gpus: int, world_size: int, max_images: int) -> None:
    rank = machine_rank * num_gpus + local_rank
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    derive_shard(cfg, weights, out_dir, rank, world_size, device, max_images)


def derive_dataset(
    cfg,
    weights: str,
    out_dir: str,
    num_gpus: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    max_images: int = 0,
    config_file: str = "",
    opts: Sequence[str] = (),
) -> Dict[str, Any]:
    """Run step B on this machine's ``num_gpus`` shards, then summarise what is on disk."""
    from .records import format_summary, load_records, summarize, write_meta

    os.makedirs(out_dir, exist_ok=True)
    world_size = num_gpus * num_machines
    write_meta(
        out_dir,
        {
            "config_file": config_file,
            "weights": os.path.abspath(weights) if weights else "",
            "dataset": ",".join(cfg.DATASETS.TRAIN),
            "exits": list(cfg.MODEL.ECO.EXITS),
            "feature_dim": int(cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM),
            "pq_scale": "per-image PQ/SQ/RQ/mIoU in [0, 1]",
            "opts": list(opts),
        },
    )
    start = time.perf_counter()
    if num_gpus > 1:
        torch.multiprocessing.spawn(
            _worker, args=(cfg, weights, out_dir, machine_rank, num_gpus, world_size, max_images), nprocs=num_gpus
        )
    else:
        _worker(0, cfg, weights, out_dir, machine_rank, 1, world_size, max_images)
    elapsed = time.perf_counter() - start
    records = load_records(out_dir)
    summary = summarize(records)
    summary["wall_time_s"] = elapsed
    print(format_summary(summary))
    print(f"step B wall time: {elapsed:.1f} s for this run ({len(records)} records in {out_dir})")
    return summary
