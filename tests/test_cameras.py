"""The synthetic camera's clean-scene disturbances (lighting, flicker, an entering object, fast motion, an abrupt
pan), the clean-clip settings drawn for the flip detector's benchmark, and the CamVid val video."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import bench_module
from monitor.cameras import (CLEAN_KINDS, CameraPath, EnteringObject, LightingChange, SceneChanges, SyntheticCamera,
                             clean_variants)

SCENE = 3  # a val scene with several objects in view
SIZE = (64, 64)


def frames_of(camera: SyntheticCamera, count: int) -> tuple[list[np.ndarray], list[dict]]:
    camera.open()
    images, truths = [], []
    for _ in range(count):
        rgb, truth = camera.read()
        images.append(rgb)
        truths.append(truth)
    return images, truths


def surface_brightness(camera: SyntheticCamera, frame: int) -> float:
    """Mean of the lit surfaces (objects and ground, not the unlit backdrop) in view `frame`."""
    view = camera.render(frame, False)
    return float(view.image[np.isfinite(view.depth)].mean())


def test_no_changes_render_the_plain_camera_byte_for_byte():
    plain, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=5), 5)
    empty, truths = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=5, changes=SceneChanges()), 5)
    later = SceneChanges(lighting=LightingChange(start=5), entering=EnteringObject(start=5))
    before, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=5, changes=later,
                                          path=CameraPath(jump_frame=5, jump_deg=8.0)), 5)
    for a, b, c in zip(plain, empty, before):
        assert a.tobytes() == b.tobytes() == c.tobytes()
    assert all(t["disturbances"] == [] and t["light_scale"] == 1.0 and t["entering_instance"] is None for t in truths)


def test_lighting_ramp_scales_the_lit_scene_by_its_factor():
    ramp = LightingChange(start=2, factor=0.6, frames=3)
    plain = SyntheticCamera(SCENE, size=SIZE, frames=8, noise=0.0)
    lit = SyntheticCamera(SCENE, size=SIZE, frames=8, noise=0.0, changes=SceneChanges(lighting=ramp))
    ratios = [surface_brightness(lit, f) / surface_brightness(plain, f) for f in range(8)]
    assert ratios[0] == ratios[1] == 1.0
    assert 1.0 > ratios[2] > ratios[3] > ratios[4]  # dimming over 3 frames
    assert all(abs(r - 0.6) < 0.05 for r in ratios[4:]), ratios  # then held at about x0.6
    _, truths = frames_of(lit, 8)
    assert [t["disturbances"] for t in truths] == [[]] * 2 + [["lighting"]] * 3 + [[]] * 3
    assert truths[-1]["light_scale"] == pytest.approx(0.6)


def test_a_step_brightens_at_once():
    step = SyntheticCamera(SCENE, size=SIZE, frames=4, noise=0.0,
                           changes=SceneChanges(lighting=LightingChange(start=2, factor=1.3, frames=1)))
    plain = SyntheticCamera(SCENE, size=SIZE, frames=4, noise=0.0)
    ratios = [surface_brightness(step, f) / surface_brightness(plain, f) for f in range(4)]
    assert ratios[1] == 1.0 and 1.2 < ratios[2] < 1.31 and ratios[3] == pytest.approx(ratios[2], abs=0.02)


def test_flicker_alternates_then_stops():
    flicker = LightingChange(start=2, factor=0.5, frames=4, mode="flicker", period=2)
    cam = SyntheticCamera(SCENE, size=SIZE, frames=8, noise=0.0, changes=SceneChanges(lighting=flicker))
    plain = SyntheticCamera(SCENE, size=SIZE, frames=8, noise=0.0)
    ratios = np.array([surface_brightness(cam, f) / surface_brightness(plain, f) for f in range(8)])
    dim = np.array([False, False, True, False, True, False, False, False])
    assert np.all(np.abs(ratios[dim] - 0.5) < 0.05) and np.all(ratios[~dim] == 1.0), ratios
    assert [cam.disturbances(f) for f in (1, 2, 3, 5, 6)] == [[], ["flicker"], ["flicker"], ["flicker"], []]


@pytest.mark.parametrize("side", [1, -1])
def test_an_entering_object_comes_in_from_its_side_and_stays(side):
    entering = EnteringObject(start=3, frames=8, shape="sphere", size="large", color="red", side=side)
    cam = SyntheticCamera(SCENE, size=SIZE, frames=14, changes=SceneChanges(entering=entering))
    plain, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=14), 14)
    images, truths = frames_of(cam, 14)
    new = len(cam.sample.scene.objects) + 1
    masks = [t["instances"] == new for t in truths]
    counts = [int(m.sum()) for m in masks]
    assert counts[:4] == [0, 0, 0, 0]  # absent, then just outside the view at its start
    assert all(images[f].tobytes() == plain[f].tobytes() for f in range(3))
    first = next(f for f, c in enumerate(counts) if c)
    cols = np.nonzero(masks[first])[1]
    assert (cols.mean() > SIZE[1] / 2) if side > 0 else (cols.mean() < SIZE[1] / 2)  # it comes in at its edge
    assert counts[-1] > 50 and counts[-1] > 2 * counts[first]  # it grows into the view
    assert np.all(truths[-1]["semantic"][masks[-1]] == 2)  # a sphere, labelled as one
    assert [bool(t["disturbances"]) for t in truths] == [False] * 3 + [True] * 8 + [False] * 3
    assert truths[2]["entering_instance"] is None and truths[3]["entering_instance"] == new


def test_an_abrupt_pan_changes_the_view_at_its_frame_only():
    path = CameraPath(period=120, jump_frame=4, jump_deg=8.0)
    images, truths = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=8, noise=0.0, path=path), 8)
    diffs = [np.abs(a.astype(int) - b).mean() for a, b in zip(images[:-1], images[1:])]
    jump = diffs.pop(3)  # between frames 3 and 4
    assert jump > 4 * max(diffs), (jump, diffs)
    assert [t["disturbances"] for t in truths] == [[]] * 4 + [["pan"]] + [[]] * 3


def test_the_fast_path_moves_much_more_per_frame():
    def motion(path):
        images, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=5, noise=0.0, path=path), 5)
        return np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(images[:-1], images[1:])])

    assert motion(CameraPath.fast()) > 3 * motion(CameraPath())


def test_disturbed_frames_are_deterministic_per_seed_and_frame():
    changes = SceneChanges(lighting=LightingChange(start=1, frames=2, mode="flicker"),
                           entering=EnteringObject(start=0, frames=3, shape="cube"))
    a, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=4, changes=changes, seed=7), 4)
    b, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=4, changes=changes, seed=7), 4)
    c, _ = frames_of(SyntheticCamera(SCENE, size=SIZE, frames=4, changes=changes, seed=8), 4)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    assert all(x.tobytes() != z.tobytes() for x, z in zip(a, c))  # another seed: other sensor noise


@pytest.mark.parametrize("make", [
    lambda: LightingChange(start=-1), lambda: LightingChange(start=0, frames=0),
    lambda: LightingChange(start=0, factor=0.0), lambda: LightingChange(start=0, factor=5.0),
    lambda: LightingChange(start=0, mode="strobe"), lambda: LightingChange(start=0, mode="flicker", period=1),
    lambda: EnteringObject(start=0, shape="cone"), lambda: EnteringObject(start=0, side=0),
    lambda: EnteringObject(start=0, to=(1.2, 0.5)), lambda: EnteringObject(start=0, frames=0),
    lambda: EnteringObject(start=0, color="pink"), lambda: CameraPath(period=0), lambda: CameraPath(jump_frame=0),
    lambda: CameraPath(zoom=1.0), lambda: clean_variants(0, frames=5), lambda: clean_variants(0, kinds=("disco",)),
])
def test_bad_parameters_raise_value_errors(make):
    with pytest.raises(ValueError):
        make()


def test_changes_must_come_wrapped_in_scene_changes():
    with pytest.raises(ValueError, match="SceneChanges"):
        SyntheticCamera(SCENE, size=SIZE, changes=LightingChange(start=0))


def test_an_entering_object_cannot_stop_above_the_horizon():
    entering = EnteringObject(start=0, frames=2, to=(0.5, 0.01))
    low = CameraPath(tilt_deg=8.0, phase=-1.5 * np.pi)  # scene 1's camera, 25 degrees up, tilted 8 down
    assert low.at(SyntheticCamera(1, size=SIZE).sample.camera, 2).elevation < 18.0
    with pytest.raises(ValueError, match="horizon"):
        SyntheticCamera(1, size=SIZE, frames=2, path=low, changes=SceneChanges(entering=entering))


def test_clean_variants_draw_one_setting_per_kind_with_its_event_inside_the_clip():
    variants = clean_variants(0, frames=40)
    assert [v.kind for v in variants] == list(CLEAN_KINDS)
    assert clean_variants(0, frames=40) == variants and clean_variants(1, frames=40) != variants
    assert clean_variants(0, frames=40, kinds=("entering", "pan")) == [variants[5], variants[2]]
    expected = {"smooth": set(), "fast": set(), "pan": {"pan"}, "lighting": {"lighting"}, "flicker": {"flicker"},
                "entering": {"entering"}}
    for variant in variants:
        camera = variant.camera(SCENE, size=SIZE, frames=40)
        seen = {d for f in range(40) for d in camera.disturbances(f)}
        assert seen == expected[variant.kind], variant
        assert not camera.disturbances(39)  # every event is over before the clip ends
        json.dumps(variant.describe())  # plain data for a report
    speed = [v.path.sweep_deg / v.path.period for v in variants[:2]]  # smooth, fast
    assert speed[1] > 3 * speed[0]


# ------------------------------------------------------------------------------------------- CamVid video
def camvid_video_module():
    return bench_module("camvid_video")


def test_camvid_order_and_cuts_from_file_names(tmp_path):
    cv = camvid_video_module()
    names = ["Seq05VD_f00030.png", "0016E5_07961.png", "Seq05VD_f00000.png", "0016E5_07959.png", "0016E5_08001.png",
             "0016E5_07963.png", "0001TP_006690.png"]
    for name in names:
        (tmp_path / name).touch()
    files = cv.camvid_frames(tmp_path)
    assert [f.name for f in files] == ["0001TP_006690.png", "0016E5_07959.png", "0016E5_07961.png",
                                       "0016E5_07963.png", "0016E5_08001.png", "Seq05VD_f00000.png",
                                       "Seq05VD_f00030.png"]
    assert cv.sequence_starts(files) == [0, 1, 4, 5]  # 0001TP, 0016E5, a skip of 38 frames in it, Seq05VD


def test_camvid_video_without_frames_names_the_folder(tmp_path):
    cv = camvid_video_module()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cv.camvid_val_video(tmp_path / "nowhere", tmp_path / "v.mp4")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        cv.camvid_val_video(tmp_path / "empty", tmp_path / "v.mp4")


@pytest.mark.data
def test_camvid_video_plays_back_its_frames_in_order(data_root, tmp_path):
    import cv2

    cv = camvid_video_module()
    source = sorted((data_root / "camvid" / "val").glob("*.png"))
    # four frames far apart, renamed as two sequences given out of order
    picks = {"Seq05VD_f00030.png": source[100], "0016E5_07959.png": source[0], "Seq05VD_f00000.png": source[66],
             "0016E5_08000.png": source[33]}
    (tmp_path / "camvid" / "val").mkdir(parents=True)
    for name, file in picks.items():
        shutil.copy(file, tmp_path / "camvid" / "val" / name)
    video = cv.camvid_val_video(tmp_path / "camvid", tmp_path / "clip.mp4", size=(96, 128))
    order = ["0016E5_07959.png", "0016E5_08000.png", "Seq05VD_f00000.png", "Seq05VD_f00030.png"]
    assert list(video.names) == order and video.starts == (0, 2) and video.sequences == ("0016E5", "Seq05VD")
    assert json.loads((tmp_path / "clip.json").read_text())["starts"] == [0, 2]
    expected = [cv2.resize(cv2.imread(str(picks[n])), (128, 96), interpolation=cv2.INTER_AREA).astype(int)
                for n in order]
    capture = cv2.VideoCapture(str(video.path))
    decoded = []
    while (frame := capture.read())[0]:
        decoded.append(frame[1].astype(int))
    capture.release()
    assert len(decoded) == 4 and decoded[0].shape == (96, 128, 3)
    for i, frame in enumerate(decoded):
        errors = [np.abs(frame - e).mean() for e in expected]
        assert int(np.argmin(errors)) == i and errors[i] < 10, errors


@pytest.mark.data
def test_camvid_val_video_is_one_sequence_at_15_fps(data_root, tmp_path):
    import cv2

    cv = camvid_video_module()
    video = cv.camvid_val_video(data_root / "camvid", tmp_path / "val.mp4", size=(90, 120), limit=6)
    assert video.frames == 6 and video.starts == (0,) and video.names[0] == "0016E5_07959.png"
    capture = cv2.VideoCapture(str(video.path))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(15.0)
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    capture.release()
