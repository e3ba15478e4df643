"""Decoder configuration: the authors' thresholds plus one named switch per improvement (docs/method.md §9, §12)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("default", "reference")
REFINEMENTS = ("log_parabola", "centroid", "none")
PERSON_SCORES = ("keypoint_sum", "reference")


@dataclass(frozen=True)
class DecoderConfig:
    """How heatmaps become persons.

    `mode="reference"` reproduces the authors' decoder bug for bug (docs/method.md §9.1-§9.4) on maps at original
    image resolution (identity `map_to_image`); the improvement switches below are then ignored.
    `mode="default"` is our decoder: it works on maps of any stride (stride 4 in production) and every switch
    below is an improvement over the reference that can be turned off alone to measure its effect.

    The thresholds are the authors' values (`utils/config`, docs/method.md §9): they apply to both modes.
    """

    mode: str = "default"
    keypoint_threshold: float = 0.1  # thre1: minimum keypoint heatmap value of a peak
    limb_threshold: float = 0.1  # thre2: a body-part sample counts as "on" above this
    connect_ratio: float = 0.8  # fraction of samples that must be "on" to accept a pair
    max_samples: int = 20  # mid_num: most samples along a candidate pair (reference mode)
    length_rate: float = 16.0  # len_rate: a limb longer than length_rate * person's longest limb is refused
    merge_tolerance: float = 0.7  # connection_tole: merge two persons only if s >= tol * weakest slot score
    refine_radius: int = 2  # offset_radius of the reference centroid, in map cells
    min_parts: int = 2  # persons with fewer keypoints are dropped
    min_mean_score: float = 0.45  # persons with total / count below this are dropped (reference)

    # --- improvements, used by mode="default" only (each one a measurable switch) ---
    tie_free_nms: bool = True  # a plateau of equal maxima gives one peak, not one per cell (docs/method.md §11.2)
    refinement: str = "log_parabola"  # sub-cell peak position: exact for a Gaussian peak ("centroid": the
    # authors' 5x5 centroid with the axis swap fixed; "none": cell centres)
    peak_value_score: bool = True  # keypoint score = refined peak value, not the 5x5 mean (docs/method.md §9.1)
    pair_samples: int = 10  # samples per pair (reference: min(round(length + 1), max_samples) at full size)
    bilinear_samples: bool = True  # read body-part maps bilinearly along the pair (reference: nearest cell)
    distance_prior: bool = False  # the reference's penalty on limbs longer than half the image height
    global_greedy: bool = True  # group by all pairs in score order, attaching both ends (union of persons
    # without shared keypoint types); False: the authors' limb-order walk (reference.py) on our candidates
    person_score: str = "keypoint_sum"  # rank persons by summed keypoint scores / 17 ("reference": 1 - 1/total)
    attach_fragments: bool = True  # a group no body part can link (an arm without its shoulder) joins the
    # nearest larger group without a shared keypoint type, within fragment_reach x that group's size
    fragment_reach: float = 0.3
    keep_singletons: bool = True  # unassigned keypoints become low-score one-keypoint persons

    # --- bounds, used by mode="default" only (reference mode ignores them: parity with the authors' code) ---
    max_candidates: int = 24  # top-K peaks per keypoint type per image, by peak score, after NMS, chosen in
    # the tensor stage (only K per type leave the device): at most 18 K candidates and 30 K^2 pairs per image
    max_persons: int = 32  # persons kept per image after assembly, by person score (highest first)
    # 0 for either means "no cap": the unbounded decoder, for measurements only (`simplepose bench decoder`)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"DecoderConfig.mode: {self.mode!r} is not one of {MODES}")
        if self.refinement not in REFINEMENTS:
            raise ValueError(f"DecoderConfig.refinement: {self.refinement!r} is not one of {REFINEMENTS}")
        if self.person_score not in PERSON_SCORES:
            raise ValueError(f"DecoderConfig.person_score: {self.person_score!r} is not one of {PERSON_SCORES}")
        if self.max_samples < 2 or self.pair_samples < 2:
            raise ValueError(f"DecoderConfig: max_samples and pair_samples need at least 2 samples, got "
                             f"{self.max_samples}, {self.pair_samples}")
        if self.max_candidates < 0 or self.max_persons < 0:
            raise ValueError(f"DecoderConfig: max_candidates and max_persons must be >= 0 (0 = no cap), got "
                             f"{self.max_candidates}, {self.max_persons}")
        if self.refine_radius < 1:
            raise ValueError(f"DecoderConfig.refine_radius: must be >= 1 cell, got {self.refine_radius}")

    @property
    def is_reference(self) -> bool:
        return self.mode == "reference"

    def replace(self, **changes) -> "DecoderConfig":
        """A copy with some fields changed (`dataclasses.replace`), e.g. to switch one improvement off."""
        return dataclasses.replace(self, **changes)
