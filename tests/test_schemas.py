"""sam3-image parameters: Segmind's string-encoded lists, defaults, and errors that name the parameter."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.schemas import Sam3ImageParams
from server.gateway import describe_validation_error


def errors(**params) -> str:
    with pytest.raises(ValidationError) as exc:
        Sam3ImageParams.model_validate(params)
    return describe_validation_error(exc.value)


def test_defaults_match_segmind():
    p = Sam3ImageParams()
    assert (p.threshold, p.points_per_side, p.pred_iou_thresh, p.max_masks) == (0.5, 32, 0.88, 0)
    assert (p.return_preview, p.return_overlay, p.return_masks) == (True, False, False)
    assert p.box_prompt_mode == "object"


def test_string_encoded_and_plain_lists_are_the_same():
    a = Sam3ImageParams(
        points_input="[[300, 400], [10, 20]]", point_labels_input="[[1, 0]]", boxes_input="[[1, 2, 30, 40]]"
    )
    b = Sam3ImageParams(points_input=[[300, 400], [10, 20]], point_labels_input=[1, 0], boxes_input=[1, 2, 30, 40])
    assert a == b and a.points_input == [[300, 400], [10, 20]] and a.boxes_input == [[1, 2, 30, 40]]
    assert Sam3ImageParams(points_input="[5, 6]").points_input == [[5, 6]]


def test_one_label_applies_to_every_point():
    p = Sam3ImageParams(points_input="[[1, 1], [2, 2], [3, 3]]")
    assert p.point_labels == [1, 1, 1]
    assert Sam3ImageParams(points_input="[[1, 1], [2, 2]]", point_labels_input="[[0]]").point_labels == [0, 0]


def test_blank_text_is_no_prompt():
    assert Sam3ImageParams(text_prompt="  ").text_prompt is None
    assert "points_per_side: no prompt" in errors(text_prompt=" ", points_per_side=0)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"threshold": 2}, "threshold: Input should be less than or equal to 1"),
        ({"points_input": "[[1]]"}, "points_input: "),
        ({"boxes_input": "[[5, 5, 1, 9]]"}, "boxes_input: box 0 must have x2 > x1 and y2 > y1"),
        ({"points_input": "[[1, 1]]", "point_labels_input": "[[1, 1]]"}, "point_labels_input: 2 labels for 1 points"),
        ({"mystery": 1}, "mystery: unknown parameter"),
    ],
)
def test_errors_name_the_parameter(params, expected):
    assert errors(**params).startswith(expected)


def test_bounds_are_checked_against_the_image():
    p = Sam3ImageParams(points_input="[[640, 480]]", boxes_input="[[0, 0, 640, 480]]")
    p.check_bounds(640, 480)
    with pytest.raises(ValueError, match="points_input: point 0"):
        p.check_bounds(639, 480)
    with pytest.raises(ValueError, match="boxes_input: box 0"):
        Sam3ImageParams(boxes_input="[[0, 0, 640, 480]]").check_bounds(640, 479)
