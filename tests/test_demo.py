"""demo/demo.py and demo/visualize_dataset.py end to end with the tiny CPU model."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eco_m2f.config import setup_cfg
from eco_m2f.data import MetadataCatalog
from eco_m2f.data.io import read_image
from eco_m2f.data.mappers import build_test_mapper
from eco_m2f.architectures import build_model
from eco_m2f.visualization.inference import build_inference_model

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml")
ECO_TINY = str(REPO / "configs/synthetic/eco_m2f_tiny_cpu.yaml")  # the same network, with encoder exits
# keep every query of the untrained model, so the outputs have segments to compare
OPTS = TINY_OPTS + ["MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
                    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", "0.0"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"demo_{name}", REPO / "demo" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """An untrained tiny model whose queries are not all "no object", saved as a .pth."""
    torch.manual_seed(0)
    sd = build_model(setup_cfg(TINY, TINY_OPTS)).state_dict()
    sd["sem_seg_head.predictor.class_embed.bias"][-1] = -10.0
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save({"model": sd}, path)
    return str(path)


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    """True when ``needle`` appears pixel for pixel somewhere in ``haystack``."""
    h, w = needle.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(haystack, (h, w, 3))[:, :, 0]
    return bool((windows == needle).all(axis=(2, 3, 4)).any())


def test_demo_writes_png_and_json_equal_to_the_model_output(tiny_datasets, weights, tmp_path):
    from eco_m2f.evaluation.flops import count_flops

    val = tiny_datasets / "synthetic" / "images" / "val"
    out_dir = tmp_path / "out"
    opts = OPTS + ["MODEL.WEIGHTS", weights, "TEST.ECO.EXIT", "3"]
    rc = _script("demo").main(["--config-file", ECO_TINY, "--input", str(val / "00000[0-2].png"), "--output", str(out_dir),
                               "--confidence-threshold", "0.2", "--batch-size", "2", "--opts", *opts])
    assert rc == 0
    files = sorted(val.glob("00000[0-2].png"))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([f"{p.stem}.png" for p in files] + [f"{p.stem}.json" for p in files])

    cfg = setup_cfg(ECO_TINY, opts)
    model = build_inference_model(cfg)
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_classes
    mapper = build_test_mapper(cfg)
    inputs = [mapper({"file_name": str(p)}) for p in files]
    with torch.no_grad():
        outputs = model(inputs[:2]) + model(inputs[2:])
    counted = count_flops(model, model.preprocess_image(inputs[:1]).tensor, {"exit": 3})
    total_segments = 0
    for path, out in zip(files, outputs):
        record = json.loads((out_dir / f"{path.stem}.json").read_text())
        assert (record["height"], record["width"], record["drawn"]) == (64, 64, "panoptic_seg")
        ids, info = out["panoptic_seg"]
        ids = ids.numpy()
        expected = [{"id": s["id"], "category_id": s["category_id"], "class_name": names[s["category_id"]],
                     "isthing": s["isthing"], "area": int((ids == s["id"]).sum()), "bbox": _box(ids == s["id"])}
                    for s in info]
        assert record["panoptic_seg"] == expected
        total_segments += len(expected)
        inst = out["instances"]
        keep = inst["scores"] >= 0.2
        got = record["instances"]
        assert [g["category_id"] for g in got] == inst["pred_classes"][keep].tolist()
        assert [g["score"] for g in got] == pytest.approx(inst["scores"][keep].tolist())
        assert [g["area"] for g in got] == inst["pred_masks"][keep].flatten(1).sum(1).tolist()
        assert sum(s["area"] for s in record["sem_seg"]) == 64 * 64
        assert record["cost"]["exit"] == 3 and out["cost"]["exit"] == 3
        assert record["cost"]["gflops"] == pytest.approx(counted["total"])
        assert record["cost"]["gflops_encoder"] == pytest.approx(counted["encoder"])
        png = np.asarray(Image.open(out_dir / f"{path.stem}.png"))
        assert png.ndim == 3 and png.shape[2] == 3 and png.shape[0] > 64 and png.shape[1] >= 64
    assert total_segments > 0


def _write_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of every kind the demo reads, plus a corrupt one and a text file; name -> (H, W) as seen."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "rgb.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (32, 48), dtype=np.uint8), mode="L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (36, 28, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    rotated = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # stored 24 high, 40 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(folder / "exif.jpg", exif=exif, quality=95)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    (folder / "notes.txt").write_text("not an image")
    return {"rgb": (40, 56), "gray": (32, 48), "rgba": (36, 28), "exif": (40, 24)}


def test_demo_bad_inputs_are_skipped_and_named(tmp_path, capsys, caplog):
    images = tmp_path / "images"
    sizes = _write_inputs(images)
    out_dir = tmp_path / "out"
    torch.manual_seed(0)
    # no MODEL.WEIGHTS; nothing passes an object threshold of 1, so each result is the image itself
    argv = ["--config-file", TINY, "--input", str(images), str(tmp_path / "missing.jpg"), str(images / "notes.txt"),
            "--output", str(out_dir), "--no-gflops", "--batch-size", "3",
            "--opts", *TINY_OPTS, "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "1.0"]
    with caplog.at_level(logging.WARNING):
        rc = _script("demo").main(argv)
    assert rc == 1
    assert any("untrained" in r.getMessage() for r in caplog.records)
    err = capsys.readouterr().err
    assert "3 inputs failed" in err
    for culprit in ("broken.png", "missing.jpg", "notes.txt"):
        assert culprit in err
    assert "rgb.jpg:" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{n}.{e}" for n in sizes for e in ("png", "json"))
    for name, (h, w) in sizes.items():
        record = json.loads((out_dir / f"{name}.json").read_text())
        assert (record["height"], record["width"]) == (h, w) and record["panoptic_seg"] == []
        assert sum(s["area"] for s in record["sem_seg"]) == h * w
        picture = np.asarray(Image.open(out_dir / f"{name}.png"))
        source = next(images.glob(f"{name}.*"))
        assert _contains(picture, read_image(source)), f"{name}: the drawn result does not show the image as read"
    exif_seen = read_image(images / "exif.jpg")
    assert exif_seen.shape == (40, 24, 3)
    assert np.array_equal(exif_seen, np.asarray(Image.open(images / "exif.jpg").convert("RGB")).transpose(1, 0, 2)[:, ::-1])


def test_visualize_dataset_renders_input_truth_and_prediction(tiny_datasets, weights, tmp_path):
    out = tmp_path / "fig.png"
    rc = _script("visualize_dataset").main(["--config-file", TINY, "--weights", weights, "--num", "2",
                                            "--min-size", "64", "--output", str(out), "--opts", *OPTS])
    assert rc == 0
    fig = np.asarray(Image.open(out))
    val = sorted((tiny_datasets / "synthetic" / "images" / "val").glob("*.png"))
    assert _contains(fig, read_image(val[0])) and _contains(fig, read_image(val[1]))
    assert not _contains(fig, read_image(val[2]))
    assert fig.shape[0] > 2 * 64 and fig.shape[1] > 3 * 64
    small = tmp_path / "small.jpg"
    rc = _script("visualize_dataset").main(["--config-file", TINY, "--weights", weights, "--num", "2", "--min-size", "64",
                                            "--max-width", "200", "--output", str(small), "--opts", *OPTS])
    assert rc == 0
    with Image.open(small) as im:
        assert im.format == "JPEG" and fig.shape[1] > 200 and im.size == (200, round(fig.shape[0] * 200 / fig.shape[1]))


PAUMER_TINY = str(REPO / "configs/synthetic/paumer_tiny_cpu.yaml")
DOVIT_TINY = str(REPO / "configs/synthetic/dovit_tiny_cpu.yaml")
SEGMENTER_TINY = str(REPO / "configs/synthetic/segmenter_tiny_cpu.yaml")


def _random_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return sorted(folder.glob("*.png"))


@pytest.mark.parametrize("config", [PAUMER_TINY, DOVIT_TINY], ids=["paumer", "dovit"])
def test_show_tokens_draws_the_token_maps_of_the_pass_beside_the_result(config, tmp_path):
    from eco_m2f.visualization.cost import cost_record
    from eco_m2f.visualization.token_maps import model_token_maps, token_map_panels

    torch.manual_seed(0)
    path = tmp_path / "model.pth"
    torch.save({"model": build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"])).state_dict()}, path)
    opts = ["MODEL.WEIGHTS", str(path)]
    # mapped to 128 x 179 (12 cells wide, the last one partly padding) and 128 x 128 (8 of the
    # batch's 12 cells wide): one batch, padded to 128 x 192
    files = _random_images(tmp_path / "images", {"a_wide": (40, 56), "b_square": (64, 64)})
    plain, shown = tmp_path / "plain", tmp_path / "shown"
    demo = _script("demo")
    common = ["--config-file", config, "--input", str(tmp_path / "images"), "--batch-size", "2", "--opts", *opts]
    assert demo.main(["--output", str(plain), *common]) == 0
    assert demo.main(["--output", str(shown), "--show-tokens", *common]) == 0

    cfg = setup_cfg(config, opts)
    model = build_inference_model(cfg)
    mapper = build_test_mapper(cfg)
    inputs = [mapper({"file_name": str(p)}) for p in files]
    assert [tuple(x["image"].shape[-2:]) for x in inputs] == [(128, 179), (128, 128)]
    outputs = model(inputs)
    maps, padded = model_token_maps(model, inputs)
    assert padded == (128, 192)
    depth = cfg.MODEL.VIT.DEPTH
    labels = maps[0]["blocks"].labels
    for k, (file, out) in enumerate(zip(files, outputs)):
        without = np.asarray(Image.open(plain / f"{file.stem}.png"))
        picture = np.asarray(Image.open(shown / f"{file.stem}.png"))
        assert picture.shape[1] > without.shape[1] + file_width(file)  # a map panel at least the image's width
        image = read_image(file, "RGB")
        panels = token_map_panels(maps[k], image, tuple(inputs[k]["image"].shape[-2:]), padded)
        assert [p.title for p in panels] == ["blocks per token"]
        assert _contains(picture, panels[0].image), f"{file.stem}: the token map of the pass is not drawn"
        assert not _contains(without, panels[0].image)

        record = json.loads((shown / f"{file.stem}.json").read_text())
        assert "token_maps" not in json.loads((plain / f"{file.stem}.json").read_text())
        assert record["cost"] == cost_record(out)  # tokens per block, GFLOPs per scope: the model's own
        assert record["cost"]["gflops"] > 0 and len(record["cost"]["tokens"]) == depth
        counts = record["token_maps"]["blocks per token"]
        assert set(counts) <= set(labels.values())
        cells = 8 * (12 if k == 0 else 8)
        assert sum(counts.values()) == cells
        if k == 0:  # the image covers the whole grid: its map and its cost record count the same tokens
            tokens = record["cost"]["tokens"]
            assert counts.get(labels[depth], 0) == record["cost"]["final_tokens"] == tokens[-1]
            for layer in range(1, depth):
                left = sum(n for v, text in labels.items() if v <= layer for t, n in counts.items() if t == text)
                assert left == cells - tokens[layer]


def file_width(path: Path) -> int:
    with Image.open(path) as im:
        return im.width


def test_show_tokens_without_token_maps_warns_once_and_writes_the_plain_result(tmp_path, caplog):
    files = _random_images(tmp_path / "images", {"x": (48, 40)})
    outs = []
    for flag in ([], ["--show-tokens"]):
        out = tmp_path / f"out{len(flag)}"
        caplog.clear()
        torch.manual_seed(0)  # no weights: the same random model both times
        with caplog.at_level(logging.WARNING):
            assert _script("demo").main(["--config-file", SEGMENTER_TINY, "--input", str(files[0]), "--output", str(out),
                                         *flag, "--opts", "MODEL.DEVICE", "cpu"]) == 0
        warned = [r.getMessage() for r in caplog.records if "token maps" in r.getMessage().lower()]
        outs.append(out)
    assert len(warned) == 1 and "Segmenter records none" in warned[0] and "\n" not in warned[0]
    assert np.array_equal(np.asarray(Image.open(outs[0] / "x.png")), np.asarray(Image.open(outs[1] / "x.png")))
    assert (outs[0] / "x.json").read_text() == (outs[1] / "x.json").read_text()


def test_demo_draws_the_policy_networks_superpatches(tmp_path):
    from eco_m2f.modeling.policy import superpatch_grid
    from eco_m2f.visualization.policy import policy_panel

    config = str(REPO / "configs/synthetic/cts_policy_tiny_cpu.yaml")
    files = _random_images(tmp_path / "images", {"p": (40, 56)})
    torch.manual_seed(0)
    path = tmp_path / "policy.pth"
    torch.save({"model": build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"])).state_dict()}, path)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(path)]
    out_dir = tmp_path / "out"
    assert _script("demo").main(["--config-file", config, "--input", str(files[0]), "--output", str(out_dir), "--opts", *opts]) == 0
    cfg = setup_cfg(config, opts)
    model = build_inference_model(cfg)
    x = build_test_mapper(cfg)({"file_name": str(files[0])})
    with torch.no_grad():
        out = model([x])[0]
    record = json.loads((out_dir / "p.json").read_text())
    rows, cols = superpatch_grid(*x["image"].shape[-2:])
    assert record["drawn"] == "policy" and (record["policy"]["rows"], record["policy"]["cols"]) == (rows, cols)
    assert np.allclose(record["policy"]["scores"], out["policy"].numpy(), atol=5e-5)
    assert record["policy"]["shared"] == int((out["policy"] >= 0.5).sum())
    assert record["cost"]["gflops"] > 0
    panel = policy_panel(out["policy"], read_image(files[0], "RGB"), tuple(x["image"].shape[-2:]))
    assert _contains(np.asarray(Image.open(out_dir / "p.png")), panel.image)


def test_demo_reads_each_image_only_when_its_batch_comes(tmp_path, monkeypatch):
    import eco_m2f.visualization.demo as demo_lib

    files = _random_images(tmp_path / "images", {f"im{i:02d}": (32, 40) for i in range(7)})
    events: list[str] = []
    make_mapper = demo_lib.build_test_mapper

    def counting_mapper(cfg):
        mapper = make_mapper(cfg)

        def read(record):
            events.append("read")
            return mapper(record)
        return read

    monkeypatch.setattr(demo_lib, "build_test_mapper", counting_mapper)
    cfg = setup_cfg(TINY, TINY_OPTS)
    torch.manual_seed(0)
    model = build_inference_model(cfg)
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    report = demo_lib.run_demo(cfg, model, [str(tmp_path / "images")], str(tmp_path / "out"), batch_size=3,
                               count_gflops=False, progress=False)
    assert len(report.written) == len(files) and not report.failures
    # read 3, run 3, read 3, run 3, read 1, run 1: never more than one batch of images held
    assert events == ["read"] * 3 + ["forward"] + ["read"] * 3 + ["forward"] + ["read", "forward"]
