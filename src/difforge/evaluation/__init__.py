"""Evaluation: FID / KID / precision-recall with the standard Inception network, offline.

Public interface::

    from difforge.evaluation import (
        InceptionFeatureExtractor,  # uint8 images -> (N, 2048) features
        preprocess,                 # reference FID preprocessing -> (N, 3, 299, 299)
        frechet_distance, kernel_inception_distance, precision_recall,
        FeatureStats,               # .npz statistics files
        open_input, compute_stats,  # folders / built-ins / runs -> FeatureStats
        compare_stats,              # two FeatureStats -> FIDResult
        add_eval_parser,            # CLI: difforge eval stats|fid
    )

See ``docs/evaluation.md``.
"""

from difforge.evaluation.cache import compute_stats
from difforge.evaluation.commands import FIDResult, add_eval_parser, compare_stats
from difforge.evaluation.features import extract_features
from difforge.evaluation.inception import (
    FEATURE_DIM,
    INCEPTION_SIZE,
    InceptionFeatureExtractor,
    find_inception_weights,
    preprocess,
    tf1_bilinear_resize,
)
from difforge.evaluation.metrics import (
    KIDResult,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    mean_and_covariance,
    mmd2_unbiased,
    precision_recall,
    sqrtm_psd,
    trace_sqrt_product,
)
from difforge.evaluation.sources import ImageSource, array_source, open_input
from difforge.evaluation.stats import FeatureStats

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "FIDResult",
    "FeatureStats",
    "ImageSource",
    "InceptionFeatureExtractor",
    "KIDResult",
    "add_eval_parser",
    "array_source",
    "compare_stats",
    "compute_stats",
    "extract_features",
    "find_inception_weights",
    "frechet_distance",
    "frechet_distance_features",
    "kernel_inception_distance",
    "mean_and_covariance",
    "mmd2_unbiased",
    "open_input",
    "precision_recall",
    "preprocess",
    "sqrtm_psd",
    "tf1_bilinear_resize",
    "trace_sqrt_product",
]
