"""The shared tabletop scene: model loading, object slots, colors, layout sampling and sim access.

Slots (fixed bodies in ``assets/tabletop.xml``): three cubes, one cylinder (shape distractor) and two
bowls. Each episode a :class:`Layout` assigns colors and table positions to every slot; cubes get
distinct colors, bowls get distinct colors, the cylinder any color. Positions are sampled with a
minimum clearance so the expert's fingers never land on a neighbour.

The flat state vector (``Sim.get_state``) is ``[layout (LAYOUT_DIM), mj integration state]``, so a
stored state restores colors and bowl positions (which are model parameters, not qpos) as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

ASSET = Path(__file__).resolve().parent / "assets" / "tabletop.xml"

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.08, 0.08),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.05),
}
COLOR_NAMES = tuple(COLORS)
CUBES = ("cube_0", "cube_1", "cube_2")
CYLINDERS = ("cylinder_0",)
MOVABLE = CUBES + CYLINDERS  # objects with a free joint
BOWLS = ("bowl_0", "bowl_1")
SLOTS = MOVABLE + BOWLS
SHAPES = {**{n: "cube" for n in CUBES}, **{n: "cylinder" for n in CYLINDERS}, **{n: "bowl" for n in BOWLS}}
# Footprint radius used for clearance when sampling positions (m).
RADIUS = {**{n: 0.055 for n in MOVABLE}, **{n: 0.095 for n in BOWLS}}
OBJ_HALF_HEIGHT = 0.025
TABLE_X = (-0.2, 0.2)  # sampling region for object centres (m)
TABLE_Y = (-0.25, 0.25)
BOWL_INNER_HALF = 0.06  # inner half-width of a bowl (m)
BOWL_WALL_TOP = 0.044
WORKSPACE_LO = np.array([-0.3, -0.35, 0.0])  # clip box for the hand target (tcp position, m)
WORKSPACE_HI = np.array([0.3, 0.35, 0.3])
# Hand start box (tcp, m): the whole table region, 12-25 cm up (the fingertips clear every object).
# A hand that always starts near one spot tells a policy which way the expert is going, and it
# learns to keep going instead of finding the named object: causal confusion (see
# docs/experiments/2026-11-scene-and-expert-changes.md).
HAND_START_LO = np.array([TABLE_X[0], TABLE_Y[0], 0.12])
HAND_START_HI = np.array([TABLE_X[1], TABLE_Y[1], 0.25])
LAYOUT_DIM = len(SLOTS) * 4 + 3  # per slot: color, x, y, yaw; then hand start xyz


@dataclass
class Layout:
    """Colors and poses of every slot plus the hand start.

    Attributes:
        colors: (len(SLOTS),) int color indices into COLOR_NAMES.
        xy: (len(SLOTS), 2) table positions (m).
        yaw: (len(SLOTS),) rotation about z (rad).
        hand: (3,) tcp start position (m).
    """

    colors: np.ndarray
    xy: np.ndarray
    yaw: np.ndarray
    hand: np.ndarray

    def to_vector(self) -> np.ndarray:
        """Flat float64 (LAYOUT_DIM,)."""
        per_slot = np.concatenate([self.colors[:, None], self.xy, self.yaw[:, None]], axis=1)
        return np.concatenate([per_slot.ravel(), self.hand]).astype(np.float64)

    @classmethod
    def from_vector(cls, vec: np.ndarray) -> Layout:
        per_slot = np.asarray(vec[: len(SLOTS) * 4], dtype=np.float64).reshape(len(SLOTS), 4)
        return cls(
            colors=per_slot[:, 0].round().astype(np.int64),
            xy=per_slot[:, 1:3].copy(),
            yaw=per_slot[:, 3].copy(),
            hand=np.asarray(vec[len(SLOTS) * 4 : LAYOUT_DIM], dtype=np.float64).copy(),
        )

    def color_of(self, slot: str) -> str:
        return COLOR_NAMES[int(self.colors[SLOTS.index(slot)])]

    def describe(self, slot: str) -> str:
        """E.g. ``'red cube'``."""
        return f"{self.color_of(slot)} {SHAPES[slot]}"


def sample_layout(rng: np.random.Generator, max_tries: int = 1000) -> Layout:
    """Random colors and collision-free positions for every slot (deterministic given ``rng``)."""
    n_colors = len(COLOR_NAMES)
    colors = np.concatenate(
        [
            rng.permutation(n_colors)[: len(CUBES)],
            rng.integers(0, n_colors, size=len(CYLINDERS)),
            rng.permutation(n_colors)[: len(BOWLS)],
        ]
    )
    for _ in range(max_tries):
        xy = np.zeros((len(SLOTS), 2))
        placed: list[int] = []
        for i in sorted(range(len(SLOTS)), key=lambda k: -RADIUS[SLOTS[k]]):  # big ones first
            r = RADIUS[SLOTS[i]]
            lo = [TABLE_X[0] + r / 2, TABLE_Y[0] + r / 2]
            hi = [TABLE_X[1] - r / 2, TABLE_Y[1] - r / 2]
            for _attempt in range(100):
                cand = rng.uniform(lo, hi)
                if all(np.linalg.norm(cand - xy[j]) > r + RADIUS[SLOTS[j]] for j in placed):
                    xy[i] = cand
                    placed.append(i)
                    break
        ok = len(placed) == len(SLOTS)
        if ok:
            yaw = np.zeros(len(SLOTS))
            yaw[: len(MOVABLE)] = rng.uniform(-0.3, 0.3, size=len(MOVABLE))
            hand = np.array(
                [rng.uniform(lo, hi) for lo, hi in zip(HAND_START_LO, HAND_START_HI, strict=True)]
            )
            return Layout(colors=colors.astype(np.int64), xy=xy, yaw=yaw, hand=hand)
    raise RuntimeError("could not place the objects without overlap; the table region is too small")


class Sim:
    """The MuJoCo model/data of the tabletop scene plus named accessors."""

    def __init__(self) -> None:
        self.model = mujoco.MjModel.from_xml_path(str(ASSET))
        self.data = mujoco.MjData(self.model)
        m = self.model
        self.body = {n: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, n) for n in (*SLOTS, "hand")}
        self.mocap_id = m.body_mocapid[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "mocap")]
        self.tcp_site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "tcp")
        self.finger_qadr = [
            m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, n)]
            for n in ("finger_left", "finger_right")
        ]
        self.finger_geoms = {
            mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, n) for n in ("finger_left", "finger_right")
        }
        self.hand_qadr = m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, "hand")]
        self.obj_qadr = {n: m.jnt_qposadr[m.body_jntadr[self.body[n]]] for n in MOVABLE}
        self.slot_geoms = {n: [g for g in range(m.ngeom) if m.geom_bodyid[g] == self.body[n]] for n in SLOTS}
        self.state_spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self.state_size = mujoco.mj_stateSize(m, self.state_spec)
        self.layout: Layout | None = None

    # ----- layout ------------------------------------------------------------------------
    def apply_layout(self, layout: Layout) -> None:
        """Reset the physics to ``layout``: colors, bowl poses, object poses, hand start."""
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        for k, name in enumerate(SLOTS):
            rgb = COLORS[COLOR_NAMES[int(layout.colors[k])]]
            for g in self.slot_geoms[name]:
                m.geom_rgba[g] = (*rgb, 1.0)
            quat = np.array([np.cos(layout.yaw[k] / 2), 0.0, 0.0, np.sin(layout.yaw[k] / 2)])
            if name in BOWLS:
                m.body_pos[self.body[name]] = (*layout.xy[k], 0.0)
                m.body_quat[self.body[name]] = quat
            else:
                adr = self.obj_qadr[name]
                d.qpos[adr : adr + 3] = (*layout.xy[k], OBJ_HALF_HEIGHT + 0.0005)
                d.qpos[adr + 3 : adr + 7] = quat
        d.qpos[self.hand_qadr : self.hand_qadr + 3] = layout.hand
        d.mocap_pos[self.mocap_id] = layout.hand
        for a in self.finger_qadr:
            d.qpos[a] = 0.05
        d.ctrl[:] = 0.05  # fingers open
        self.layout = layout
        mujoco.mj_forward(m, d)

    def get_state(self) -> np.ndarray:
        """Flat float64 ``[layout, mj integration state]``."""
        phys = np.empty(self.state_size)
        mujoco.mj_getState(self.model, self.data, phys, self.state_spec)
        return np.concatenate([self.layout.to_vector(), phys])

    def set_state(self, state: np.ndarray) -> None:
        """Restore a vector from :meth:`get_state` (colors and bowl poses included)."""
        self.apply_layout(Layout.from_vector(state[:LAYOUT_DIM]))
        mujoco.mj_setState(
            self.model, self.data, np.asarray(state[LAYOUT_DIM:], dtype=np.float64), self.state_spec
        )
        mujoco.mj_forward(self.model, self.data)

    @property
    def state_dim(self) -> int:
        return LAYOUT_DIM + self.state_size

    # ----- accessors ---------------------------------------------------------------------
    def tcp(self) -> np.ndarray:
        """(3,) tool-centre point between the fingertips."""
        return self.data.site_xpos[self.tcp_site].copy()

    def fingers(self) -> np.ndarray:
        """(2,) finger openings (m), 0 = closed, 0.05 = open."""
        return self.data.qpos[self.finger_qadr].copy()

    def pos(self, slot: str) -> np.ndarray:
        """(3,) world position of a slot's body."""
        return self.data.xpos[self.body[slot]].copy()

    def touching_fingers(self, slot: str) -> int:
        """How many fingers touch ``slot`` (0, 1 or 2)."""
        geoms = set(self.slot_geoms[slot])
        touching = set()
        for c in self.data.contact[: self.data.ncon]:
            pair = {int(c.geom1), int(c.geom2)}
            if pair & geoms and pair & self.finger_geoms:
                touching |= pair & self.finger_geoms
        return len(touching)
