"""Training samples: one main person's crop, augmented, with its 50 target maps (docs/method.md §3, §4).

A `TrainingSample` is what the reference's offline preprocessing (`data/coco_masks_hdf5.py`, docs/method.md
§4.3) stores per *main person*: the image, the main person's centre and height, and every annotated person's
keypoints (`simplepose.coco.training_samples` lists them from COCO annotations). `build_sample` turns a sample
and its prepared image (`SourceImage`, with the person masks of `simplepose.coco.image_masks`) into the
network's (image, mask, targets) triple with the augmentation of docs/method.md §4.1; `build_samples` does a
batch at a time, as a training loader does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from simplepose.augment import (AugmentConfig, AugmentParams, SourceImage, affine_matrix, sample_params,
                                transform_keypoints, visible_box, warp)
from simplepose.targets import TargetConfig, render_heatmaps_batch


@dataclasses.dataclass(frozen=True)
class TrainingSample:
    """One training sample: an image centred on one main person (docs/method.md §4.3).

    keypoints: (P, 18, 3) float64, reference order, source-image pixels, recoded visibility; row 0 is the
        main person, then every other non-crowd person of the image with num_keypoints > 0.
    center: main person's bbox centre (x, y), pixels; person_height: its bbox height, pixels
        (the reference's scale_provided is person_height / crop size).
    """

    image_id: int
    file_name: str
    height: int
    width: int
    keypoints: np.ndarray
    center: tuple[float, float]
    person_height: float


def build_sample(source: SourceImage, sample: TrainingSample, rng: np.random.Generator | None = None,
                 augment_config: AugmentConfig = AugmentConfig(), target_config: TargetConfig = TargetConfig(),
                 params: AugmentParams | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample: augment (tint, warp), move the keypoints, render the targets (docs/method.md §3, §4.1).

    source: the sample's image and masks (`SourceImage.from_arrays(image, *image_masks(coco, id))`).
    params: fixed augmentation (e.g. `AugmentParams()` for validation); drawn from `rng` when None.
    Returns image uint8 (S, S, 3) BGR (`simplepose.model.network_input` makes it the network's float input),
    mask float32 (1, S/stride, S/stride) (mask_miss: 0 = not supervised) and targets float32
    (50, S/stride, S/stride), S = augment_config.crop_size. `build_samples` makes a batch faster.
    """
    if params is None and rng is None:
        raise ValueError("build_sample: pass either rng or params")
    images, masks, targets = build_samples([(source, sample)], None if rng is None else [rng], augment_config,
                                           target_config, None if params is None else [params])
    return images[0], masks[0], targets[0]


def build_samples(items: Sequence[tuple[SourceImage, TrainingSample]],
                  rngs: Sequence[np.random.Generator] | None = None, augment_config: AugmentConfig = AugmentConfig(),
                  target_config: TargetConfig = TargetConfig(), params: Sequence[AugmentParams] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of `build_sample`s: images uint8 (B, S, S, 3), masks float32 (B, 1, g, g), targets float32
    (B, 50, g, g), g = S / stride. Item n draws its augmentation from rngs[n], or uses params[n].

    Images are warped one by one; the targets of the whole batch are laid out together and drawn image by
    image (`render_heatmaps_batch`), and every array is written in place into the batch arrays.
    """
    count = len(items)
    draws = params if params is not None else rngs
    if draws is None or len(draws) != count:
        raise ValueError(f"build_samples: pass one rng or one params per item ({count}), got "
                         f"{'neither' if draws is None else len(draws)}")
    size, stride = augment_config.crop_size, target_config.stride
    grid = size // stride
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.empty((count, 1, grid, grid), np.float32)
    person_masks = np.empty((count, grid, grid), np.float32)
    keypoints = []
    for n, (source, sample) in enumerate(items):
        if source.pixels.shape[:2] != (sample.height, sample.width):
            raise ValueError(f"build_samples: image {sample.image_id} is {sample.height}x{sample.width} in the "
                             f"annotations but the source is {source.pixels.shape[0]}x{source.pixels.shape[1]}")
        draw = params[n] if params is not None else sample_params(augment_config, rngs[n])
        matrix = affine_matrix(sample.center, sample.person_height / size, draw, augment_config)
        if draw.tint is not None:  # only where the warp reads: the same result, less work on zoomed-in crops
            source = source.tinted(draw.tint, visible_box(matrix, size, sample.height, sample.width))
        warped = warp(source, matrix, augment_config, stride, image_out=images[n])
        masks[n, 0], person_masks[n] = warped.mask_miss, warped.mask_all
        keypoints.append(transform_keypoints(sample.keypoints, matrix, draw.flip))
    return images, masks, render_heatmaps_batch(keypoints, (grid, grid), target_config, person_masks)
