"""Synthetic CLEVR-like scenes, ray-cast in numpy.

Seed 000 trains its U-Net on a CLEVR-derived dataset (cubes, spheres, cylinders with shadows, reflections
and varied illumination, plus semantic/instance/amodal masks, 3D positions and pairwise occlusions). CLEVR
renders with Blender; this module ray-casts the same scene family analytically so that samples are
generated on the fly, deterministically per (seed, index):

* objects follow CLEVR's generator: 3-10 objects, shapes cube/sphere/cylinder, sizes large (r=0.7) and
  small (r=0.35), CLEVR's eight colours, rubber (matte) or metal, random rotation, a minimum gap;
* a perspective camera (CLEVR's 49.1 degree field of view) at varied elevation, azimuth and distance;
* 1-3 directional lights with cast shadows, Blinn-Phong highlights, and one reflection bounce on metal.

A `Texture` can be painted on one face of one object (the patch issue re-renders patches from new views).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from tqdm.auto import tqdm

from segmenters.spec import ClassInfo

SHAPES = ("cube", "sphere", "cylinder")
SHAPE_CLASSES = (
    ClassInfo(name="background", color=(0, 0, 0)),
    ClassInfo(name="cube", color=(220, 40, 40)),
    ClassInfo(name="sphere", color=(40, 200, 60)),
    ClassInfo(name="cylinder", color=(50, 90, 230)),
)
# CLEVR's properties.json: the colour palette (sRGB) and the size scales.
CLEVR_COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
CLEVR_SIZES = {"large": 0.7, "small": 0.35}
MATERIALS = ("rubber", "metal")
FACES = ("+x", "-x", "+y", "-y", "+z")

_EPS = 1e-4
_GROUND_ALBEDO = np.array([0.62, 0.62, 0.60])
_BACKDROP = np.array([0.78, 0.79, 0.80])


@dataclass(frozen=True)
class SceneObject:
    shape: str
    size: str
    color: str
    material: str
    x: float
    y: float
    rotation: float  # radians about the vertical axis

    @property
    def radius(self) -> float:
        """CLEVR's scale r; a cube's half-side is r / sqrt(2) as in CLEVR's generator."""
        r = CLEVR_SIZES[self.size]
        return r / math.sqrt(2.0) if self.shape == "cube" else r

    @property
    def center(self) -> np.ndarray:
        # Every primitive rests on the ground: its centre is one half-height above it.
        return np.array([self.x, self.y, self.radius])

    @property
    def albedo(self) -> np.ndarray:
        return np.array(CLEVR_COLORS[self.color], dtype=np.float64) / 255.0

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape) + 1


@dataclass(frozen=True)
class Light:
    direction: tuple[float, float, float]  # unit vector pointing from the scene towards the light
    intensity: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    lights: tuple[Light, ...]
    ambient: float


@dataclass(frozen=True)
class Camera:
    elevation: float  # degrees above the ground plane
    azimuth: float  # degrees
    distance: float
    fov: float = 49.1  # horizontal field of view, CLEVR's camera
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        el, az = math.radians(self.elevation), math.radians(self.azimuth)
        target = np.asarray(self.target, dtype=np.float64)
        position = target + self.distance * np.array(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)]
        )
        forward = target - position
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        return position, forward, right, up

    def rays(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Camera position (3,) and unit ray directions (H*W, 3) through pixel centres."""
        position, forward, right, up = self.basis()
        half = math.tan(math.radians(self.fov) / 2.0)
        xs = ((np.arange(width) + 0.5) / width * 2.0 - 1.0) * half
        ys = (1.0 - (np.arange(height) + 0.5) / height * 2.0) * half * height / width
        gx, gy = np.meshgrid(xs, ys)
        dirs = forward[None, :] + gx.reshape(-1, 1) * right[None, :] + gy.reshape(-1, 1) * up[None, :]
        return position, dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    def project(self, points: np.ndarray, height: int, width: int) -> np.ndarray:
        """World points (N,3) -> pixel coordinates (N,2) as (row, col), the inverse of `rays`."""
        position, forward, right, up = self.basis()
        rel = np.asarray(points, dtype=np.float64) - position
        depth = rel @ forward
        half = math.tan(math.radians(self.fov) / 2.0)
        x = (rel @ right) / depth / half
        y = (rel @ up) / depth / (half * height / width)
        col = (x + 1.0) / 2.0 * width - 0.5
        row = (1.0 - y) / 2.0 * height - 0.5
        return np.stack([row, col], axis=1)


@dataclass(frozen=True)
class Texture:
    """An image painted on one face of one object, projected along the face's outward axis.

    `face` is an axis of the object's own frame ("+x", "-x", "+y", "-y", "+z" = top); on a cube it is
    exactly that face, on a sphere or cylinder a decal wrapped onto the side facing that axis. `size` is
    the texture's edge length in world units, `offset` shifts its centre within the face (u, v).
    """

    object_index: int
    face: str
    image: np.ndarray  # (h, w, 3) float in [0, 1]
    size: float
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if self.face not in FACES:
            raise ValueError(f"texture face must be one of {FACES}, got {self.face!r}")
        image = np.asarray(self.image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"texture image must be (h, w, 3), got shape {image.shape}")
        if self.size <= 0:
            raise ValueError(f"texture size must be positive, got {self.size}")


@dataclass
class ShapesSample:
    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    semantic: np.ndarray  # (H, W) uint8: 0 background, 1 cube, 2 sphere, 3 cylinder
    instances: np.ndarray  # (H, W) int16: 0 none, k+1 for scene.objects[k]
    amodal: np.ndarray  # (N, H, W) bool: each object's full silhouette, occluded parts included
    depth: np.ndarray  # (H, W) float32: camera-axis depth, inf where no surface
    positions: np.ndarray  # (N, 3) object centres in world coordinates
    occlusion: np.ndarray  # (N, N) int32: [i, j] = pixels of object j hidden by object i
    texture_mask: np.ndarray  # (H, W) bool: where a texture is visible
    scene: Scene
    camera: Camera


# --------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class ShapesConfig:
    height: int = 128
    width: int = 128
    min_objects: int = 3
    max_objects: int = 10
    min_gap: float = 0.25  # CLEVR's min_dist between object surfaces
    extent: float = 3.0  # objects lie in [-extent, extent]^2
    elevation: tuple[float, float] = (20.0, 55.0)
    distance: tuple[float, float] = (9.0, 13.0)
    noise: float = 0.01  # sensor noise std


def sample_scene(rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> Scene:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[SceneObject] = []
    attempts = 0
    while len(objects) < count and attempts < 500:
        attempts += 1
        candidate = SceneObject(
            shape=str(rng.choice(SHAPES)),
            size=str(rng.choice(list(CLEVR_SIZES))),
            color=str(rng.choice(list(CLEVR_COLORS))),
            material=str(rng.choice(MATERIALS)),
            x=float(rng.uniform(-config.extent, config.extent)),
            y=float(rng.uniform(-config.extent, config.extent)),
            rotation=float(rng.uniform(0.0, 2.0 * math.pi)),
        )
        r = CLEVR_SIZES[candidate.size]
        if all(
            math.hypot(candidate.x - o.x, candidate.y - o.y) - r - CLEVR_SIZES[o.size] >= config.min_gap
            for o in objects
        ):
            objects.append(candidate)
    lights = []
    for k in range(int(rng.integers(1, 4))):
        # A key light high up, then weaker fill/back lights, as CLEVR's three-point rig.
        elevation = math.radians(rng.uniform(35.0, 75.0) if k == 0 else rng.uniform(20.0, 60.0))
        azimuth = rng.uniform(0.0, 2.0 * math.pi)
        direction = (
            math.cos(elevation) * math.cos(azimuth),
            math.cos(elevation) * math.sin(azimuth),
            math.sin(elevation),
        )
        intensity = float(rng.uniform(0.6, 0.95) if k == 0 else rng.uniform(0.15, 0.4))
        lights.append(Light(direction=direction, intensity=intensity))
    return Scene(objects=tuple(objects), lights=tuple(lights), ambient=float(rng.uniform(0.18, 0.32)))


def sample_camera(rng: np.random.Generator, config: ShapesConfig = ShapesConfig()) -> Camera:
    return Camera(
        elevation=float(rng.uniform(*config.elevation)),
        azimuth=float(rng.uniform(0.0, 360.0)),
        distance=float(rng.uniform(*config.distance)),
        target=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)), 0.0),
    )


# ----------------------------------------------------------------------------------------- ray casting
def _rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _intersect_sphere(half: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    normal = np.zeros((o.shape[0], 3))
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - half * half
    disc = b * b - c
    root = np.sqrt(np.maximum(disc, 0.0))
    t = -b - root
    t = np.where(t > _EPS, t, -b + root)  # origin inside (never for primary rays): far root
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    hit = np.isfinite(t)
    normal[hit] = (o[hit] + t[hit, None] * d[hit]) / half
    return t, normal


def _intersect_cube(half: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    normal = np.zeros((o.shape[0], 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(d) < 1e-12, 1e-12, d)
        t1 = (-half - o) * inv
        t2 = (half - o) * inv
    near = np.minimum(t1, t2)
    far = np.maximum(t1, t2)
    t_near = near.max(axis=1)
    t_far = far.min(axis=1)
    t = np.where((t_far >= t_near) & (t_near > _EPS), t_near, np.inf)
    axis = near.argmax(axis=1)
    hit = np.isfinite(t)
    rows = np.nonzero(hit)[0]
    normal[rows, axis[hit]] = -np.sign(d[rows, axis[hit]])
    return t, normal


def _cylinder_side(half: float, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Distance to the curved side (radius `half`, |z| <= `half`), inf on a miss."""
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = o[:, 0] * d[:, 0] + o[:, 1] * d[:, 1]
    c = o[:, 0] ** 2 + o[:, 1] ** 2 - half * half
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = o[:, 2] + t_side * d[:, 2]
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (np.abs(z_side) <= half)
    return np.where(side_ok, t_side, np.inf)


def _cylinder_cap(half: float, height: float, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Distance to the flat cap at z = `height`, inf on a miss."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (height - o[:, 2]) / np.where(np.abs(d[:, 2]) < 1e-12, 1e-12, d[:, 2])
        px = o[:, 0] + t_cap * d[:, 0]
        py = o[:, 1] + t_cap * d[:, 1]
    cap_ok = (t_cap > _EPS) & (px * px + py * py <= half * half)
    return np.where(cap_ok, t_cap, np.inf)


def _intersect_cylinder(half: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vertical cylinder of radius `half`, half-height `half` (CLEVR's scaled unit cylinder)."""
    normal = np.zeros((o.shape[0], 3))
    stack = np.stack([_cylinder_side(half, o, d), _cylinder_cap(half, half, o, d), _cylinder_cap(half, -half, o, d)])
    which = stack.argmin(axis=0)
    t = stack.min(axis=0)
    hit = np.isfinite(t)
    side = hit & (which == 0)
    point = o[side] + t[side, None] * d[side]
    normal[side, 0] = point[:, 0] / half
    normal[side, 1] = point[:, 1] / half
    normal[hit & (which == 1), 2] = 1.0
    normal[hit & (which == 2), 2] = -1.0
    return t, normal


_INTERSECT = {"sphere": _intersect_sphere, "cube": _intersect_cube, "cylinder": _intersect_cylinder}


def _intersect_local(shape: str, half: float, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray/primitive intersection in the object's frame (centre at origin).

    Returns the distance t (P,), inf on a miss, and the local outward normal (P, 3).
    """
    if shape not in _INTERSECT:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return _INTERSECT[shape](half, o, d)


@dataclass
class _Hits:
    t: np.ndarray  # (K, P) distances, inf on a miss
    normals: list[np.ndarray]  # K x (P, 3) world normals
    local_points: list[np.ndarray]  # K x (P, 3)
    local_normals: list[np.ndarray]  # K x (P, 3)


def _bounding_radius(obj: SceneObject) -> float:
    return obj.radius * {"sphere": 1.0, "cube": math.sqrt(3.0), "cylinder": math.sqrt(2.0)}[obj.shape]


def _candidates(obj: SceneObject, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose ray meets the object's bounding sphere (most rays miss most objects), and o - c."""
    oc = origins - obj.center
    b = np.einsum("ij,ij->i", oc, dirs)
    disc = b * b - (np.einsum("ij,ij->i", oc, oc) - _bounding_radius(obj) ** 2)
    return np.nonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > _EPS))[0], oc


def _cast(scene: Scene, origins: np.ndarray, dirs: np.ndarray) -> _Hits:
    p = dirs.shape[0]
    ts, normals, points, local_normals = [], [], [], []
    for obj in scene.objects:
        rows, oc = _candidates(obj, origins, dirs)
        t = np.full(p, np.inf)
        normal, point, n_local = np.zeros((p, 3)), np.zeros((p, 3)), np.zeros((p, 3))
        if rows.size:
            rot = _rotation_z(obj.rotation)
            o_local = oc[rows] @ rot  # row-vector form of R^T (o - c)
            d_local = dirs[rows] @ rot
            t_rows, n_rows = _intersect_local(obj.shape, obj.radius, o_local, d_local)
            t[rows] = t_rows
            n_local[rows] = n_rows
            normal[rows] = n_rows @ rot.T
            point[rows] = o_local + np.where(np.isfinite(t_rows), t_rows, 0.0)[:, None] * d_local
        ts.append(t)
        normals.append(normal)
        points.append(point)
        local_normals.append(n_local)
    t = np.stack(ts) if ts else np.full((0, p), np.inf)
    return _Hits(t=t, normals=normals, local_points=points, local_normals=local_normals)


def _occluded(scene: Scene, origins: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Any-hit test for shadow rays towards a directional light: only distances, only candidate rows."""
    blocked = np.zeros(origins.shape[0], dtype=bool)
    dirs = np.broadcast_to(direction, origins.shape)
    for obj in scene.objects:
        rows, oc = _candidates(obj, origins, dirs)
        rows = rows[~blocked[rows]]
        if rows.size:
            rot = _rotation_z(obj.rotation)
            t_rows, _ = _intersect_local(obj.shape, obj.radius, oc[rows] @ rot, dirs[rows] @ rot)
            blocked[rows[np.isfinite(t_rows)]] = True
    return blocked


_FACE_AXES = {  # outward axis, then the texture's u (right) and v (down) directions in the object frame
    "+x": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
    "-x": (np.array([-1.0, 0, 0]), np.array([0, -1.0, 0]), np.array([0, 0, -1.0])),
    "+y": (np.array([0, 1.0, 0]), np.array([-1.0, 0, 0]), np.array([0, 0, -1.0])),
    "-y": (np.array([0, -1.0, 0]), np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),
    "+z": (np.array([0, 0, 1.0]), np.array([1.0, 0, 0]), np.array([0, -1.0, 0])),
}


def _texture_lookup(texture: Texture, local_points: np.ndarray, local_normals: np.ndarray):
    """(P,3) object-frame points -> (inside mask, colours) of the decal projected along the face axis."""
    axis, u_dir, v_dir = _FACE_AXES[texture.face]
    u = local_points @ u_dir - texture.offset[0]
    v = local_points @ v_dir - texture.offset[1]
    tu = u / texture.size + 0.5
    tv = v / texture.size + 0.5
    facing = local_normals @ axis > 0.2  # only the side that faces the decal's axis
    inside = facing & (tu >= 0) & (tu < 1) & (tv >= 0) & (tv < 1)
    image = np.asarray(texture.image, dtype=np.float64)
    h, w = image.shape[:2]
    rows = np.clip((tv[inside] * h).astype(int), 0, h - 1)
    cols = np.clip((tu[inside] * w).astype(int), 0, w - 1)
    return inside, image[rows, cols]


@dataclass(frozen=True)
class _Finish:
    """How a surface takes light: Blinn-Phong highlight weight and exponent, and the share it mirrors."""

    specular: float
    shininess: float
    reflect: float


_GROUND = _Finish(specular=0.05, shininess=8.0, reflect=0.0)
_RUBBER = _Finish(specular=0.15, shininess=12.0, reflect=0.0)
_METAL = _Finish(specular=0.9, shininess=80.0, reflect=0.45)
_STICKER = _Finish(specular=0.1, shininess=10.0, reflect=0.0)  # a printed sticker is matte whatever it is on
_FOG_START, _FOG_DEPTH = 16.0, 20.0  # where distant ground starts to fade into the backdrop, over what distance
_METAL_REFLECTION_GAIN = 1.6  # metal mirrors its surroundings tinted by its albedo, brightened to read as metal
_SHADOW_BIAS = 1e-3  # secondary rays start this far off the surface, so they do not hit it again


@dataclass
class _Surfaces:
    """Per ray: the first surface it meets and that surface's material."""

    obj_index: np.ndarray  # (P,) nearest object, -1 for ground or nothing
    distance: np.ndarray  # (P,) along the ray, inf for nothing
    on_object: np.ndarray
    on_ground: np.ndarray
    normal: np.ndarray  # (P, 3)
    albedo: np.ndarray  # (P, 3)
    specular: np.ndarray
    shininess: np.ndarray
    reflect: np.ndarray
    textured: np.ndarray  # (P,) bool: a texture's pixel

    def set_finish(self, rows, finish: _Finish) -> None:
        self.specular[rows], self.shininess[rows], self.reflect[rows] = (
            finish.specular, finish.shininess, finish.reflect)


def _shade(
    scene: Scene,
    origins: np.ndarray,
    dirs: np.ndarray,
    textures: tuple[Texture, ...],
    bounce: int,
) -> tuple[np.ndarray, np.ndarray, _Hits, np.ndarray, np.ndarray]:
    """Colour of each ray; also the hit structure, nearest object index (-1 none), distance, texture mask."""
    hits = _cast(scene, origins, dirs)
    surfaces = _surfaces(scene, hits, origins, dirs, textures)
    surface = surfaces.on_object | surfaces.on_ground
    points = origins + np.where(surface, surfaces.distance, 0.0)[:, None] * dirs
    color = np.tile(_BACKDROP, (dirs.shape[0], 1))
    color[surface] = _lit(scene, surfaces, points, dirs, np.nonzero(surface)[0])[surface]
    # Distant ground fades into the backdrop, as CLEVR's ground plane meets its horizon.
    on_ground = surfaces.on_ground
    fog = np.clip((surfaces.distance[on_ground] - _FOG_START) / _FOG_DEPTH, 0.0, 1.0)[:, None]
    color[on_ground] = color[on_ground] * (1 - fog) + _BACKDROP * fog
    mirror = np.nonzero(surface & (surfaces.reflect > 0))[0]
    if bounce > 0 and mirror.size:
        _add_reflections(scene, color, surfaces, points, dirs, mirror, textures, bounce)
    return np.clip(color, 0.0, 1.0), surfaces.obj_index, hits, surfaces.distance, surfaces.textured


def _surfaces(scene: Scene, hits: _Hits, origins: np.ndarray, dirs: np.ndarray,
              textures: tuple[Texture, ...]) -> _Surfaces:
    """The first surface each ray meets (an object or the ground plane) with its normal and material."""
    p = dirs.shape[0]
    if hits.t.shape[0]:
        nearest, t_obj = hits.t.argmin(axis=0), hits.t.min(axis=0)
    else:
        nearest, t_obj = np.full(p, -1), np.full(p, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 2] < -1e-9, -origins[:, 2] / dirs[:, 2], np.inf)
    t_ground = np.where(t_ground > _EPS, t_ground, np.inf)
    on_object = np.isfinite(t_obj) & (t_obj < t_ground)
    on_ground = ~on_object & np.isfinite(t_ground)
    surfaces = _Surfaces(
        obj_index=np.where(on_object, nearest, -1), distance=np.where(on_object, t_obj, t_ground),
        on_object=on_object, on_ground=on_ground, normal=np.zeros((p, 3)), albedo=np.zeros((p, 3)),
        specular=np.zeros(p), shininess=np.ones(p), reflect=np.zeros(p), textured=np.zeros(p, dtype=bool),
    )
    surfaces.normal[on_ground] = (0.0, 0.0, 1.0)
    surfaces.albedo[on_ground] = _GROUND_ALBEDO
    surfaces.set_finish(on_ground, _GROUND)
    for k, obj in enumerate(scene.objects):
        sel = surfaces.obj_index == k
        if sel.any():
            surfaces.normal[sel] = hits.normals[k][sel]
            surfaces.albedo[sel] = obj.albedo
            surfaces.set_finish(sel, _METAL if obj.material == "metal" else _RUBBER)
            _paint_textures(surfaces, hits, k, np.nonzero(sel)[0], textures)
    return surfaces


def _paint_textures(surfaces: _Surfaces, hits: _Hits, k: int, rows: np.ndarray,
                    textures: tuple[Texture, ...]) -> None:
    """Object k's textures over its pixels `rows`: their colours, a sticker's finish."""
    for texture in textures:
        if texture.object_index != k:
            continue
        inside, colours = _texture_lookup(texture, hits.local_points[k][rows], hits.local_normals[k][rows])
        hit_rows = rows[inside]
        surfaces.albedo[hit_rows] = colours
        surfaces.set_finish(hit_rows, _STICKER)
        surfaces.textured[hit_rows] = True


def _lit(scene: Scene, surfaces: _Surfaces, points: np.ndarray, dirs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Ambient, Lambert and Blinn-Phong light at each surface point, with each light's shadows."""
    normal, albedo = surfaces.normal, surfaces.albedo
    lit = np.full((dirs.shape[0], 3), scene.ambient) * albedo
    highlight = np.zeros((dirs.shape[0], 3))
    shadow_origins = points[rows] + normal[rows] * _SHADOW_BIAS
    for light in scene.lights:
        ldir = np.asarray(light.direction)
        visible = ~_occluded(scene, shadow_origins, ldir)
        lambert = np.clip(normal[rows] @ ldir, 0.0, None) * visible
        lit[rows] += light.intensity * lambert[:, None] * albedo[rows]
        half_vec = ldir[None, :] - dirs[rows]
        half_vec /= np.linalg.norm(half_vec, axis=1, keepdims=True)
        spec = np.clip(np.einsum("ij,ij->i", normal[rows], half_vec), 0.0, None) ** surfaces.shininess[rows]
        # Metal highlights take the object's tint, rubber's stay white.
        tint = np.where((surfaces.reflect[rows] > 0)[:, None], albedo[rows] * 0.5 + 0.5, 1.0)
        highlight[rows] += (light.intensity * surfaces.specular[rows] * spec * visible)[:, None] * tint
    return lit + highlight


def _add_reflections(scene: Scene, color: np.ndarray, surfaces: _Surfaces, points: np.ndarray, dirs: np.ndarray,
                     mirror: np.ndarray, textures: tuple[Texture, ...], bounce: int) -> None:
    """Blend what the mirroring rows reflect (one more bounce) into their colour."""
    d = dirs[mirror]
    n = surfaces.normal[mirror]
    r_dirs = d - 2.0 * np.einsum("ij,ij->i", d, n)[:, None] * n
    r_dirs /= np.linalg.norm(r_dirs, axis=1, keepdims=True)
    r_color = _shade(scene, points[mirror] + n * _SHADOW_BIAS, r_dirs, textures, bounce - 1)[0]
    w = surfaces.reflect[mirror][:, None]
    color[mirror] = color[mirror] * (1 - w) + r_color * surfaces.albedo[mirror] * w * _METAL_REFLECTION_GAIN


def _check_textures(scene: Scene, textures: tuple[Texture, ...]) -> None:
    for texture in textures:
        if not 0 <= texture.object_index < len(scene.objects):
            raise ValueError(
                f"texture object_index {texture.object_index} out of range for a scene of "
                f"{len(scene.objects)} objects"
            )


def _occlusion_counts(instances: np.ndarray, amodal: np.ndarray) -> np.ndarray:
    """(n, n): [i, j] = pixels of object j hidden behind object i."""
    n = amodal.shape[0]
    occlusion = np.zeros((n, n), dtype=np.int32)
    for j in range(n):
        hidden = instances[amodal[j]]
        for i in np.unique(hidden):
            if i > 0 and i - 1 != j:
                occlusion[i - 1, j] = int((hidden == i).sum())
    return occlusion


def render(
    scene: Scene,
    camera: Camera,
    height: int = 128,
    width: int = 128,
    textures: tuple[Texture, ...] | list[Texture] = (),
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> ShapesSample:
    """Ray-cast one view of `scene`; every label comes from the same rays as the colours."""
    textures = tuple(textures)
    _check_textures(scene, textures)
    origin, dirs = camera.rays(height, width)
    origins = np.broadcast_to(origin, dirs.shape).copy()
    color, obj_index, hits, distance, textured = _shade(scene, origins, dirs, textures, bounce=1)
    _, forward, _, _ = camera.basis()

    n = len(scene.objects)
    instances = (obj_index + 1).astype(np.int16).reshape(height, width)
    labels = np.array([0] + [o.label for o in scene.objects], dtype=np.uint8)
    semantic = labels[instances]
    amodal = np.isfinite(hits.t).reshape(n, height, width) if n else np.zeros((0, height, width), bool)
    cos = dirs @ forward
    depth = np.where(np.isfinite(distance), distance * cos, np.inf).reshape(height, width).astype(np.float32)
    occlusion = _occlusion_counts(instances, amodal)
    image = color.reshape(height, width, 3)
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng(0)
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0.0, 1.0)
    return ShapesSample(
        image=image.astype(np.float32),
        semantic=semantic,
        instances=instances,
        amodal=amodal,
        depth=depth,
        positions=np.array([o.center for o in scene.objects]).reshape(n, 3),
        occlusion=occlusion,
        texture_mask=textured.reshape(height, width),
        scene=scene,
        camera=camera,
    )


# ------------------------------------------------------------------------------------------------ decals
# A patch found in an image becomes a sticker in the world: the physical check of the audit and the synthetic
# camera of the monitor both print it here, so both see the same decal.
#: object-frame axes of the faces a decal can go on (the top only when looking down steeply)
FACE_AXES = {"+x": (1.0, 0.0, 0.0), "-x": (-1.0, 0.0, 0.0), "+y": (0.0, 1.0, 0.0), "-y": (0.0, -1.0, 0.0),
             "+z": (0.0, 0.0, 1.0)}


def facing_face(scene: Scene, object_index: int, camera: Camera) -> str:
    """The face of object `object_index` turned most towards `camera`."""
    obj = scene.objects[object_index]
    position = camera.basis()[0]
    to_camera = position - obj.center
    to_camera /= np.linalg.norm(to_camera)
    rotation = _rotation_z(obj.rotation)
    return max(FACE_AXES, key=lambda face: float(rotation @ np.array(FACE_AXES[face]) @ to_camera))


def world_units_per_pixel(camera: Camera, point: np.ndarray, height: int, width: int) -> float:
    _, _, right, _ = camera.basis()
    a, b = camera.project(np.stack([point, point + 0.1 * right]), height, width)
    return 0.1 / max(float(np.hypot(*(a - b))), 1e-6)


def patch_decal(scene: Scene, object_index: int, camera: Camera, patch: np.ndarray, height: int,
                width: int) -> Texture:
    """A (3, s, s) patch in [0, 1] as a decal on the object's face towards `camera`, sized so that it covers
    about s x s pixels of an image of height x width from that camera."""
    patch = np.asarray(patch, dtype=np.float32)
    if patch.ndim != 3 or patch.shape[0] != 3:
        raise ValueError(f"patch must be (3, s, s), got shape {patch.shape}")
    obj = scene.objects[object_index]
    size = patch.shape[-1] * world_units_per_pixel(camera, obj.center, height, width)
    return Texture(object_index=object_index, face=facing_face(scene, object_index, camera),
                   image=np.transpose(patch, (1, 2, 0)), size=float(size))


# ----------------------------------------------------------------------------------------------- dataset
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def render_sample(seed: int, split: str, index: int, config: ShapesConfig = ShapesConfig()) -> ShapesSample:
    """The sample at (seed, split, index): the same bytes every time, on every machine."""
    if split not in SPLIT_STREAMS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
    # Independent streams per split, so validation scenes are generated independently of training ones.
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
    scene = sample_scene(rng, config)
    camera = sample_camera(rng, config)
    return render(scene, camera, config.height, config.width, noise=config.noise, rng=rng)


class ShapesDataset(torch.utils.data.Dataset):
    """Image/label pairs rendered on the fly; `cache=True` keeps rendered pairs for later epochs."""

    classes = SHAPE_CLASSES
    ignore_index = 255
    name = "shapes"

    def __init__(
        self,
        split: str = "train",
        length: int = 2000,
        seed: int = 0,
        size: tuple[int, int] = (128, 128),
        cache: bool = False,
        config: ShapesConfig | None = None,
    ):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {sorted(SPLIT_STREAMS)}")
        if length <= 0:
            raise ValueError(f"shapes dataset length must be positive, got {length}")
        height, width = size
        if not (16 <= height <= 1024 and 16 <= width <= 1024):
            raise ValueError(f"shapes size must be within 16..1024 per side, got {size}")
        self.split, self.length, self.seed = split, length, seed
        base = config or ShapesConfig()
        self.config = ShapesConfig(**{**base.__dict__, "height": height, "width": width})
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ShapesSample:
        return render_sample(self.seed, self.split, index, self.config)

    def warm(self, workers: int | None = None, progress: bool = True) -> None:
        """Render every sample into the cache using all cores (training reuses them every epoch)."""
        if self._cache is None:
            raise ValueError("warm() needs a dataset built with cache=True")
        todo = [i for i in range(self.length) if i not in self._cache]
        workers = workers or os.cpu_count() or 1
        if not todo:
            return
        bar = tqdm(total=len(todo), desc=f"render shapes/{self.split}", disable=not progress)
        if workers == 1 or len(todo) < 64:
            for i in todo:
                self[i]
                bar.update()
        else:
            import multiprocessing

            # spawn, not fork: the parent already runs torch's thread pools.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                args = [(self.seed, self.split, i, self.config) for i in todo]
                for i, pair in zip(todo, pool.map(_render_pair, args, chunksize=16)):
                    self._cache[i] = (torch.from_numpy(pair[0]), torch.from_numpy(pair[1]))
                    bar.update()
        bar.close()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range 0..{self.length - 1}")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        image, label = _render_pair((self.seed, self.split, index, self.config))
        pair = (torch.from_numpy(image), torch.from_numpy(label))
        if self._cache is not None:
            self._cache[index] = pair
        return pair


def _render_pair(args: tuple[int, str, int, ShapesConfig]) -> tuple[np.ndarray, np.ndarray]:
    sample = render_sample(*args)
    return np.ascontiguousarray(sample.image.transpose(2, 0, 1)), sample.semantic.astype(np.int64)
