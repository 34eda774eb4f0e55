"""A real clean video for the flip detector's false-alarm benchmark: CamVid's val frames, in sequence order,
encoded as one mp4 (OpenCV, fourcc mp4v).

SegNet's CamVid copy names its frames `<sequence>_<frame>.png` (`0016E5_07959.png`, `Seq05VD_f00000.png`); the val
split is the 101 labelled frames 0016E5_07959 .. 0016E5_08159, every other frame of the 30 Hz recording, so it plays
at 15 frames per second. Frames are ordered by sequence, then by frame number, and each sequence stays contiguous.
Where the video cuts from one sequence to the next (or skips frames within one) the view jumps: `CamVidVideo.starts`
lists the frame indices where such a scene cut begins, and a detector should be reset there, or at least be told
of the cut, before its false alarms are counted. The same boundaries are written beside the video as JSON.

    python -m bench.camvid_video [--size 360x480] [--out bench/results/camvid_val.mp4]
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CAMVID_FPS = 15.0  # the labelled frames of 0016E5 (all of val): every other frame of a 30 Hz camera
CAMVID_SIZE = (360, 480)  # (height, width) of SegNet's CamVid copy
GAP_FACTOR = 3.0  # a step in frame numbers this many times the sequence's usual step is a cut, as a new sequence is
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "camvid_val.mp4"
_NAME = re.compile(r"^(?P<sequence>.+)_\D*(?P<number>\d+)$")


@dataclass(frozen=True)
class CamVidVideo:
    """An encoded CamVid clip: the video at `path`, `frames` frames of `size` (height, width) at `fps`; `starts`
    are the frame indices where a sequence (or a stretch after a skip in one) begins, `starts[0] == 0`, with its
    sequence name in `sequences`; `names` is each frame's source file name."""

    path: Path
    frames: int
    size: tuple[int, int]
    fps: float
    starts: tuple[int, ...]
    sequences: tuple[str, ...]
    names: tuple[str, ...]


def camvid_frames(folder: str | Path) -> list[Path]:
    """The png frames of a CamVid split folder in sequence order: by sequence name, then by frame number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CamVid frame folder not found: {folder}")
    files = list(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no CamVid frames (*.png) in {folder}")
    return sorted(files, key=_frame_key)


def _frame_key(path: Path) -> tuple[str, int]:
    match = _NAME.match(path.stem)
    if match is None:
        raise ValueError(f"CamVid frame name {path.name!r} is not <sequence>_<frame number>.png")
    return match["sequence"], int(match["number"])


def sequence_starts(files: list[Path], gap_factor: float = GAP_FACTOR) -> list[int]:
    """Indices into `files` (in sequence order) where a new sequence begins, or where frame numbers within one
    jump by more than `gap_factor` times the sequence's median step."""
    keys = [_frame_key(f) for f in files]
    steps: dict[str, list[int]] = {}
    for (seq, number), (prev_seq, prev_number) in zip(keys[1:], keys[:-1]):
        if seq == prev_seq:
            steps.setdefault(seq, []).append(number - prev_number)
    usual = {seq: sorted(values)[len(values) // 2] for seq, values in steps.items()}
    starts = [0]
    for i in range(1, len(keys)):
        (seq, number), (prev_seq, prev_number) = keys[i], keys[i - 1]
        if seq != prev_seq or number - prev_number > gap_factor * usual[seq]:
            starts.append(i)
    return starts


def camvid_val_video(data_root: str | Path | None = None, out: str | Path = DEFAULT_OUT,
                     size: tuple[int, int] = CAMVID_SIZE, fps: float = CAMVID_FPS, split: str = "val",
                     limit: int | None = None) -> CamVidVideo:
    """Encode CamVid's `split` frames (the first `limit` of them, in sequence order) at `size` (height, width,
    e.g. an engine's input size) into the mp4 `out`, and write the boundaries beside it (`out` with `.json`).
    `data_root` is the CamVid folder (default: `camvid` in the project's data root, ../shared/data beside the
    checkout or $PATCHWATCH_DATA). Raises FileNotFoundError naming the folder when the frames are absent."""
    import cv2

    if data_root is None:
        from segmenters.data import default_data_root

        data_root = default_data_root() / "camvid"
    height, width = size
    if height < 16 or width < 16 or fps <= 0:
        raise ValueError(f"video size must be at least 16x16 and fps positive, got size {size}, fps {fps}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of frames, got {limit}")
    files = camvid_frames(Path(data_root) / split)[:limit]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write an mp4v video at {out}")
    try:
        for file in files:
            image = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"unreadable CamVid frame {file}")
            if image.shape[:2] != (height, width):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
            writer.write(image)
    finally:
        writer.release()
    starts = sequence_starts(files)
    video = CamVidVideo(out, len(files), (height, width), float(fps), tuple(starts),
                        tuple(_frame_key(files[i])[0] for i in starts), tuple(f.name for f in files))
    out.with_suffix(".json").write_text(json.dumps({**asdict(video), "path": str(out)}, indent=1))
    return video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="the CamVid folder (default: <data root>/camvid)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--size", default="x".join(map(str, CAMVID_SIZE)), help="HEIGHTxWIDTH")
    parser.add_argument("--fps", type=float, default=CAMVID_FPS)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    video = camvid_val_video(args.data_root, args.out, (height, width), args.fps)
    print(f"{video.path}: {video.frames} frames {width}x{height} at {video.fps:g} fps, sequences "
          f"{list(zip(video.starts, video.sequences))}")


if __name__ == "__main__":
    main()
