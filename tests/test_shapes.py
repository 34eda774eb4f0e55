import math

import numpy as np
import pytest
import torch

from segmenters.data.shapes import (
    Camera, Light, Scene, SceneObject, ShapesConfig, ShapesDataset, Texture, render, render_sample,
)


def test_same_seed_and_index_give_identical_samples():
    a = render_sample(7, "train", 3)
    b = render_sample(7, "train", 3)
    for field in ("image", "semantic", "instances", "amodal", "depth", "positions", "occlusion"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.scene == b.scene and a.camera == b.camera


def test_index_seed_and_split_change_the_scene():
    base = render_sample(7, "train", 3)
    for other in (render_sample(7, "train", 4), render_sample(8, "train", 3), render_sample(7, "val", 3)):
        assert other.scene != base.scene
        assert not np.array_equal(other.image, base.image)


def test_sample_fields_are_consistent_with_each_other():
    for index in range(6):
        s = render_sample(0, "val", index)
        n = len(s.scene.objects)
        assert 3 <= n <= 10
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        labels = np.array([0] + [o.label for o in s.scene.objects])
        np.testing.assert_array_equal(s.semantic, labels[s.instances])
        for k in range(n):
            visible = s.instances == k + 1
            # What is seen of an object lies inside its amodal silhouette.
            assert not (visible & ~s.amodal[k]).any()
            # Hidden parts are exactly the pixels other objects cover.
            for i in range(n):
                if i != k:
                    assert s.occlusion[i, k] == int((s.amodal[k] & (s.instances == i + 1)).sum())
        assert (np.isfinite(s.depth[s.instances > 0])).all()
        assert s.positions.shape == (n, 3)
        # Every object rests on the ground: centre height equals its half-height.
        np.testing.assert_allclose(s.positions[:, 2], [o.radius for o in s.scene.objects])


def test_projected_centre_of_an_unoccluded_object_lands_in_its_mask():
    cube = SceneObject("cube", "large", "red", "rubber", 0.0, 0.0, 0.3)
    sphere = SceneObject("sphere", "small", "blue", "metal", 2.0, -1.5, 0.0)
    scene = Scene((cube, sphere), (Light((0.3, 0.2, 0.93), 0.8),), 0.25)
    camera = Camera(elevation=35.0, azimuth=40.0, distance=10.0)
    s = render(scene, camera, 96, 128)
    rows_cols = camera.project(s.positions, 96, 128)
    for k, (r, c) in enumerate(rows_cols):
        assert s.amodal[k][int(round(r)), int(round(c))]
    assert set(np.unique(s.semantic)) == {0, 1, 2}
    # Depth grows with distance from the camera: the near cube is closer than the ground behind it.
    position, *_ = camera.basis()
    assert s.depth[s.instances == 1].mean() < np.linalg.norm(position)


def test_cast_shadow_darkens_the_ground():
    cube = SceneObject("cube", "large", "gray", "rubber", 0.0, 0.0, 0.0)
    overhead = Scene((cube,), (Light((0.0, 0.0, 1.0), 0.9),), 0.2)
    camera = Camera(elevation=89.0, azimuth=0.0, distance=12.0)
    with_cube = render(overhead, camera, 64, 64)
    without = render(Scene((), overhead.lights, 0.2), camera, 64, 64)
    # Straight-down light: the ground just next to the cube is lit, but the ground is shadowed nowhere else;
    # tilt the light and the shadow appears beside the cube.
    tilted = Scene((cube,), (Light((0.6, 0.0, 0.8), 0.9),), 0.2)
    shadowed = render(tilted, camera, 64, 64)
    ground = shadowed.instances == 0
    assert shadowed.image[ground].mean() < render(Scene((), tilted.lights, 0.2), camera, 64, 64).image[ground].mean()
    assert with_cube.image[with_cube.instances == 0].mean() == pytest.approx(
        without.image[with_cube.instances == 0].mean(), abs=0.02
    )


def test_texture_appears_on_the_face_that_faces_the_camera_only():
    cube = SceneObject("cube", "large", "gray", "rubber", 0.0, 0.0, 0.0)
    scene = Scene((cube,), (Light((0.8, 0.0, 0.6), 0.8),), 0.3)
    camera = Camera(elevation=10.0, azimuth=0.0, distance=8.0)  # looking at the cube's +x face
    magenta = np.zeros((8, 8, 3))
    magenta[..., 0] = magenta[..., 2] = 1.0
    front = render(scene, camera, 96, 96, textures=[Texture(0, "+x", magenta, size=0.6)])
    back = render(scene, camera, 96, 96, textures=[Texture(0, "-x", magenta, size=0.6)])
    assert front.texture_mask.sum() > 50
    assert not back.texture_mask.any()
    painted = front.image[front.texture_mask]
    assert (painted[:, 1] < 0.1).all() and (painted[:, 0] > 0.3).all()
    # The patch changes the colours, never the labels.
    np.testing.assert_array_equal(front.semantic, back.semantic)
    with pytest.raises(ValueError, match="face"):
        Texture(0, "bottom", magenta, size=0.5)
    with pytest.raises(ValueError, match="object_index"):
        render(scene, camera, 32, 32, textures=[Texture(3, "+x", magenta, size=0.5)])


def test_size_is_configurable_up_to_480x320():
    s = render_sample(1, "train", 0, ShapesConfig(height=320, width=480))
    assert s.image.shape == (320, 480, 3) and s.amodal.shape[1:] == (320, 480)


def test_dataset_yields_tensors_and_rejects_bad_arguments():
    ds = ShapesDataset("val", length=4, size=(64, 96), cache=True)
    image, label = ds[1]
    assert image.shape == (3, 64, 96) and image.dtype == torch.float32
    assert label.shape == (64, 96) and label.dtype == torch.int64
    assert ds[1][0] is image  # cached
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("holdout")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(size=(8, 8))


def test_clevr_geometry():
    assert SceneObject("cube", "large", "red", "metal", 0, 0, 0).radius == pytest.approx(0.7 / math.sqrt(2))
    assert SceneObject("sphere", "small", "red", "metal", 0, 0, 0).radius == 0.35
