"""The SAM 3 model layer on the tiny checkpoint: loading, sharing, parity with transformers, cache, AMG."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor, Sam3VideoConfig

from models.sam3 import CheckpointError, Sam3Predictor, load_sam3
from models.sam3.automatic import AutomaticMaskConfig, generate_masks, mask_boxes, point_grid, stability_scores
from models.sam3.predictor import ObjectPrompt
from models.sam3.random_checkpoint import clip_vocabulary
from tests.conftest import BPE_VOCAB, noise_image

IMAGE = noise_image(480, 640)


@pytest.fixture(scope="module")
def models(weights_dir):
    return load_sam3(weights_dir / "sam3")


@pytest.fixture
def predictor(models) -> Sam3Predictor:
    return Sam3Predictor(models, cache_size=2)


def test_tokenizer_rebuilt_from_the_bpe_file(models):
    vocab, merges = clip_vocabulary(BPE_VOCAB)
    assert len(vocab) == 49408 and len(merges) == 48894
    ids = models.processor(text="a red car")["input_ids"]
    assert ids[:5] == [49406, 320, 736, 1615, 49407]


def test_detector_and_tracker_share_one_vit(models):
    backbone = models.detector.vision_encoder.backbone
    assert models.tracker.vision_encoder.backbone is backbone
    held = {p.data_ptr() for p in [*models.detector.parameters(), *models.tracker.parameters()]}
    separate = sum(1 for _ in models.detector.parameters()) + sum(1 for _ in models.tracker.parameters())
    assert len(held) == separate - sum(1 for _ in backbone.parameters())
    assert models.report.ok


def _edited_copy(weights_dir, tmp_path, edit) -> str:
    target = tmp_path / "sam3"
    shutil.copytree(weights_dir / "sam3", target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: s.pop("tracker_model.mask_decoder.iou_token.weight"),
            "missing key(s): tracker_model.mask_decoder.iou_token.weight",
        ),
        (
            lambda s: s.pop("detector_model.text_projection.weight"),
            "missing key(s): detector_model.text_projection.weight",
        ),
        (
            lambda s: s.update({"tracker_neck.extra.weight": torch.zeros(1)}),
            "unexpected key(s): tracker_neck.extra.weight",
        ),
        (
            lambda s: s.update({"tracker_model.no_memory_embedding": torch.zeros(1, 1, 7)}),
            "mismatched key(s): tracker_model.no_memory_embedding",
        ),
    ],
)
def test_key_mismatches_are_reported(weights_dir, tmp_path, edit, expected):
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_sam3(_edited_copy(weights_dir, tmp_path, edit))


def test_concept_detection_equals_the_transformers_pipeline(weights_dir, predictor):
    [embedding] = predictor.embed([("img", IMAGE)])
    ours = predictor.detect(embedding, "a red car", threshold=0.2)

    reference = Sam3Model.from_pretrained(weights_dir / "sam3").eval()
    processor = Sam3Processor.from_pretrained(weights_dir / "sam3")
    inputs = processor(images=IMAGE, text="a red car", return_tensors="pt")
    with torch.inference_mode():
        out = reference(**inputs)
    [expected] = processor.post_process_instance_segmentation(out, threshold=0.2, target_sizes=[(480, 640)])
    order = expected["scores"].argsort(descending=True)
    assert len(ours) == len(order) > 0
    torch.testing.assert_close(ours.scores, expected["scores"][order], atol=1e-5, rtol=0)
    assert torch.equal(ours.to_image((480, 640)), expected["masks"][order].bool())


def test_exemplar_boxes_reach_the_detector(predictor):
    [embedding] = predictor.embed([("img", IMAGE)])
    text_only = predictor.detect(embedding, "visual", threshold=0.1)
    with_boxes = predictor.detect(embedding, None, [[10, 20, 200, 300]], threshold=0.1)
    assert not torch.allclose(text_only.scores, with_boxes.scores)


def _tracker_reference(weights_dir, tmp_path, no_memory: torch.Tensor, levels: list[float]):
    """transformers' image tracker on a checkpoint whose no-memory embedding is non-zero."""
    path = _edited_copy(weights_dir, tmp_path, lambda s: s.update({"tracker_model.no_memory_embedding": no_memory}))
    config = Sam3VideoConfig.from_pretrained(path)
    config.tracker_config.vision_config.scale_factors = levels
    tracker = Sam3TrackerModel.from_pretrained(path, config=config).eval()
    return path, tracker, Sam3TrackerProcessor.from_pretrained(path)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding, at the scale of the values (random tiny decoders output ~1e-5)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_object_prompts_equal_the_official_tracker_semantics(weights_dir, tmp_path):
    # Meta's tracker drops the 0.5x FPN level and adds the no-memory embedding to the 1x level.
    # transformers' image tracker does that when its neck has exactly those three levels.
    no_memory = torch.randn(1, 1, 32)
    path, reference, processor = _tracker_reference(weights_dir, tmp_path, no_memory, [4.0, 2.0, 1.0])
    predictor = Sam3Predictor(load_sam3(path))
    [embedding] = predictor.embed([("img", IMAGE)])
    features = predictor.tracker_features(embedding)
    ours = predictor.segment(
        embedding, [ObjectPrompt(points=[(500.0, 100.0)], labels=[1]), ObjectPrompt(box=(20, 30, 400, 300))]
    )

    click = processor(images=IMAGE, input_points=[[[[500.0, 100.0]]]], input_labels=[[[1]]], return_tensors="pt")
    box = processor(images=IMAGE, input_boxes=[[[20, 30, 400, 300]]], return_tensors="pt")
    with torch.inference_mode():
        expected_features = reference.get_image_embeddings(click["pixel_values"])
        by_click = reference(**{k: v for k, v in click.items() if k != "original_sizes"}, multimask_output=True)
        by_box = reference(**{k: v for k, v in box.items() if k != "original_sizes"}, multimask_output=False)
    for level, expected in zip(features, expected_features):
        torch.testing.assert_close(level, expected)
    best = by_click.iou_scores[0, 0].argmax()
    _close(ours.maps[0], by_click.pred_masks[0, 0, best])
    _close(ours.maps[1], by_box.pred_masks[0, 0, 0])
    _close(ours.scores, torch.stack([by_click.iou_scores[0, 0, best], by_box.iou_scores[0, 0, 0]]))

    # With its default four-level neck, transformers' image tracker adds the embedding to the level
    # it then drops: its coarsest features lack exactly the no-memory embedding.
    _, default, _ = _tracker_reference(weights_dir, tmp_path / "default", no_memory, [4.0, 2.0, 1.0, 0.5])
    with torch.inference_mode():
        default_features = default.get_image_embeddings(click["pixel_values"])
    torch.testing.assert_close(features[-1] - default_features[-1], no_memory.view(1, -1, 1, 1).expand_as(features[-1]))


def test_cache_hits_skip_the_vit_and_evict_least_recently_used(models, predictor):
    calls = []
    hook = models.detector.vision_encoder.backbone.register_forward_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        a, b, c = IMAGE, noise_image(100, 100, seed=1), noise_image(100, 100, seed=2)
        first = predictor.embed([("a", a), ("b", b), ("a", a)])
        assert calls == [2] and [e.cached for e in first] == [False, False, False]  # one pass, batch of two
        again = predictor.embed([("a", a)])
        assert calls == [2] and again[0].cached and torch.equal(again[0].features, first[0].features)
        predictor.embed([("c", c)])  # cache of 2: evicts "b", the least recently used
        predictor.embed([("a", a), ("b", b)])
        assert calls == [2, 1, 1]
    finally:
        hook.remove()


def test_grid_covers_each_axis_of_a_non_square_image(predictor):
    grid = point_grid(16, (480, 640))
    xs, ys = np.unique(grid[:, 0]), np.unique(grid[:, 1])
    assert len(xs) == len(ys) == 16
    np.testing.assert_allclose([xs[0], xs[-1], ys[0], ys[-1]], [20, 620, 15, 465])
    assert (grid[:, 1] > 2 * 480 / 3).sum() == 16 * 5  # the bottom third is covered too
    in_model = predictor._to_model_frame(torch.from_numpy(grid).float(), (480, 640))
    assert torch.equal(in_model[:, 0].unique(), in_model[:, 1].unique())  # a square grid in the model's frame


def test_stability_and_boxes():
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, 1:3, 1:3] = 5.0  # crisp: stable
    logits[1, 1:3, 1:3] = 0.5  # soft: the +1 threshold keeps nothing
    assert stability_scores(logits).tolist() == [1.0, 0.0]
    masks = logits > 0
    masks[1] = False
    assert mask_boxes(masks).tolist() == [[1, 1, 2, 2], [0, 0, 0, 0]]


def test_automatic_masks_are_bounded_and_redecoded_exactly(predictor):
    [embedding] = predictor.embed([("img", IMAGE)])
    config = AutomaticMaskConfig(points_per_side=128, pred_iou_thresh=0.5, stability_score_thresh=0.0, max_masks=5)
    masks, clicks = generate_masks(predictor, embedding, config)
    assert 0 < len(masks) <= 5 and len(clicks) == len(masks)
    assert masks.scores.tolist() == sorted(masks.scores.tolist(), reverse=True)
    features = predictor.tracker_features(embedding)
    points = torch.from_numpy(clicks[:1]).float()[:, None]
    logits, iou = predictor.decode(
        features, embedding.image_size, points, torch.ones(1, 1, dtype=torch.int64), None, True
    )
    assert any(torch.allclose(logits[0, k], masks.maps[0], atol=1e-4) for k in range(3))
