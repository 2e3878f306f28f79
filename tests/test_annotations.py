"""Ground-truth boxes: JSON and PASCAL VOC XML annotation files, label mapping files (ImageNet's wnids), and
boxes moved into the frame a map is laid over (resize + centre crop), all against hand computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from gradcam.errors import GradCAMError
from gradcam.metrics.annotations import Annotation, AnnotationSet, boxes_of, load_annotations
from gradcam.models.base import Preprocess

LABELS = ["tench", "goldfish", "Great White Shark", "tiger shark"]


def write_json(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def voc(filename: str | None, objects: list[tuple[str, tuple[str, str, str, str]]]) -> str:
    parts = ["<annotation>", "<folder>val</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    parts.append("<size><width>500</width><height>375</height><depth>3</depth></size>")
    for name, (xmin, ymin, xmax, ymax) in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# JSON


def test_json_with_class_indices(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "boxes.json",
        {
            "a.jpg": [{"label": 1, "box": [1, 2, 10, 20]}, {"label": 3, "box": [0.5, 0, 4.5, 8]}],
            "b.png": [{"label": "2", "box": [5, 5, 6, 6]}],
        },
    )
    found = load_annotations(source, LABELS)
    assert isinstance(found, AnnotationSet) and len(found) == 2
    assert found.find("a.jpg") == [Annotation(1, (1.0, 2.0, 10.0, 20.0)), Annotation(3, (0.5, 0.0, 4.5, 8.0))]
    assert found.find("b.png") == [Annotation(2, (5.0, 5.0, 6.0, 6.0))]
    assert found.find(tmp_path / "images" / "a.jpg") == found.find("a.jpg")  # a path: matched by its name
    assert found.find("c.jpg") is None


def test_json_with_class_names_any_case(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "boxes.json",
        {
            "a.jpg": [
                {"label": "goldfish", "box": [0, 0, 4, 4]},
                {"label": "great white shark", "box": [1, 1, 3, 3]},
                {"label": "TIGER SHARK", "box": [2, 2, 3, 3]},
                {"label": "Great White Shark", "box": [0, 1, 2, 3]},
            ]
        },
    )
    found = load_annotations(source, LABELS).find("a.jpg")
    assert found is not None
    assert [o.label for o in found] == [1, 2, 3, 2]
    assert [o.box for o in found] == [(0, 0, 4, 4), (1, 1, 3, 3), (2, 2, 3, 3), (0, 1, 2, 3)]


def test_json_unknown_name_names_the_file_and_the_image(tmp_path: Path) -> None:
    source = write_json(
        tmp_path / "boxes.json",
        {
            "ok.jpg": [{"label": 0, "box": [0, 0, 1, 1]}],
            "whale.jpg": [{"label": "whale", "box": [0, 0, 1, 1]}],
        },
    )
    with pytest.raises(GradCAMError) as error:
        load_annotations(source, LABELS)
    message = str(error.value)
    assert "boxes.json" in message and "whale.jpg" in message and "whale" in message


@pytest.mark.parametrize(
    "box",
    [
        [5, 0, 5, 4],  # x1 == x0
        [6, 0, 5, 4],  # x1 < x0
        [0, 4, 5, 4],  # y1 == y0
        [0, 5, 5, 4],  # y1 < y0
        [-1, 0, 5, 4],  # negative
        [0, 0, 5],  # three numbers
        ["a", 0, 5, 4],  # not numbers
        7,  # not a list
    ],
)
def test_json_bad_box_is_an_error_naming_the_image(tmp_path: Path, box: object) -> None:
    source = write_json(tmp_path / "boxes.json", {"cat.jpg": [{"label": 0, "box": box}]})
    with pytest.raises(GradCAMError, match=r"boxes\.json.*cat\.jpg.*box"):
        load_annotations(source, LABELS)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"a.jpg": [{"label": 0}]}', 'needs a "label" and a "box"'),
        ('{"a.jpg": {"label": 0, "box": [0, 0, 1, 1]}}', "expected a list"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
        ('{"a.jpg": [{"label": 9, "box": [0, 0, 1, 1]}]}', "out of range"),
        ('{"a.jpg": [{"label": true, "box": [0, 0, 1, 1]}]}', "class index or name"),
        ('{"a.jpg": [{"label": 1.5, "box": [0, 0, 1, 1]}]}', "class index or name"),
    ],
)
def test_json_malformed_content_is_one_clear_error(tmp_path: Path, content: str, pattern: str) -> None:
    source = tmp_path / "boxes.json"
    source.write_text(content, encoding="utf-8")
    with pytest.raises(GradCAMError, match=pattern) as error:
        load_annotations(source, LABELS)
    assert "boxes.json" in str(error.value)


def test_missing_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GradCAMError, match="not found"):
        load_annotations(tmp_path / "nothing.json", LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(GradCAMError, match="no .xml files"):
        load_annotations(tmp_path / "empty", LABELS)


# ---------------------------------------------------------------------------------------------------------
# VOC XML


def test_voc_folder_converts_one_based_inclusive_boxes(tmp_path: Path) -> None:
    folder = tmp_path / "xml"
    (folder / "sub").mkdir(parents=True)
    (folder / "img1.xml").write_text(
        voc("img1.jpg", [("goldfish", ("11", "21", "50", "60")), ("tench", ("1", "1", "1", "1"))])
    )
    (folder / "sub" / "img2.xml").write_text(
        voc("img2.jpg", [("Tiger Shark", ("100.0", "5", "200", "75.5"))])
    )
    found = load_annotations(folder, LABELS)
    assert len(found) == 2
    # (xmin - 1, ymin - 1, xmax, ymax): pixels 11..50 are columns 10..49 -> half-open [10, 50)
    assert found.find("img1.jpg") == [
        Annotation(1, (10.0, 20.0, 50.0, 60.0)),
        Annotation(0, (0.0, 0.0, 1.0, 1.0)),
    ]
    assert found.find("img2.jpg") == [Annotation(3, (99.0, 4.0, 200.0, 75.5))]


def test_voc_imagenet_file_name_without_extension_is_matched_by_stem(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "ILSVRC2012_val_00000001.xml").write_text(
        voc("ILSVRC2012_val_00000001", [("n01443537", ("3", "4", "30", "40"))])
    )
    (folder / "ILSVRC2012_val_00000002.xml").write_text(
        voc("ILSVRC2012_val_00000002", [("n01440764", ("1", "1", "9", "9"))])
    )
    mapping = write_json(tmp_path / "wnids.json", {"n01440764": 0, "n01443537": "goldfish"})
    found = load_annotations(folder, LABELS, mapping=mapping)
    expected = [Annotation(1, (2.0, 3.0, 30.0, 40.0))]
    assert found.find("images/ILSVRC2012_val_00000001.JPEG") == expected
    assert found.find("ILSVRC2012_val_00000001.JPEG") == expected
    assert found.find(Path("x") / "ILSVRC2012_val_00000002.png") == [Annotation(0, (0.0, 0.0, 9.0, 9.0))]
    assert found.find("ILSVRC2012_val_00000003.JPEG") is None


def test_an_annotation_with_an_extension_matches_that_file_name_only() -> None:
    # photo.png must not pick up the boxes of photo.jpg (a different picture, perhaps another size)
    objects = [Annotation(2, (0.0, 0.0, 1.0, 1.0))]
    found = AnnotationSet({"photo.jpg": objects})
    assert found.find("photo.jpg") is objects
    assert found.find("/data/photo.jpg") is objects
    assert found.find("/data/photo.png") is None


def test_voc_file_without_filename_uses_the_file_stem(tmp_path: Path) -> None:
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "dog.xml").write_text(voc(None, [("tench", ("2", "2", "4", "4"))]))
    found = load_annotations(folder, LABELS)
    assert found.find("dog.jpg") == [Annotation(0, (1.0, 1.0, 4.0, 4.0))]


def test_wnids_through_a_text_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "a.xml").write_text(
        voc("a.JPEG", [("n01443537", ("1", "1", "5", "5")), ("n01491361", ("2", "2", "6", "6"))])
    )
    # KEY VALUE lines, values as indices or class names (any case); not one line per class
    mapping = tmp_path / "map.txt"
    mapping.write_text("n01443537 1\n\nn01491361 Tiger Shark\n", encoding="utf-8")
    found = load_annotations(folder, LABELS, mapping=mapping)
    assert found.find("a.JPEG") == [Annotation(1, (0.0, 0.0, 5.0, 5.0)), Annotation(3, (1.0, 1.0, 6.0, 6.0))]


def test_wnids_through_loc_synset_mapping_use_the_line_number(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "a.xml").write_text(
        voc("a", [("n01484850", ("1", "1", "5", "5")), ("n01440764", ("3", "3", "8", "8"))])
    )
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text(
        "n01440764 tench, Tinca tinca\n"
        "n01443537 goldfish, Carassius auratus\n"
        "n01484850 great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias\n"
        "n01491361 tiger shark, Galeocerdo cuvieri\n",
        encoding="utf-8",
    )
    found = load_annotations(folder, LABELS, mapping=mapping)
    assert found.find("a.JPEG") == [Annotation(2, (0.0, 0.0, 5.0, 5.0)), Annotation(0, (2.0, 2.0, 8.0, 8.0))]


def test_mapping_that_is_neither_classes_nor_one_line_per_class_is_an_error(tmp_path: Path) -> None:
    source = write_json(tmp_path / "boxes.json", {"a.jpg": [{"label": "n01440764", "box": [0, 0, 1, 1]}]})
    mapping = tmp_path / "map.txt"
    mapping.write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n", encoding="utf-8"
    )
    with pytest.raises(GradCAMError, match=r"map\.txt.*line 1.*2 entries.*\(4\)"):
        load_annotations(source, LABELS, mapping=mapping)


def test_mapping_applies_to_json_annotations_too(tmp_path: Path) -> None:
    source = write_json(tmp_path / "boxes.json", {"a.jpg": [{"label": "n01491361", "box": [0, 0, 2, 2]}]})
    mapping = write_json(tmp_path / "wnids.json", {"n01491361": "TIGER SHARK"})
    assert load_annotations(source, LABELS, mapping=mapping).find("a.jpg") == [
        Annotation(3, (0.0, 0.0, 2.0, 2.0))
    ]


def test_wnid_without_a_mapping_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    folder.mkdir()
    (folder / "a.xml").write_text(voc("a.JPEG", [("n01440764", ("1", "1", "5", "5"))]))
    with pytest.raises(GradCAMError, match=r"a\.xml.*object 1.*n01440764"):
        load_annotations(folder, LABELS)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("<annotation><filename>a.jpg</filename><object>", "not readable VOC XML"),
        ("not xml at all", "not readable VOC XML"),
        (voc("a.jpg", [("tench", ("1", "1", "x", "5"))]), "numeric"),
        ("<annotation><filename>a.jpg</filename><object><name>tench</name></object></annotation>", "bndbox"),
        (voc("a.jpg", [("tench", ("6", "1", "5", "5"))]), "x1 > x0"),  # xmax < xmin: no pixel
    ],
)
def test_malformed_xml_is_one_clear_error(tmp_path: Path, content: str, pattern: str) -> None:
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "good.xml").write_text(voc("good.jpg", [("tench", ("1", "1", "5", "5"))]))
    (folder / "broken.xml").write_text(content)
    with pytest.raises(GradCAMError, match=pattern) as error:
        load_annotations(folder, LABELS)
    message = str(error.value)
    assert "broken.xml" in message and "\n" not in message


def test_unreadable_mapping_files(tmp_path: Path) -> None:
    source = write_json(tmp_path / "boxes.json", {"a.jpg": [{"label": 0, "box": [0, 0, 1, 1]}]})
    bad = tmp_path / "map.json"
    bad.write_text("{oops", encoding="utf-8")
    with pytest.raises(GradCAMError, match=r"map\.json.*not valid JSON"):
        load_annotations(source, LABELS, mapping=bad)
    bad.write_text("[1]", encoding="utf-8")
    with pytest.raises(GradCAMError, match="must be a JSON object"):
        load_annotations(source, LABELS, mapping=bad)
    with pytest.raises(GradCAMError, match="cannot be read"):
        load_annotations(source, LABELS, mapping=tmp_path / "missing.txt")


def test_boxes_of_filters_by_label() -> None:
    objects = [
        Annotation(1, (0.0, 0.0, 2.0, 2.0)),
        Annotation(2, (1.0, 1.0, 3.0, 4.0)),
        Annotation(1, (5.0, 6.0, 7.0, 8.0)),
    ]
    ones = boxes_of(objects, 1)
    assert ones.dtype == torch.float64
    assert ones.tolist() == [[0.0, 0.0, 2.0, 2.0], [5.0, 6.0, 7.0, 8.0]]
    assert boxes_of(objects, 2).tolist() == [[1.0, 1.0, 3.0, 4.0]]
    assert boxes_of(objects).tolist() == [[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert boxes_of(objects, 0).shape == (0, 4)
    assert boxes_of([]).shape == (0, 4)


# ---------------------------------------------------------------------------------------------------------
# frame_boxes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_frame_boxes_are_unchanged_without_a_crop_but_clipped_to_the_image() -> None:
    image = Image.new("RGB", (400, 300))
    boxes = [[100, 60, 200, 150], [0, 0, 400, 300], [350.5, 10.25, 399, 20], [380, 250, 450, 320]]
    moved = Preprocess(resize=256, crop=None, mean=MEAN, std=STD).frame_boxes(image, torch.tensor(boxes))
    assert moved.dtype == torch.float64
    assert moved.tolist() == [
        [100, 60, 200, 150],
        [0, 0, 400, 300],
        [350.5, 10.25, 399, 20],
        [380, 250, 400, 300],
    ]
    assert Preprocess(resize=256, crop=None, mean=MEAN, std=STD).frame_size(image) == (300, 400)


def test_frame_boxes_follow_resize_256_and_centre_crop_224() -> None:
    # 400x300 (W x H): Resize(256) scales the short side 300 -> 256, the long side to int(256 * 400 / 300)
    # = 341, so x scales by 341/400 and y by 256/300; CenterCrop(224): top = round((256 - 224) / 2) = 16,
    # left = round((341 - 224) / 2) = round(58.5) = 58 (round half to even, as torchvision does).
    image = Image.new("RGB", (400, 300))
    preprocess = Preprocess(resize=256, crop=224, mean=MEAN, std=STD)
    assert preprocess.view(image).size == (224, 224)
    sx, sy, left, top = 341 / 400, 256 / 300, 58, 16
    boxes = torch.tensor(
        [
            [100, 60, 200, 150],  # inside
            [0, 0, 40, 300],  # x1 -> 34.1 - 58 < 0: left of the crop, no area left
            [300, 100, 390, 200],  # x1 -> 332.475 - 58 = 274.5: clipped at 224
            [0, 0, 400, 300],  # the whole image: the whole crop
            [100, 290, 200, 300],  # y0 -> 247.5 - 16 = 231.5 > 224: below the crop, no area left
        ],
        dtype=torch.float64,
    )
    moved = preprocess.frame_boxes(image, boxes)
    # rows stay aligned with the input; a box outside the crop comes back with no area
    area = (moved[:, 2] - moved[:, 0]) * (moved[:, 3] - moved[:, 1])
    assert area[1] == 0 and area[4] == 0
    expected = torch.tensor(
        [
            [100 * sx - left, 60 * sy - top, 200 * sx - left, 150 * sy - top],  # 27.25, 35.2, 112.5, 112
            [300 * sx - left, 100 * sy - top, 224, 200 * sy - top],  # 197.75, 69.33, 224, 154.67
            [0, 0, 224, 224],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(moved[[0, 2, 3]].double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        moved[0].double(), torch.tensor([27.25, 35.2, 112.5, 112.0], dtype=torch.float64), rtol=0, atol=1e-4
    )


def test_frame_boxes_with_rectangular_resize_and_crop() -> None:
    # resize (H, W) = (150, 200): x and y scale by 0.5; crop (H, W) = (100, 120): top 25, left 40
    image = Image.new("RGB", (400, 300))
    preprocess = Preprocess(resize=(150, 200), crop=(100, 120), mean=MEAN, std=STD)
    assert preprocess.view(image).size == (120, 100)
    moved = preprocess.frame_boxes(
        image, torch.tensor([[100.0, 60.0, 200.0, 150.0], [380.0, 0.0, 400.0, 20.0]])
    )
    # (50, 30, 100, 75) - (40, 25) -> (10, 5, 60, 50); the second: x (190, 200) - 40 > 120: no area
    torch.testing.assert_close(moved[0].double(), torch.tensor([10.0, 5.0, 60.0, 50.0], dtype=torch.float64))
    assert moved[1, 2] == moved[1, 0]


def test_one_line_per_class_mapping_uses_the_line_even_when_a_description_is_another_class(
    tmp_path: Path,
) -> None:
    # ImageNet's "n02012849 crane" (the bird, class 134) must not become torchvision's "crane" (517);
    # here: line 2 describes itself as "goldfish" (class 1) but is class 2.
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n0 tench\nn1 white shark\nn2 goldfish\nn3 tiger shark\n", encoding="utf-8")
    source = write_json(tmp_path / "b.json", {"a.jpg": [{"label": "n2", "box": [0, 0, 1, 1]}]})
    assert load_annotations(source, LABELS, mapping=mapping).find("a.jpg")[0].label == 2


def test_tab_separated_mapping(tmp_path: Path) -> None:
    mapping = tmp_path / "map.txt"
    mapping.write_text("n01443537\tgoldfish\n", encoding="utf-8")
    source = write_json(tmp_path / "b.json", {"a.jpg": [{"label": "n01443537", "box": [0, 0, 1, 1]}]})
    assert load_annotations(source, LABELS, mapping=mapping).find("a.jpg")[0].label == 1


def test_voc_zero_based_corner_is_clamped_not_refused(tmp_path: Path) -> None:
    folder = tmp_path / "xml"
    folder.mkdir()
    (folder / "a.xml").write_text(voc("a.jpg", [("tench", ("0", "0", "20", "30"))]))
    assert load_annotations(folder, LABELS).find("a.jpg") == [Annotation(0, (0.0, 0.0, 20.0, 30.0))]
