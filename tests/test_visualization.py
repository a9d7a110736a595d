"""Drawing of results, label grids, figures, cost notes and the evaluation's pictures (no model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eco_m2f.config import setup_cfg
from eco_m2f.data import MetadataCatalog
from eco_m2f.data.io import read_image, read_png_ids
from eco_m2f.visualization.classes import ClassPalette
from eco_m2f.visualization.cost import cost_notes, cost_record
from eco_m2f.visualization.drawing import draw_layer
from eco_m2f.visualization.label_grid import GridLabel, label_grid_panel
from eco_m2f.visualization.panels import Panel, render_figure
from eco_m2f.visualization.segments import instance_layer, panoptic_layer, semantic_layer

from conftest import TINY_OPTS

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/synthetic/maskformer2_tiny_cpu.yaml")


def _half(base: int, color: np.ndarray) -> np.ndarray:
    """Pixel filled with weight 1/2: the mean of image and colour, halves rounded up."""
    return (base + color.astype(int) + 1) // 2


@pytest.fixture
def synthetic_classes() -> ClassPalette:
    return ClassPalette.from_metadata(MetadataCatalog.get("synthetic_panoptic_val"))


def test_palette_comes_from_the_catalog(synthetic_classes):
    meta = MetadataCatalog.get("synthetic_panoptic_val")
    assert synthetic_classes.names == tuple(meta.stuff_classes)
    assert synthetic_classes.colors.tolist() == [list(c) for c in meta.stuff_colors]
    things = sorted(meta.thing_dataset_id_to_contiguous_id.values())
    assert [i for i, t in enumerate(synthetic_classes.is_thing) if t] == things
    inst = ClassPalette.from_metadata(MetadataCatalog.get("synthetic_cityscapes_fine_instance_seg_val"))
    assert inst.names == tuple(MetadataCatalog.get("synthetic_cityscapes_fine_instance_seg_val").thing_classes)
    assert all(inst.is_thing)
    with pytest.raises(ValueError, match="neither stuff_classes nor thing_classes"):
        ClassPalette.from_metadata(MetadataCatalog.get("no_such_dataset_for_the_palette"))


def test_panoptic_drawing_puts_class_colours_on_the_right_pixels(synthetic_classes):
    road, car = synthetic_classes.names.index("road"), synthetic_classes.names.index("car")
    image = np.full((20, 20, 3), 100, dtype=np.uint8)
    ids = np.zeros((20, 20), dtype=np.int32)
    ids[:10] = 7  # road (stuff)
    ids[10:, :10] = 1001  # a car
    ids[10:, 10:] = 55  # an id that segments_info does not list: void
    info = [{"id": 7, "category_id": road, "isthing": False}, {"id": 1001, "category_id": car, "isthing": True}]
    layer = panoptic_layer((torch.from_numpy(ids), info), synthetic_classes)
    panel = draw_layer(image, layer, synthetic_classes, alpha=0.5, thickness=1, title="t")
    out = panel.image
    road_c, car_c = synthetic_classes.colors[road], synthetic_classes.colors[car]
    assert out[4, 5].tolist() == _half(100, road_c).tolist()  # inside the road
    assert out[0, 5].tolist() == _half(100, road_c).tolist()  # the image border is no edge
    assert out[15, 4].tolist() == _half(100, car_c).tolist()  # inside the car
    assert out[9, 5].tolist() == (road_c // 2).tolist()  # road pixel next to the car: road's outline
    assert out[10, 5].tolist() == (car_c // 2).tolist()  # car pixel next to the road: car's outline
    assert out[9, 15].tolist() == (road_c // 2).tolist()  # road next to void
    assert out[15, 15].tolist() == [100, 100, 100]  # void keeps the image
    assert [(e.label, e.color) for e in panel.legend] == [("road", tuple(road_c.tolist())), ("car (1)", tuple(car_c.tolist()))]
    assert [(s.id, s.area, s.bbox) for s in layer.segments] == [(7, 200, (0, 0, 20, 10)), (1001, 100, (0, 10, 10, 10))]
    bad = [{"id": 7, "category_id": 99, "isthing": False}]
    with pytest.raises(ValueError, match="class id 99"):
        panoptic_layer((ids, bad), synthetic_classes)


def test_semantic_and_instance_layers(synthetic_classes):
    scores = torch.zeros(len(synthetic_classes), 6, 8)
    scores[2, :, :3] = 1.0  # class 2 in columns 0..2, class 5 elsewhere
    scores[5, :, 3:] = 1.0
    sem = semantic_layer(scores, synthetic_classes)
    assert [(s.category_id, s.area, s.bbox) for s in sem.segments] == [(2, 18, (0, 0, 3, 6)), (5, 30, (3, 0, 5, 6))]
    assert set(np.unique(sem.index_map).tolist()) == {1, 2}
    labels = np.full((6, 8), 255)
    labels[1, 1] = 0
    assert [(s.category_id, s.area) for s in semantic_layer(labels, synthetic_classes).segments] == [(0, 1)]

    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0] = True  # large, best score
    masks[1, 2:4, 2:5] = True  # small, on top of the large one
    masks[2, 0, 0] = True  # below the threshold
    inst = {"pred_masks": masks, "scores": torch.tensor([0.9, 0.8, 0.1]), "pred_classes": torch.tensor([4, 5, 6])}
    layer = instance_layer(inst, synthetic_classes, score_threshold=0.5)
    assert [(s.id, s.category_id, s.area, s.bbox) for s in layer.segments] == [(1, 4, 48, (0, 0, 8, 6)), (2, 5, 6, (2, 2, 3, 2))]
    assert layer.segments[0].score == pytest.approx(0.9)
    assert layer.index_map[2, 2] == 2 and layer.index_map[0, 0] == 1  # the small one stays visible


def test_label_grid_panel_beside_a_result():
    grid = np.array([[0, 0, 1, 2], [0, 1, 1, 2], [2, 2, 2, 0]])
    labels = [GridLabel(0, "kept", (255, 255, 255)), GridLabel(1, "paused at layer 3", (230, 120, 0)),
              GridLabel(2, "shared 4x4", (0, 120, 230)), GridLabel(3, "pruned at layer 8", (0, 0, 0))]
    panel = label_grid_panel(grid, labels, size=(30, 40), title="stage 1")
    img = panel.image
    assert img.shape == (30, 40, 3)
    for i in range(3):
        for j in range(4):  # every cell's inside in its label's colour
            assert img[10 * i + 5, 10 * j + 5].tolist() == list(labels[grid[i, j]].color)
    assert img[10, 5].tolist() == [40, 40, 40] and img[5, 20].tolist() == [40, 40, 40]  # cell lines
    assert [e.label for e in panel.legend] == ["kept (4)", "paused at layer 3 (3)", "shared 4x4 (5)"]

    image = np.full((30, 40, 3), 100, dtype=np.uint8)
    over = label_grid_panel(grid, labels, image=image, alpha=0.5, cell_lines=False).image
    assert over[25, 35].tolist() == [178, 178, 178]  # "kept" (white) half over grey 100
    assert over[5, 25].tolist() == _half(100, np.array([230, 120, 0])).tolist()
    with pytest.raises(ValueError, match=r"values \[7\]"):
        label_grid_panel(np.array([[0, 7]]), labels)

    result = Panel(np.zeros((30, 40, 3), dtype=np.uint8), "prediction", ["encoder exit: layer 3"])
    fig = render_figure([[result, panel]])
    for p, (x, y, w, h) in zip((result, panel), fig.boxes[0]):
        assert np.array_equal(fig.image[y:y + h, x:x + w], p.image)
    assert fig.boxes[0][1][0] > fig.boxes[0][0][0] + 40  # side by side


def test_figure_rows_scale_exactly():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    b = np.full((4, 2, 3), 7, dtype=np.uint8)
    fig = render_figure([[Panel(a, "a"), Panel(b)], [Panel(b, notes=["n"])]], scale=3)
    assert len(fig.boxes) == 2 and len(fig.boxes[0]) == 2 and len(fig.boxes[1]) == 1
    x, y, w, h = fig.boxes[0][0]
    assert (w, h) == (9, 6) and np.array_equal(fig.image[y:y + h, x:x + w], a.repeat(3, 0).repeat(3, 1))
    x, y, w, h = fig.boxes[1][0]
    assert (w, h) == (6, 12) and y > fig.boxes[0][1][1] + 12 and (fig.image[y:y + h, x:x + w] == 7).all()


def test_cost_record_and_its_notes():
    assert cost_record({"cost": {"exit": torch.tensor(2)}}) == {"exit": 2}
    assert cost_record({"sem_seg": None}) is None
    assert cost_record({"cost": {"tokens": torch.tensor([3, 4])}}) == {"tokens": [3, 4]}
    assert cost_notes({"exit": 3, "gflops_encoder": 2.0145, "gflops": 13.8, "tokens": 812}) == [
        "encoder exit: layer 3", "GFLOPs: 13.80", "encoder GFLOPs: 2.01", "tokens: 812"]
    # the demo's and the evaluation's prediction panel writes them under the result
    from eco_m2f.visualization.drawing import prediction_panel

    classes = ClassPalette.generic(3)
    layers = {"sem_seg": semantic_layer(np.zeros((4, 4), dtype=np.int64), classes)}
    panel = prediction_panel(np.zeros((4, 4, 3), dtype=np.uint8), layers, classes, cost={"exit": 2, "gflops_encoder": 1.5})
    assert panel.notes == ["encoder exit: layer 2", "encoder GFLOPs: 1.50"]


def test_visualization_evaluator_saves_the_first_n(tiny_datasets, tmp_path):
    from eco_m2f.data import DatasetCatalog
    from eco_m2f.data.mappers import build_test_mapper
    from eco_m2f.visualization.comparison import comparison_panels
    from eco_m2f.visualization.evaluator import build_visualization_evaluator

    name = "synthetic_panoptic_val"
    cfg = setup_cfg(TINY, TINY_OPTS + ["OUTPUT_DIR", str(tmp_path)])
    assert build_visualization_evaluator(cfg, name, None) is None  # TEST.VIS_NUM_IMAGES 0: off
    cfg = setup_cfg(TINY, TINY_OPTS + ["OUTPUT_DIR", str(tmp_path), "TEST.VIS_NUM_IMAGES", "2"])
    evaluator = build_visualization_evaluator(cfg, name, None)
    mapper = build_test_mapper(cfg)
    inputs = [mapper(d) for d in DatasetCatalog.get(name)[:3]]
    # the ground truth as the prediction: both panels must then be the same picture
    outputs = [{"panoptic_seg": (torch.from_numpy(read_png_ids(x["pan_seg_file_name"])), x["segments_info"]),
                "cost": {"exit": 4}} for x in inputs]
    evaluator.reset()
    evaluator.process(inputs[:2], outputs[:2])
    evaluator.process(inputs[2:], outputs[2:])
    assert evaluator.evaluate() == {}
    vis = tmp_path / "inference" / name / "vis"
    written = sorted(p.name for p in vis.iterdir())
    assert written == sorted(Path(x["file_name"]).stem + ".png" for x in inputs[:2])
    classes = ClassPalette.from_metadata(MetadataCatalog.get(name))
    x = inputs[0]
    saved = np.asarray(Image.open(vis / (Path(x["file_name"]).stem + ".png")).convert("RGB"))
    fig = render_figure([comparison_panels(x, outputs[0], classes)])
    assert np.array_equal(saved, fig.image)
    (xi, yi, w, h), (xg, yg, _, _), (xp, yp, _, _) = fig.boxes[0]
    assert np.array_equal(saved[yi:yi + h, xi:xi + w], read_image(x["file_name"]))
    assert np.array_equal(saved[yg:yg + h, xg:xg + w], saved[yp:yp + h, xp:xp + w])
    assert not np.array_equal(saved[yg:yg + h, xg:xg + w], saved[yi:yi + h, xi:xi + w])


def test_save_picture_png_is_exact_and_jpeg_by_name(tmp_path):
    from eco_m2f.visualization.panels import save_picture

    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    save_picture(tmp_path / "a" / "x.png", image)
    save_picture(tmp_path / "b" / "x.jpg", image)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "x.png")), image)
    with Image.open(tmp_path / "b" / "x.jpg") as jpg:
        assert (jpg.format, jpg.size) == ("JPEG", (30, 20))


def test_label_grid_cells_of_a_padded_input_are_cut_at_the_border():
    from fractions import Fraction

    grid = np.array([[0, 1, 2], [2, 1, 0]])  # 2 x 3 cells of 16 network pixels; the image is 24 x 40 of them
    labels = [GridLabel(0, "a", (255, 0, 0)), GridLabel(1, "b", (0, 255, 0)), GridLabel(2, "c", (0, 0, 255))]
    # drawn at half the network's size: 8 pixels per cell, the last row and column cut to 4
    panel = label_grid_panel(grid, labels, size=(12, 20), cell_size=(8, 8), cell_lines=False)
    colors = np.array([g.color for g in labels], dtype=np.uint8)
    rows = np.minimum(np.arange(12) // 8, 1)
    cols = np.minimum(np.arange(20) // 8, 2)
    expected = colors[grid[rows[:, None], cols[None, :]]]
    assert np.array_equal(panel.image, expected)
    assert panel.image[11, 19].tolist() == [255, 0, 0] and panel.image[7, 16].tolist() == [0, 0, 255]
    # stretched instead (no cell size), the last cells would be as large as the others
    assert label_grid_panel(grid, labels, size=(12, 20), cell_lines=False).image[7, 16].tolist() == [255, 0, 0]
    thirds = label_grid_panel(grid, labels, size=(12, 20), cell_size=(Fraction(20, 3), 7), cell_lines=False).image
    assert thirds[6, 0].tolist() == [255, 0, 0] and thirds[7, 0].tolist() == [0, 0, 255]  # 7 >= 20/3
    with pytest.raises(ValueError, match="whole cells outside"):
        label_grid_panel(grid, labels, size=(12, 20), cell_size=(12, 8))
