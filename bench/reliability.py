"""Runs that cannot be lost, checked by force: random SIGKILLs of a tiny training run, and
fuzzing (hypothesis) of image folders, damaged run folders and command lines.

    python bench/reliability.py                        # the full budget (below)
    python bench/reliability.py --kills 20 --images 1000 --damaged 500 --command-lines 100
    python bench/reliability.py --kills 0 --images 100 --damaged 0 --command-lines 0   # one part

Parts (docs/reliability.md says what each guarantees):

- **SIGKILL**: ``python -m difforge train digits --out RUN ...`` (tiny settings, 12 steps, a
  checkpoint every 1 or 2 steps) is killed with SIGKILL at random moments, and some exactly
  while a checkpoint is being written (``RUN/checkpoints/.tmp-step_*`` seen), then continued
  with a plain ``python -m difforge train --resume --out RUN --no-progress``, which may be
  killed again, until the run finishes. Then: EMA and raw weights bit-identical to an
  uninterrupted run, no ``.tmp-*`` left under RUN, ``train.steps`` unchanged and the last
  checkpoint ``step_<steps>``; no resume may start before the newest checkpoint on disk.
- **image folders**: malformed files (random bytes, truncated PNG/JPEG/..., zero-size, huge
  declared dimensions, wrong extensions, every image mode) -> ``difforge train FOLDER`` must
  train (bad files skipped and counted) or exit 2 with one ``difforge: error:`` line.
- **damaged runs**: config.json edited at random, safetensors files truncated, bit-flipped or
  zeroed, files missing, garbage in metrics.jsonl -> ``sample RUN -n 2 --steps 2``, ``info
  RUN`` and ``train --resume --out RUN`` exit 0 or 2 with one line, and never write images
  that are all one value (NaN weights) or non-finite weights.
- **command lines**: random flags of the real parsers (``train --help``, ``sample --help``)
  with values such as nan, inf, -1, 10**23 and huge sizes -> exit 0 or 2, one line.

Commands run in this process through ``difforge.cli.main(argv)`` (stderr captured); only the
SIGKILL part starts subprocesses. Two guards keep a fuzzed but *valid* command bounded: work
larger than a tiny run (more than a few steps, big images or models, many workers) is
stopped where it would start (counted as "fenced", a success: everything before the work was
checked), and every command runs under an address-space limit and a time limit. Failures are
counted by kind and the first few are printed with what reproduces them; the exit status is
1 when any was found.

tests/test_fuzz.py runs the same generators and checks with a small budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

_SRC = Path(__file__).resolve().parents[1] / "src"
if (_SRC / "difforge").is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))  # the checkout's own package first, as pytest does (pyproject)

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

# ---- settings -------------------------------------------------------------------------------

CLI_TINY = [
    "--preset", "tiny", "--image-size", "16", "--batch-size", "8", "--timesteps", "50",
    "--no-tensorboard", "--no-progress", "--sample-every", "0", "--preview-images", "4",
    "--preview-steps", "3", "--warmup-steps", "2", "--log-every", "1",
    "--threads", "2",  # bit-exact resume needs one thread count (docs/reliability.md)
]  # fmt: skip
"""The tiny training flags of tests/test_reliability.py (a 0.3M U-Net on the 8x8 digits at 16 px)."""

TINY_TRAIN = dict(
    preset="tiny", data="digits", image_size=16, batch_size=8, sample_every=0, checkpoint_every=1,
    tensorboard=False, preview_images=4, preview_steps=3, log_every=1, warmup_steps=2,
)  # fmt: skip
"""The same settings as a TrainConfig (tests/tiny_settings.py, with a checkpoint every step)."""

EXIT_USAGE = 2
COMMAND_SECONDS = 120.0
"""Time limit of one in-process command (a guard, never reached by a tiny run)."""
MEMORY_HEADROOM = 6 << 30
"""Address space a command may add to this process (a guard against unvalidated sizes)."""

FAILURE_KINDS = (
    "tracebacks",
    "wrong exit codes",
    "multi-line errors",
    "non-finite or constant outputs",
    "miscounted files",
    "refused readable data",
    "timeouts",
)
"""What the fuzzers count; each must be 0."""

SIGKILL_FAILURES = (
    "mismatches",
    "temp files left",
    "runs that lost steps",
    "plans not kept",
    "failed resumes",
    "damaged checkpoints after a kill",
)
"""What the SIGKILL part counts as failures; each must be 0."""


# ---- counting -------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts of one part: cases, notes (fenced, exit codes, ...) and failures by kind, with the
    first few failures' details (what reproduces them)."""

    name: str
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    keep: int = 10

    def note(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def fail(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if sum(1 for k, _ in self.failures if k == kind) < self.keep:
            self.failures.append((kind, detail))

    def failed(self, kinds: Sequence[str] = FAILURE_KINDS) -> int:
        return sum(self.counts[k] for k in kinds)

    def report(self) -> str:
        lines = [f"{kind}: {detail}" for kind, detail in self.failures]
        return "\n".join(lines) if lines else "no failures"


# ---- running a command in this process ------------------------------------------------------


class WorkFenced(BaseException):  # noqa: N818 - not an error: the harness stopped valid work
    """Raised by the harness where a valid command would start work too big for a fuzz case."""


class CommandTimeout(BaseException):  # noqa: N818
    """Raised by the harness's timer when a command runs past its time limit."""


@dataclass
class Outcome:
    argv: list[str]
    code: int | None
    stderr: str
    stdout: str
    escaped: str | None = None  # the traceback of an exception that escaped main()
    fenced: str | None = None  # why the harness stopped the work (a success)
    timed_out: bool = False

    def last_line(self) -> str:
        if self.escaped:
            return self.escaped.strip().splitlines()[-1]
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


LIGHT_LIMITS = dict(steps=3, pixels=64 * 64, batch=64, params=3_000_000, workers=2, preview=400,
                    timesteps=5000, sample_images=16, sample_steps=50)  # fmt: skip
"""The largest work a fuzz case may start; anything larger is fenced."""
_HEAVY_PRESETS = {"ddpm-cifar10", "iddpm-cifar10", "adm-imagenet64"}


def _heavy_training(trainer: Any) -> str | None:
    limits = LIGHT_LIMITS
    config = trainer.config
    _, height, width = trainer.image_shape
    remaining = trainer.total_steps - trainer.step
    params = sum(p.numel() for p in trainer.model.parameters())
    checks = [
        (remaining > limits["steps"], f"{remaining} steps to train"),
        (height * width > limits["pixels"], f"{height}x{width} images"),
        (config.batch_size * config.grad_accum > limits["batch"], "a large batch"),
        (params > limits["params"], f"{params} parameters"),
        (config.num_workers > limits["workers"], f"{config.num_workers} workers"),
        (config.preview_images * config.preview_steps > limits["preview"], "large previews"),
        (getattr(trainer.process, "num_timesteps", 0) > limits["timesteps"], "many timesteps"),
    ]
    return next((why for heavy, why in checks if heavy), None)


@contextlib.contextmanager
def work_fence() -> Iterator[None]:
    """Stop valid work larger than a tiny run where it would start: `prepare_run` for heavy
    presets or images, `Trainer.train` for long or large training, the sampling of a
    `Pipeline` for many images, steps or pixels. Raises `WorkFenced` there."""
    import difforge.training as training
    from difforge.pipeline import Pipeline
    from difforge.training.trainer import Trainer

    real_prepare, real_train, real_sample = training.prepare_run, Trainer.train, Pipeline._sample_batches

    def prepare(train: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(train, "preset", None) in _HEAVY_PRESETS:
            raise WorkFenced(f"preset {train.preset}")
        size = getattr(train, "image_size", None)
        if isinstance(size, int) and size * size > LIGHT_LIMITS["pixels"]:
            raise WorkFenced(f"image size {size}")
        return real_prepare(train, *args, **kwargs)

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        why = _heavy_training(self)
        if why:
            raise WorkFenced(why)
        return real_train(self, *args, **kwargs)

    def sample(
        self: Any, process: Any, num_images: int, conditions: Any, config: Any, *args: Any, **kwargs: Any
    ) -> Any:
        _, height, width = self.image_shape
        if (
            num_images > LIGHT_LIMITS["sample_images"]
            or config.steps > LIGHT_LIMITS["sample_steps"]
            or height * width > LIGHT_LIMITS["pixels"]
            or getattr(process, "num_timesteps", 0) > LIGHT_LIMITS["timesteps"]
        ):
            raise WorkFenced(f"sampling {num_images} images of {height}x{width} in {config.steps} steps")
        return real_sample(self, process, num_images, conditions, config, *args, **kwargs)

    with (
        mock.patch.object(training, "prepare_run", prepare),
        mock.patch.object(Trainer, "train", train),
        mock.patch.object(Pipeline, "_sample_batches", sample),
    ):
        yield


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Limit this process's address space to its current size + ``headroom`` (soft limit,
    restored after): an unvalidated size then fails an allocation instead of swapping the
    machine."""
    try:
        import resource
    except ImportError:  # not POSIX
        yield
        return
    size = _vm_size()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if size is None:
        yield
        return
    limit = size + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `CommandTimeout` in the main thread after ``seconds`` (POSIX; else no limit)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise CommandTimeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _default_warnings() -> Iterator[None]:
    """Python's default warning filters, printed to (the current) sys.stderr, as in a plain
    ``python -m difforge`` (pytest would otherwise collect them out of sight)."""

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = show
        yield


def run_cli(argv: Sequence[str], cwd: Path, seconds: float = COMMAND_SECONDS) -> Outcome:
    """``difforge.cli.main(argv)`` in this process, in ``cwd``, with stdout and stderr captured,
    behind `work_fence`, `memory_cap` and `time_limit`."""
    from difforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    outcome = Outcome(list(argv), None, "", "")
    with contextlib.ExitStack() as stack:
        stack.enter_context(working_directory(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(_default_warnings())
        stack.enter_context(work_fence())
        stack.enter_context(memory_cap())
        try:
            with time_limit(seconds):
                outcome.code = main(list(argv))
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                outcome.code = exit_.code or 0
            else:  # sys.exit("message"): Python prints it and exits 1
                print(exit_.code, file=err)
                outcome.code = 1
        except WorkFenced as stop:
            outcome.fenced, outcome.code = str(stop), 0
        except CommandTimeout:
            outcome.timed_out = True
        except Exception:  # anything else that escapes main() is a traceback for the user
            outcome.escaped = traceback.format_exc()
    outcome.stderr, outcome.stdout = err.getvalue(), out.getvalue()
    return outcome


ERROR_LINE = re.compile(r"^difforge(?: [\w-]+)*: error: \S")
"""``difforge: error: ...`` (and argparse's ``difforge train: error: ...`` for a usage error)."""
INFO_LINES = [
    re.compile(pattern)
    for pattern in (
        r"^note: ",
        r"^changed: ",
        r"^difforge \S+: training ",
        r"^skipped \d+ ",
        r"\d+ unreadable files? skipped",
        r"\bCC[ -]BY\b",
    )
]
"""Lines a command may print before its error line (it had started: banner, data summary)."""


def cli_failures(outcome: Outcome, codes: Sequence[int] = (0, EXIT_USAGE)) -> list[tuple[str, str]]:
    """The failures of one command: a traceback, an exit status outside ``codes``, an error
    that is not exactly one ``difforge: error:`` line (the last one), a timeout."""
    where = " ".join(outcome.argv)
    if outcome.timed_out:
        return [("timeouts", f"{where}: no exit in {COMMAND_SECONDS:.0f} s")]
    if outcome.escaped:
        return [("tracebacks", f"{where}: {outcome.last_line()}\n{outcome.escaped}")]
    found = []
    if "Traceback (most recent call last)" in outcome.stderr:
        found.append(("tracebacks", f"{where}: traceback on stderr:\n{outcome.stderr[-3000:]}"))
    if outcome.code not in codes:
        found.append(("wrong exit codes", f"{where}: exit {outcome.code}: {outcome.last_line()}"))
    if outcome.code not in (0, None):
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if ERROR_LINE.match(line)]
        stray = [
            line for i, line in enumerate(lines)
            if i not in errors and not any(p.search(line) for p in INFO_LINES)
        ]  # fmt: skip
        if len(errors) != 1 or errors[0] != len(lines) - 1 or stray:
            found.append(
                ("multi-line errors", f"{where}: exit {outcome.code}, stderr:\n{outcome.stderr[-2000:]}")
            )
    return found


def _record(tally: Tally, outcome: Outcome, codes: Sequence[int] = (0, EXIT_USAGE)) -> list[tuple[str, str]]:
    failures = cli_failures(outcome, codes)
    for kind, detail in failures:
        tally.fail(kind, detail)
    tally.note("commands")
    tally.note("fenced" if outcome.fenced else f"exit {outcome.code}")
    return failures


def _constant_images(paths: Sequence[Path]) -> list[str]:
    """The images among ``paths`` whose pixels are all one value."""
    found = []
    for path in paths:
        with Image.open(path) as picture:
            pixels = np.asarray(picture)
        if pixels.size and pixels.min() == pixels.max():
            found.append(f"{path.name} is all {pixels.flat[0]}")
    return found


def _constant_tiles(grid: np.ndarray, size: int, padding: int = 2) -> str | None:
    """Which tile of a `difforge.images.make_grid` grid of ``size`` px images is all one value."""
    step = size + padding
    rows, cols = (grid.shape[0] - padding) // step, (grid.shape[1] - padding) // step
    for row in range(rows):
        for col in range(cols):
            top, left = padding + row * step, padding + col * step
            tile = grid[top : top + size, left : left + size]
            if tile.size and tile.min() == tile.max() and tile.flat[0] != 255:  # 255: an empty cell
                return f"image {row * cols + col} is all {tile.flat[0]}"
    return None


def _non_finite_tensors(path: Path) -> list[str]:
    from safetensors.torch import load_file

    return [f"{path.name}:{name}" for name, t in load_file(str(path)).items() if t.is_floating_point()
            and not bool(t.isfinite().all())]  # fmt: skip


def short(value: Any, limit: int = 60) -> str:
    """``repr`` with long strings and bytes cut (for failure reports)."""
    if isinstance(value, (list, tuple)):
        inner = ", ".join(short(v, limit) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    text = repr(value)
    if len(text) > limit and isinstance(value, (str, bytes)):
        return f"{value[: limit // 2]!r}...({len(value)} {'bytes' if isinstance(value, bytes) else 'chars'})"
    return text


_counter = iter(range(10**12))


def _unique(prefix: str) -> str:
    return f"{prefix}{next(_counter):06d}"


# ---- generators: image files ----------------------------------------------------------------

MODE_FORMATS = {
    "1": ["PNG", "BMP", "TIFF", "GIF", "JPEG"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "P": ["PNG", "BMP", "TIFF", "GIF"],
    "P+transparency": ["PNG", "GIF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "LA": ["PNG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "YCbCr": ["TIFF", "JPEG"],
    "LAB": ["TIFF"],
}
"""Image modes and the formats Pillow writes them in (each is read back in a mode difforge converts)."""
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}
IMAGE_NAME_EXTENSIONS = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".PNG", ".JPG"]
OTHER_EXTENSIONS = [".txt", ".json", "", ".png.bak", ".svg", ".pngx"]
MAX_DECLARED = 1 << 28  # difforge.data.io.MAX_IMAGE_PIXELS: more declared pixels are refused unread


@dataclass(frozen=True)
class ImageCase:
    """One generated file: where it goes, its bytes, what it is and what difforge must do
    with it: ``good`` (decoded), ``bad`` (skipped), ``either``, ``ignored`` (not an image name)."""

    name: str
    data: bytes
    kind: str
    expect: str

    def __repr__(self) -> str:
        return f"ImageCase({self.name!r}, {self.kind}, {len(self.data)} bytes, {self.expect})"


def encode_image(mode: str, fmt: str, width: int, height: int, seed: int, pattern: str,
                 frames: int = 1, exif_orientation: int | None = None) -> tuple[bytes, str]:  # fmt: skip
    """A small valid image of ``mode`` encoded as ``fmt`` (falls back to PNG RGB when Pillow
    cannot write the pair). Returns (bytes, format written)."""
    rng = np.random.default_rng(seed)
    if pattern == "constant":
        base = np.full((height, width, 4), rng.integers(0, 256), dtype=np.uint8)
    elif pattern == "gradient":
        ramp = np.linspace(0, 255, width * height, dtype=np.float64).reshape(height, width)
        base = np.repeat(ramp[..., None], 4, axis=2).astype(np.uint8)
    else:
        base = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgb = Image.fromarray(base[..., :3])
    if mode == "1":
        image = Image.fromarray(base[..., 0] > 127)
    elif mode == "L":
        image = rgb.convert("L")
    elif mode in ("P", "P+transparency"):
        image = rgb.convert("P")
    elif mode == "RGBA":
        image = Image.fromarray(base)
    elif mode == "LA":
        image = Image.fromarray(base).convert("LA")
    elif mode == "I;16":
        image = Image.fromarray((base[..., 0].astype(np.uint16) * 257).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(base[..., 0].astype(np.int32) * 300)
    elif mode == "F":
        image = Image.fromarray(base[..., 0].astype(np.float32) / 255.0)
    elif mode == "RGB":
        image = rgb
    else:
        image = rgb.convert(mode)
    options: dict[str, Any] = {}
    if mode == "P+transparency":
        options["transparency"] = int(base[0, 0, 0]) % 8
    if exif_orientation and fmt in ("JPEG", "PNG", "TIFF", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif.tobytes()
    if frames > 1 and fmt in ("GIF", "TIFF", "WEBP", "PNG"):
        options["save_all"] = True
        options["append_images"] = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] * (frames - 1)
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt, **options)
    except (OSError, ValueError, KeyError, TypeError):
        buffer = io.BytesIO()
        rgb.save(buffer, "PNG")
        fmt = "PNG"
    return buffer.getvalue(), fmt


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def huge_header(fmt: str, width: int, height: int, tail: bytes) -> bytes:
    """A file of ``fmt`` whose header declares ``width`` x ``height`` pixels, then ``tail``."""
    if fmt == "PNG":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        idat = _png_chunk(b"IDAT", zlib.compress(tail))
        return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")
    if fmt == "GIF":
        return b"GIF89a" + struct.pack("<HHBBB", width, height, 0xF0, 0, 0) + b"\0" * 6 + tail + b";"
    if fmt == "BMP":
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 54 + len(tail), 0, 0, 54) + info + tail
    if fmt == "JPEG":
        sof = (
            b"\xff\xc0"
            + struct.pack(">HBHHB", 17, 8, height, width, 3)
            + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        )
        return b"\xff\xd8" + sof + tail + b"\xff\xd9"
    if fmt == "TIFF":  # little-endian, one IFD: width, length, 8-bit grey, one strip
        entries = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, 1),
            (262, 3, 1, 1),
            (273, 4, 1, 8 + 2 + 9 * 12 + 4),
            (277, 3, 1, 1),
            (278, 4, 1, height),
            (279, 4, 1, len(tail)),
        ]
        ifd = struct.pack("<H", len(entries)) + b"".join(
            struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in entries
        ) + struct.pack("<I", 0)  # fmt: skip
        return b"II*\0" + struct.pack("<I", 8) + ifd + tail
    raise ValueError(fmt)


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\0", b"MM\0*", b"RIFF\0\0\0\0WEBP"]


@st.composite
def valid_images(draw: Any) -> tuple[bytes, str, str]:
    """(bytes, format, mode) of a small valid image, any mode."""
    mode = draw(st.sampled_from(sorted(MODE_FORMATS)))
    fmt = draw(st.sampled_from(MODE_FORMATS[mode]))
    data, fmt = encode_image(
        mode,
        fmt,
        width=draw(st.integers(1, 40)),
        height=draw(st.integers(1, 40)),
        seed=draw(st.integers(0, 2**32 - 1)),
        pattern=draw(st.sampled_from(["noise", "constant", "gradient"])),
        frames=draw(st.sampled_from([1, 1, 1, 2])),
        exif_orientation=draw(st.sampled_from([None, None, 3, 6, 8])),
    )
    return data, fmt, mode


@st.composite
def image_files(draw: Any) -> ImageCase:
    """One file of a data folder: valid (any mode), random bytes, truncated, zero-size, huge
    declared dimensions, a wrong extension, or not an image name at all."""
    kind = draw(st.sampled_from(
        ["valid", "random_bytes", "truncated", "zero_size", "huge_dims", "wrong_extension", "other_name"]
    ))  # fmt: skip
    ext = draw(st.sampled_from(IMAGE_NAME_EXTENSIONS))
    if kind == "valid":
        data, fmt, mode = draw(valid_images())
        return ImageCase(EXTENSIONS[fmt], data, f"valid {mode} {fmt}", "good")
    if kind == "random_bytes":
        magic = draw(st.sampled_from([b"", b"", *MAGICS]))
        data = magic + draw(st.binary(min_size=0 if magic else 1, max_size=400))
        where = f" after a {magic[:4]!r} magic" if magic else ""
        return ImageCase(ext, data, f"random bytes{where}", "either")
    if kind == "truncated":
        data, fmt, mode = draw(valid_images())
        cut = draw(st.integers(0, max(0, len(data) - 1)))
        return ImageCase(EXTENSIONS[fmt], data[:cut], f"{mode} {fmt} cut at {cut}/{len(data)}",
                         "bad" if cut < 8 else "either")  # fmt: skip
    if kind == "zero_size":
        return ImageCase(ext, b"", "zero-size", "bad")
    if kind == "huge_dims":
        fmt = draw(st.sampled_from(["PNG", "GIF", "BMP", "JPEG", "TIFF"]))
        top = 2**31 - 1 if fmt in ("PNG", "BMP", "TIFF") else 65535
        width = draw(st.integers(1, top))
        low = min(top, MAX_DECLARED // width + 1)
        height = draw(st.integers(low, top))
        if width * height <= MAX_DECLARED:  # only when width itself is too small for any height
            width, height = top, top
        tail = draw(st.binary(max_size=64))
        return ImageCase(EXTENSIONS[fmt], huge_header(fmt, width, height, tail),
                         f"{fmt} declaring {width}x{height}", "bad")  # fmt: skip
    if kind == "wrong_extension":
        data, fmt, mode = draw(valid_images())
        wrong = draw(st.sampled_from([e for e in IMAGE_NAME_EXTENSIONS if e.lower() != EXTENSIONS[fmt]]))
        return ImageCase(wrong, data, f"{mode} {fmt} named *{wrong}", "good")
    other = draw(st.sampled_from(OTHER_EXTENSIONS))
    data = draw(st.one_of(st.binary(max_size=100), valid_images().map(lambda image: image[0])))
    return ImageCase(other, data, f"not an image name (*{other or 'no extension'})", "ignored")


@st.composite
def image_folders(draw: Any, max_files: int = 10) -> list[ImageCase]:
    """A data folder: 1..max_files generated files, some in sub-folders, odd names included."""
    files = draw(st.lists(image_files(), min_size=1, max_size=max_files))
    placed = []
    for index, case in enumerate(files):
        folder = draw(st.sampled_from(["", "", "sub/", "sub/deeper/", "ü ñ/"]))
        stem = draw(st.sampled_from(["img", "photo 1", "ünï", "x.y"]))
        placed.append(ImageCase(f"{folder}{index:03d}-{stem}{case.name}", case.data, case.kind, case.expect))
    return placed


def write_folder(folder: Path, files: Sequence[ImageCase]) -> None:
    for case in files:
        path = folder / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)


def check_data_folder(files: Sequence[ImageCase], workdir: Path, tally: Tally, keep: bool = False) -> list:
    """``difforge train FOLDER --steps 1`` (tiny) on the generated folder: it trains, with
    every image file either used or skipped and counted (bad ones skipped, good ones used),
    or exits 2 with one line when nothing is readable."""
    name = _unique("data")
    folder, out = workdir / name, workdir / f"{name}-run"
    write_folder(folder, files)
    argv = ["train", str(folder), "--out", str(out), *CLI_TINY, "--steps", "1", "--checkpoint-every", "0"]
    outcome = run_cli(argv, workdir)
    tally.note("cases")
    tally.note("files", len(files))
    failures = _record(tally, outcome)
    listed = [case for case in files if case.expect != "ignored"]
    good = sum(case.expect == "good" for case in listed)
    bad = sum(case.expect == "bad" for case in listed)
    what = f"{argv[:2]} with files {list(files)}"
    if outcome.code == 0 and not outcome.fenced:
        data = json.loads((out / "config.json").read_text())["data"]
        used, skipped = data["num_images"], data["skipped"]
        tally.note("files skipped", skipped)
        problems = []
        if used + skipped != len(listed):
            problems.append(f"{used} used + {skipped} skipped != {len(listed)} image files")
        if used < good or skipped < bad:
            problems.append(f"{used} used, {skipped} skipped for {good} good and {bad} bad files")
        if skipped and not re.search(rf"\b{skipped} unreadable files? skipped", outcome.stderr):
            problems.append(f"{skipped} skipped files not reported on stderr")
        for problem in problems:
            failures.append(("miscounted files", f"{problem}: {what}"))
            tally.fail("miscounted files", f"{problem}: {what}")
    elif outcome.code == EXIT_USAGE and good:
        detail = f"{good} readable files refused ({outcome.last_line()}): {what}"
        failures.append(("refused readable data", detail))
        tally.fail("refused readable data", detail)
    if not keep or not failures:
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return failures


# ---- generators: damaged runs ---------------------------------------------------------------


def make_base_run(run: Path, steps: int = 3, stop_after: int = 2) -> Path:
    """A tiny run planned for ``steps`` steps, stopped after ``stop_after`` (a checkpoint at
    every step), so that a resume has work left."""
    import torch

    from difforge.diffusion import DiffusionConfig
    from difforge.training import TrainConfig, Trainer, prepare_run

    config = TrainConfig(**{**TINY_TRAIN, "steps": steps})  # type: ignore[arg-type]
    model, process, dataset, run_config = prepare_run(config, DiffusionConfig(num_timesteps=50))
    trainer = Trainer(model, process, dataset, run_config, run, device=torch.device("cpu"), progress=False)
    trainer.train(stop_after=stop_after)
    return run


def _json_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            paths.extend(_json_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths.extend(_json_paths(value, (*prefix, index)))
    return paths


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            10**23,
            1e308,
            1e-308,
            "",
            "x",
            "nan",
            [],
            {},
            [1, 2],
            {"a": 1},
            "step_00000001",
            "../x",
            "unet",
            "gaussian",
        ]
    ),  # fmt: skip
)
METRICS_GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b'{"step": "x", "loss": "nan"}\n', b"\xff\xfe\xfd\n", b"[1, 2]\n", b'{"loss": NaN}\n',
        b'{"loss": 1e999, "step": -1}\n', b'{"step": 1, "loss": null}\n', b'{"loss": {"a": 1}}\n',
        b'{"step": 3, "loss": 0.5', b"\0" * 100, b'{"loss": ' + b"9" * 5000 + b"}\n", b"null\n", b'"loss"\n',
    ]),
)  # fmt: skip


def run_damages(base: Path) -> Any:
    """A strategy of damage lists (1..3 operations) for a copy of the run ``base``: deletions,
    truncations, bit flips, zeroed files, bad safetensors header lengths, random JSON edits
    (config.json, weights.json, manifests), JSON files replaced by other bytes, garbage in
    metrics.jsonl."""
    files = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
    folders = sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_dir())
    weights = [f for f in files if f.endswith(".safetensors")]
    documents = {f: json.loads((base / f).read_text()) for f in files if f.endswith(".json")}
    json_edit = st.sampled_from(sorted(documents)).flatmap(
        lambda rel: st.tuples(
            st.just("json"), st.just(rel), st.sampled_from(["set", "delete", "add", "wrap"]),
            st.sampled_from(_json_paths(documents[rel])), JSON_VALUES,
        )
    )  # fmt: skip
    operation = st.one_of(
        st.tuples(st.just("delete"), st.sampled_from(files + folders)),
        st.tuples(st.just("truncate"), st.sampled_from(files), st.floats(0, 1)),
        st.tuples(st.just("bitflip"), st.sampled_from(weights + sorted(documents)),
                  st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=4), st.integers(0, 7)),
        st.tuples(st.just("zero"), st.sampled_from(weights)),
        st.tuples(st.just("header"), st.sampled_from(weights),
                  st.one_of(st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))),
        json_edit,
        json_edit,
        st.tuples(st.just("replace"), st.sampled_from([*sorted(documents), "metrics.jsonl"]),
                  st.one_of(st.binary(max_size=200), st.sampled_from(
                      [b"", b"[]", b"null", b"{}", b'"x"', b"1e999", b"NaN", b'{"format": 7}']))),
        st.tuples(st.just("append"), st.just("metrics.jsonl"), METRICS_GARBAGE),
    )  # fmt: skip
    return st.lists(operation, min_size=1, max_size=3)


def _edit_json(document: Any, action: str, path: tuple, value: Any) -> Any:
    if not path:
        return value if action == "set" else [document] if action == "wrap" else document
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "set":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif isinstance(parent[key], dict):
        parent[key]["zz_fuzz"] = value
    elif isinstance(parent[key], list):
        parent[key].append(value)
    else:
        parent[key] = value
    return document


def apply_damage(run: Path, operations: Sequence[tuple]) -> None:
    """Apply `run_damages` operations to the run folder ``run`` (one on a path an earlier one
    removed does nothing)."""
    for kind, rel, *args in operations:
        path = run / rel
        if not path.exists():
            continue
        if kind == "delete":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            continue
        if path.is_dir():
            continue
        data = bytearray(path.read_bytes())
        if kind == "truncate":
            data = data[: int(len(data) * args[0])]
        elif kind == "bitflip" and data:
            for where in args[0]:
                data[int(where * len(data))] ^= 1 << args[1]
        elif kind == "zero":
            data = bytearray(len(data))
        elif kind == "header":
            data[:8] = struct.pack("<Q", args[0])
        elif kind == "json":
            action, json_path, value = args
            try:
                document = json.loads(data.decode("utf-8"))
                document = _edit_json(document, action, tuple(json_path), value)
            except (ValueError, KeyError, IndexError, TypeError):  # an earlier edit changed the shape
                continue
            data = bytearray(json.dumps(document, indent=2).encode())
        elif kind == "replace":
            data = bytearray(args[0])
        elif kind == "append":
            data += args[0]
        path.write_bytes(bytes(data))


def check_damaged_run(base: Path, operations: Sequence[tuple], workdir: Path, tally: Tally,
                      keep: bool = False) -> list:  # fmt: skip
    """``info RUN``, ``sample RUN -n 2 --steps 2`` and ``train --resume --out RUN`` on a
    damaged copy of ``base``: exit 0 or 2 with one line; images never all one value; a
    resumed run's weights finite."""
    run = workdir / _unique("damaged")
    shutil.copytree(base, run)
    apply_damage(run, operations)
    tally.note("cases")
    failures: list[tuple[str, str]] = []
    what = f"run damaged by {short(list(operations))}"
    images = workdir / f"{run.name}-images"
    commands = [
        ["info", str(run)],
        ["sample", str(run), "-n", "2", "--steps", "2", "--out", str(images / "grid.png"),
         "--images-dir", str(images / "each")],
        ["train", "--resume", "--out", str(run), "--no-progress"],
    ]  # fmt: skip
    for argv in commands:
        outcome = run_cli(argv, workdir)
        found = [(kind, f"{detail}\n    {what}") for kind, detail in cli_failures(outcome)]
        tally.note("commands")
        tally.note(f"{argv[0]}: {'fenced' if outcome.fenced else f'exit {outcome.code}'}")
        if outcome.code == 0 and not outcome.fenced and not found:
            try:
                if argv[0] == "sample":
                    bad = _constant_images(sorted((images / "each").glob("*.png")))
                    if not list((images / "each").glob("*.png")):
                        bad.append("no image written")
                elif argv[0] == "train":
                    bad = [
                        n
                        for f in ("ema.safetensors", "model.safetensors")
                        for n in _non_finite_tensors(run / f)
                    ]
                else:
                    bad = []
            except Exception as error:  # an output that cannot be read back
                bad = [f"unreadable output ({type(error).__name__}: {error})"]
            if bad:
                found.append(
                    ("non-finite or constant outputs", f"{' '.join(argv)}: {', '.join(bad)}\n    {what}")
                )
        for kind, detail in found:
            tally.fail(kind, detail)
        failures.extend(found)
    if failures and keep:
        kept = workdir / "failures" / run.name
        shutil.copytree(base, kept)
        apply_damage(kept, operations)
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)
    return failures


# ---- generators: command lines --------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    option: str
    takes_value: bool
    choices: tuple[str, ...] = ()


def cli_flags(command: str) -> list[Flag]:
    """Every option of ``difforge COMMAND`` (what ``difforge COMMAND --help`` lists, but
    ``--help`` itself), read from the real parser: whether it takes a value, and its choices."""
    from difforge.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = []
    for action in subparsers.choices[command]._actions:
        if isinstance(action, argparse._HelpAction):  # --help ends every command line at once
            continue
        choices = tuple(str(c) for c in action.choices) if action.choices else ()
        for option in action.option_strings:
            flags.append(Flag(option, action.nargs != 0, choices))
    return flags


SANE = ["0", "1", "2", "3", "0.5", "0.9", "8", "16"]
"""Values most number flags accept (so that some generated lines get past validation)."""
NUMBERS = ["nan", "NaN", "inf", "-inf", "+inf", "-1", "0", "1", "2", "3", "-0", "0.5", "1e-300", "1e308",
           "1e309", str(10**23), str(2**63), str(2**64), "100000", "65536", "4096", "1e3", "0x10",
           "1_000", "7 ", "-5.5"]  # fmt: skip
WORDS = ["", "abc", "ö", "-", "true", "None", "cpu", "cuda", "cuda:7", "mps", "ema", "raw", "ddim", "ddpm",
         "dpmpp_2m", "plms", "tiny", "mnist", "cosine", "x0", "learned_range", "hybrid", "0,1", "3,cat",
         "cat", "digits", "emoji", "importance", "bf16", "fp16"]  # fmt: skip
PATHS = ["out.png", "out.jpg", "out.gif", "out.xyz", "outdir", "nope/deeper/x.png", "@RUN",
         "@RUN/checkpoints/step_00000002", "@DATA", "@FILE", "@RUN/config.json", "."]  # fmt: skip
"""Relative to the case's own folder (the command runs there); @RUN, @DATA, @FILE are a copy
of the base run, a folder of 4 valid images, one image file."""


@st.composite
def command_lines(draw: Any, flags: dict[str, list[Flag]]) -> list[str]:
    """A ``difforge train|sample|info`` command line: a small valid base (tiny settings, or
    ``sample @RUN -n 2 --steps 2``), then 1..4 random flags of the real parsers with values
    from the flag's choices, odd numbers, words and paths; sometimes ``--flag=value``, a
    missing value, a mistyped or abbreviated flag, a stray word, or no base at all."""
    command = draw(st.sampled_from(["train", "train", "sample", "sample", "info", "bare"]))
    if command == "train":
        data = draw(st.sampled_from(["digits", "digits", "@DATA", "@FILE", "nope", "", "@RUN", None]))
        argv = ["train", *([data] if data is not None else []), "--out", draw(st.sampled_from(["t", "@RUN"])),
                *CLI_TINY, "--steps", "1", "--checkpoint-every", "0"]  # fmt: skip
        pool = flags["train"]
    elif command == "sample":
        argv = ["sample", draw(st.sampled_from(["@RUN", "@RUN", "@RUN/checkpoints/step_00000001", "nope"])),
                "-n", "2", "--steps", "2", "--out", "s.png"]  # fmt: skip
        pool = flags["sample"]
    elif command == "info":
        argv, pool = ["info", draw(st.sampled_from(["@RUN", "nope", "@DATA"]))], flags["info"]
    else:
        argv = [draw(st.sampled_from(["train", "sample", "info", "eval", "--version", "trian"]))]
        pool = flags["train"] + flags["sample"]
    for _ in range(draw(st.integers(1, 4))):
        flag = draw(st.sampled_from(pool))
        option = flag.option
        style = draw(
            st.sampled_from(["plain"] * 6 + ["equals", "missing", "mistyped", "abbreviated", "stray"])
        )
        if style == "mistyped" and len(option) > 3:
            cut = draw(st.integers(2, len(option) - 1))
            option = option[:cut] + option[cut + 1 :]
        elif style == "abbreviated" and len(option) > 4:
            option = option[: draw(st.integers(3, len(option) - 1))]
        if style == "stray":
            argv.append(draw(st.sampled_from(WORDS + NUMBERS)))
            continue
        if not flag.takes_value or style == "missing":
            argv.append(option)
            continue
        value = draw(st.one_of(
            st.sampled_from(list(flag.choices) or SANE), st.sampled_from(SANE), st.sampled_from(NUMBERS),
            st.sampled_from(WORDS), st.sampled_from(PATHS),
            st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=6),
        ))  # fmt: skip
        argv.extend([f"{option}={value}"] if style == "equals" else [option, value])
    return argv


def _resolve(argv: Sequence[str], places: dict[str, str]) -> list[str]:
    resolved = []
    for word in argv:
        for marker, path in places.items():
            if marker in word:
                word = word.replace(marker, path)
        resolved.append(word)
    return resolved


def check_command_line(argv: Sequence[str], base: Path, workdir: Path, tally: Tally) -> list:
    """One generated command line, run in a fresh folder with a copy of the base run, a data
    folder and an image file: exit 0 or 2, one line; a written grid not all one value."""
    case = workdir / _unique("cli")
    case.mkdir()
    shutil.copytree(base, case / "run")
    data = case / "data"
    data.mkdir()
    for index in range(4):
        encoded, _ = encode_image("RGB", "PNG", 12, 12, index, "noise")
        (data / f"{index}.png").write_bytes(encoded)
    shutil.copy(data / "0.png", case / "image.png")
    argv = _resolve(argv, {"@RUN": str(case / "run"), "@DATA": str(data), "@FILE": str(case / "image.png")})
    outcome = run_cli(argv, case)
    tally.note("cases")
    failures = _record(tally, outcome)
    if outcome.code == 0 and not outcome.fenced and argv[0] == "sample" and not failures:
        size = json.loads((case / "run" / "config.json").read_text())["model"]["image_size"]
        for grid in [p for p in case.glob("*.png") if p.name != "image.png"]:
            with Image.open(grid) as picture:
                constant = _constant_tiles(np.asarray(picture), size)
            if constant:
                detail = f"{' '.join(argv)}: in {grid.name}, {constant}"
                failures.append(("non-finite or constant outputs", detail))
                tally.fail("non-finite or constant outputs", detail)
    shutil.rmtree(case, ignore_errors=True)
    return failures


# ---- driving hypothesis ---------------------------------------------------------------------


def fuzz_settings(examples: int, derandomize: bool = False) -> settings:
    """Settings for a fixed budget: no deadline, no database, no shrinking (a failure is
    reported as generated); ``derandomize``: the same cases every run (for CI)."""
    return settings(
        max_examples=examples,
        derandomize=derandomize,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def fuzz(strategy: Any, check: Callable[[Any], Any], examples: int, seed: int) -> None:
    """Run ``check`` on ``examples`` values of ``strategy`` (it records; it never raises)."""

    @fuzz_settings(examples)
    @hypothesis_seed(seed)
    @given(strategy)
    def run(case: Any) -> None:
        check(case)

    run()


# ---- SIGKILL --------------------------------------------------------------------------------

_STAGING = re.compile(r"^\.tmp-step_\d+-\d+$")
_BANNER = re.compile(r"for (\d+) steps(?: from step (\d+))? on ")


def _subprocess_env() -> dict[str, str]:
    """The environment of a ``python -m difforge`` subprocess: it imports the same difforge."""
    import difforge

    root = str(Path(difforge.__file__).resolve().parents[1])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def train_command(run: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "difforge", "train", "digits", "--out", str(run), "--steps", str(steps),
            "--checkpoint-every", str(every), *CLI_TINY]  # fmt: skip


def resume_command(run: Path) -> list[str]:
    return [sys.executable, "-m", "difforge", "train", "--resume", "--out", str(run), "--no-progress"]


def temporaries(run: Path) -> list[Path]:
    """Every ``.tmp-*`` file or folder under ``run``."""
    return sorted(p for p in run.rglob("*") if ".tmp-" in p.name) if run.is_dir() else []


def step_folders(run: Path) -> list[Path]:
    root = run / "checkpoints"
    found = [p for p in root.iterdir() if re.fullmatch(r"step_\d+", p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def same_weights(run: Path, reference: Path) -> list[str]:
    """The differences between the EMA and raw weights of two runs (tensor by tensor, bitwise)."""
    import torch
    from safetensors.torch import load_file

    problems = []
    for name in ("ema.safetensors", "model.safetensors"):
        try:
            a, b = load_file(str(run / name)), load_file(str(reference / name))
        except Exception as error:
            problems.append(f"{name}: {type(error).__name__}: {error}")
            continue
        if sorted(a) != sorted(b):
            problems.append(f"{name}: other tensor names")
            continue
        differ = [
            k
            for k in a
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])
        ]
        if differ:
            problems.append(f"{name}: {len(differ)} tensors differ (e.g. {differ[0]})")
    return problems


def _wait_for_write(process: subprocess.Popen, run: Path, skip: int = 0) -> bool:
    """Poll ``RUN/checkpoints`` until a checkpoint is being assembled, after ``skip`` other
    checkpoints (by name) were (True), or until the process exits (False)."""
    root = run / "checkpoints"
    seen: set[str] = set()
    stale = set(os.listdir(root)) if root.is_dir() else set()  # a killed writer's leftovers
    while process.poll() is None:
        try:
            names = {name for name in os.listdir(root) if _STAGING.match(name)} - stale
        except FileNotFoundError:
            names = set()
        new = names - seen
        if new and len(seen) >= skip:
            return True
        seen |= new
        time.sleep(0.0005)
    return False


def _start_step(log: Path) -> tuple[int | None, int | None]:
    """(planned steps, start step) from a launch's banner; (None, None) when it was killed before."""
    match = _BANNER.search(log.read_text(errors="replace")) if log.is_file() else None
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2) or 0)


def sigkill_campaign(
    kills: int,
    workdir: Path,
    *,
    steps: int = 12,
    everies: Sequence[int] = (1, 2),
    seed: int = 0,
    max_delay: float | None = None,
    per_run: int = 4,
    say: Callable[[str], None] = print,
) -> Tally:
    """``kills`` SIGKILLs of tiny training runs (``steps`` steps, a checkpoint every
    ``everies[i]`` steps, at most ``per_run`` kills per run), half at random moments (a delay
    up to the uninterrupted run's time, or ``max_delay``), half while a checkpoint is being
    written; each followed by a plain resume until the run finishes; then the checks of the
    module docstring against an uninterrupted run of the same settings. With ``max_delay``
    the uninterrupted runs go in parallel with the killed ones (quicker, for the tests)."""
    from difforge.errors import DifforgeError
    from difforge.runs.storage import verify_checkpoint

    rng = random.Random(seed)
    tally = Tally("SIGKILL")
    env = _subprocess_env()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    references: dict[int, Path] = {}
    durations: dict[int, float] = {}
    background: dict[int, subprocess.Popen] = {}
    for every in dict.fromkeys(everies):
        ref = workdir / f"reference-every{every}"
        start = time.monotonic()
        with (logs / f"{ref.name}.err").open("wb") as log:
            process = subprocess.Popen(
                train_command(ref, steps, every), env=env, stdout=subprocess.DEVNULL, stderr=log
            )
        references[every] = ref
        if max_delay is None:
            if process.wait() != 0:
                raise RuntimeError(f"the uninterrupted run failed: see {logs / (ref.name + '.err')}")
            durations[every] = time.monotonic() - start
            say(f"uninterrupted run, checkpoint every {every}: {durations[every]:.1f} s")
        else:
            background[every], durations[every] = process, max_delay

    done = trial = 0
    while done < kills:
        every = everies[trial % len(everies)]
        run = workdir / f"run{trial:02d}-every{every}"
        tally.note("runs")
        command = train_command(run, steps, every)
        committed = 0  # the newest checkpoint on disk after the last kill
        killed_here = launch = 0
        lost = False
        while True:
            log_path = logs / f"{run.name}-{launch:02d}.err"
            mode = None
            if done < kills and killed_here < per_run:
                mode = "write" if done % 2 else "random"
            with log_path.open("wb") as log:
                started = time.monotonic()
                process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
                hit = False
                if mode == "random":
                    try:
                        process.wait(timeout=rng.uniform(0, 0.9 * durations[every]))
                    except subprocess.TimeoutExpired:
                        hit = True
                elif mode == "write":  # during the write of a random one of the checkpoints left
                    writes_left = max(1, (steps - committed) // every)
                    hit = _wait_for_write(process, run, skip=rng.randrange(writes_left))
                    if hit:
                        time.sleep(rng.choice([0, 0, 0, 0.0005, 0.002, 0.005]))
                if hit and process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                code = process.wait()
            if code == 0 and mode == "random":  # it ran out before the delay: aim earlier next time
                durations[every] = max(1.0, min(durations[every], time.monotonic() - started))
            planned, start = _start_step(log_path)
            if start is not None and start < committed and not lost:  # counted once per run
                lost = True
                tally.fail(
                    "runs that lost steps",
                    f"{run.name}: resumed from step {start}, step_{committed} was on disk",
                )
            if planned is not None and planned != steps:
                tally.fail(
                    "plans not kept", f"{run.name}: launch {launch} planned {planned} steps, not {steps}"
                )
            launch += 1
            if code == -signal.SIGKILL:
                done += 1
                killed_here += 1
                tally.note("kills")
                left = temporaries(run)
                if mode == "write" and left:
                    tally.note("kills during a checkpoint write")
                folders = step_folders(run)
                for folder in folders:
                    try:
                        verify_checkpoint(folder)
                    except DifforgeError as error:
                        tally.fail("damaged checkpoints after a kill", f"{folder}: {error}")
                committed = max([committed, *(int(p.name[5:]) for p in folders)])
                during = ", during a write" if mode == "write" and left else ""
                say(
                    f"  kill {done}/{kills} ({mode}{during}) of {run.name} launch {launch}: "
                    f"{len(left)} temporaries, newest step_{committed}"
                )
                if (run / "config.json").is_file():
                    command = resume_command(run)
                    tally.note("resumes")
                else:
                    tally.note("restarts (killed before config.json)")
                continue
            if code != 0:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                tally.fail("failed resumes", f"{' '.join(command)}: exit {code}: {tail}")
                break
            break
        tally.note("runs finished")
        if background.get(every) is not None:
            if background[every].wait() != 0:
                raise RuntimeError(f"the uninterrupted run failed: see {logs}")
            background[every] = None  # type: ignore[assignment]
        left = temporaries(run)
        if left:
            tally.fail("temp files left", f"{run.name}: {[str(p.relative_to(run)) for p in left]}")
        for problem in same_weights(run, references[every]):
            tally.fail("mismatches", f"{run.name}: {problem}")
        try:
            saved_steps = json.loads((run / "config.json").read_text())["train"]["steps"]
        except (OSError, ValueError, KeyError) as error:
            saved_steps = f"unreadable ({error})"
        folders = step_folders(run)
        last = folders[-1].name if folders else None
        if saved_steps != steps or last != f"step_{steps:08d}":
            tally.fail("plans not kept", f"{run.name}: train.steps {saved_steps}, last checkpoint {last}")
            if not lost and last != f"step_{steps:08d}":
                tally.fail("runs that lost steps", f"{run.name}: ends at {last}")
        trial += 1
    for process in background.values():
        if process is not None and process.wait() != 0:
            raise RuntimeError(f"the uninterrupted run failed: see {logs}")
    return tally


# ---- the command line -----------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fuzz_table(tallies: Sequence[Tally]) -> str:
    header = ("target", "cases", "commands", "fenced", *FAILURE_KINDS)
    rows = [header]
    for tally in tallies:
        cases = str(tally.counts["cases"])
        if tally.counts["files"]:
            cases += f" ({tally.counts['files']} files, {tally.counts['files skipped']} skipped)"
        fenced = sum(v for k, v in tally.counts.items() if k.endswith("fenced"))
        rows.append((tally.name, cases, str(tally.counts["commands"]), str(fenced),
                     *(str(tally.counts[k]) for k in FAILURE_KINDS)))  # fmt: skip
    return _table(rows)


def sigkill_table(tally: Tally) -> str:
    keys = ["kills", "kills during a checkpoint write", "resumes", "restarts (killed before config.json)",
            "runs", *SIGKILL_FAILURES]  # fmt: skip
    return _table([("SIGKILL", "count"), *((k, str(tally.counts[k])) for k in keys)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs of training runs (default 20)")
    parser.add_argument("--steps", type=int, default=12, help="steps of each killed run (default 12)")
    parser.add_argument("--images", type=int, default=1000, help="generated image files (default 1000)")
    parser.add_argument("--damaged", type=int, default=500, help="damaged run folders (default 500)")
    parser.add_argument(
        "--command-lines", type=int, default=100, help="generated command lines (default 100)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder, removed)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="difforge-reliability-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    start = time.monotonic()
    tallies: list[Tally] = []
    kill_tally = None
    try:
        if args.kills:
            kill_tally = sigkill_campaign(args.kills, workdir / "sigkill", steps=args.steps, seed=args.seed)
            print(f"SIGKILL part: {time.monotonic() - start:.0f} s", flush=True)
        if args.images:
            tally = Tally("image folders")
            tallies.append(tally)
            images_dir = workdir / "images"
            images_dir.mkdir(exist_ok=True)
            round_ = 0
            while tally.counts["files"] < args.images:
                left = args.images - tally.counts["files"]
                fuzz(image_folders(), lambda files: check_data_folder(files, images_dir, tally, keep),
                     examples=max(1, left // 6), seed=args.seed + round_)  # fmt: skip
                round_ += 1
            print(f"image folders: {time.monotonic() - start:.0f} s", flush=True)
        if args.damaged or args.command_lines:
            base = make_base_run(workdir / "base-run")
        if args.damaged:
            tally = Tally("damaged runs")
            tallies.append(tally)
            damaged_dir = workdir / "damaged"
            damaged_dir.mkdir(exist_ok=True)
            fuzz(run_damages(base), lambda ops: check_damaged_run(base, ops, damaged_dir, tally, keep),
                 examples=args.damaged, seed=args.seed)  # fmt: skip
            print(f"damaged runs: {time.monotonic() - start:.0f} s", flush=True)
        if args.command_lines:
            tally = Tally("command lines")
            tallies.append(tally)
            lines_dir = workdir / "command-lines"
            lines_dir.mkdir(exist_ok=True)
            flags = {command: cli_flags(command) for command in ("train", "sample", "info")}
            fuzz(command_lines(flags), lambda argv: check_command_line(argv, base, lines_dir, tally),
                 examples=args.command_lines, seed=args.seed)  # fmt: skip
            print(f"command lines: {time.monotonic() - start:.0f} s", flush=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    if kill_tally is not None:
        print(sigkill_table(kill_tally))
        print()
    if tallies:
        print(fuzz_table(tallies))
        print()
    failed = 0
    for tally in [*([kill_tally] if kill_tally else []), *tallies]:
        kinds = SIGKILL_FAILURES if tally is kill_tally else FAILURE_KINDS
        if tally.failed(kinds):
            failed += tally.failed(kinds)
            print(f"---- {tally.name}: failures\n{tally.report()}\n")
    print(f"total {time.monotonic() - start:.0f} s; {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
