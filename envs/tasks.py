"""Tasks on the shared tabletop scene: goal sampler, instruction templates, success predicate.

A goal is four integers ``(src, dst, aux, template)``: slot indices into ``scene.SLOTS`` (``dst``
is -1 when unused), a task-specific extra (push direction) and the wording index into
``task.wordings`` = ``templates + paraphrases`` (the training templates first, so every index
stored before paraphrases existed means the same). Goals are part of the env state vector, so a
stored state restores the instruction too, a paraphrased one included.

| task       | instruction (example)                       | success                                  |
|------------|---------------------------------------------|------------------------------------------|
| pick_place | put the red cube in the blue bowl           | cube inside the bowl, released            |
| reach      | move the gripper above the green cylinder   | tcp within 2.5 cm of a point 6 cm above   |
|            | (any cube, the cylinder or a bowl)          | the object (a bowl: above its base)       |
| lift       | pick up the yellow cube                     | object centre above 10 cm, held           |
| push       | push the blue cube to the left              | cube moved >= 8 cm that way (image left) |
| stack      | stack the red cube on the green cube        | cube resting on the other, released       |

Generalization (the env's ``goals`` and ``instructions`` options; docs/envs.md):

* **Held-out combinations**: (named color, destination color) pairs a config can keep out of its
  demos (``collect.goals: seen``) and evaluate alone (``env.goals: held_out``). Each color is the
  named object of exactly one held-out pair and the destination of exactly one (a Latin-square
  diagonal of the 4 x 4 color table), so every color is seen in both roles in training and only its
  pairing is new. With the colors in ``COLOR_NAMES`` order red, green, blue, yellow:

  | task              | held-out (named color / destination color)      | pairs  | of goals=all |
  |-------------------|-------------------------------------------------|--------|--------------|
  | pick_place        | cube / bowl of the next color: red/green,       | 4 of 16| 1/4          |
  |                   | green/blue, blue/yellow, yellow/red             |        |              |
  | stack             | cube / cube of the previous color: red/yellow,  | 4 of 12| 1/3          |
  |                   | green/red, blue/green, yellow/blue              |        |              |
  | reach, lift, push | none: one named object, no combination          | 0      | 0            |

  The stack pairs run the other way round the color cycle, so no ordered color pair is held out of
  both tasks: a policy trained on both sees every (named, destination) color pair somewhere. Every
  layout admits both a seen and a held-out goal (3 cube colors of 4, distinct bowl colors), so the
  goal is redrawn from the same generator on the same layout.
* **Held-out color sets** (``goals: seen_sets`` / ``held_out_sets``, ``Task.held_out_sets``): two
  color sets held out in both orders, so the two colors of a held-out goal are never named together
  in the demos (pick_place {red, green} and {blue, yellow}; stack {red, yellow} and {green, blue}).
  The ordered pairs above keep each reverse in the demos; this split asks only for new pairings.
* **Paraphrases**: 3-4 wordings per task (``paraphrases``) whose verbs and phrasing appear in no
  training template of the task (``instructions: paraphrase``); collection never samples them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from envs.errors import UnknownTaskError
from envs.phases import CLOSE, GRASP_DZ, OPEN, Phase, at, grasp, release_above, xy_at
from envs.scene import BOWL_INNER_HALF, BOWLS, COLOR_NAMES, CUBES, MOVABLE, RADIUS, SLOTS, Layout, Sim

GOAL_DIM = 4
PUSH_DIRS = {0: ("left", -1.0), 1: ("right", 1.0)}  # image left = world -y (camera at +x)
PUSH_DIST = 0.08  # displacement needed for push success (m)
HELD_Z = 0.045  # an object counts as held when a finger touches it and its centre is above this (m);
# cubes and the cylinder rest with their centre at 0.025, so this is 2 cm off the table
NEAR_DIST = 0.05  # reach's "near" event: the hand within 5 cm of the target (success needs 2.5 cm)
# the env's `goals` option: every goal, or one side of a held-out split. The "pairs" split
# (seen / held_out) holds out ordered (named, destination) color pairs whose reverse stays in the
# demos; the "sets" split (seen_sets / held_out_sets) holds out color sets in both orders, so their
# two colors are never named together in the demos.
GOAL_SETS = ("all", "seen", "held_out", "seen_sets", "held_out_sets")
# goal set -> (split, whether it is the split's held-out side)
GOAL_SPLITS = {
    "seen": ("pairs", False),
    "held_out": ("pairs", True),
    "seen_sets": ("sets", False),
    "held_out_sets": ("sets", True),
}
INSTRUCTION_SETS = ("train", "paraphrase")  # the env's `instructions` option
# Goal draws on one layout before the layout is redrawn (goals: seen / held_out). A pick_place or
# stack layout always admits both kinds (at least 1 of 6 goals), so 100 misses are ~1e-8 likely.
GOAL_TRIES = 100


def color_cycle(shift: int) -> frozenset[tuple[str, str]]:
    """(color, the color ``shift`` places further in COLOR_NAMES, cyclically) for every color: a
    Latin-square diagonal, each color once in each role."""
    n = len(COLOR_NAMES)
    return frozenset((COLOR_NAMES[i], COLOR_NAMES[(i + shift) % n]) for i in range(n))


def color_matching(*pairs: tuple[str, str]) -> frozenset[frozenset[str]]:
    """Unordered color sets (a perfect matching of the colors: each color in exactly one set)."""
    sets = frozenset(frozenset(p) for p in pairs)
    assert sorted(c for s in sets for c in s) == sorted(COLOR_NAMES), "a matching names each color once"
    return sets


def held(sim: Sim, slot: str) -> bool:
    """Whether ``slot`` is in the gripper and off the table."""
    return sim.pos(slot)[2] > HELD_Z and sim.touching_fingers(slot) > 0


@dataclass(frozen=True)
class Goal:
    src: int
    dst: int
    aux: int
    template: int

    def to_vector(self) -> np.ndarray:
        return np.array([self.src, self.dst, self.aux, self.template], dtype=np.float64)

    @classmethod
    def from_vector(cls, vec: np.ndarray) -> Goal:
        src, dst, aux, template = (int(round(v)) for v in vec[:GOAL_DIM])
        return cls(src, dst, aux, template)

    @property
    def src_slot(self) -> str:
        return SLOTS[self.src]

    @property
    def dst_slot(self) -> str:
        return SLOTS[self.dst]


class Task:
    """Base class: subclasses set ``name``, ``max_steps``, ``templates``, ``paraphrases`` (and
    ``held_out`` where the goal names two colors) and implement the hooks."""

    name: str = ""
    max_steps: int = 150
    templates: tuple[str, ...] = ()  # the wordings demos are collected with
    paraphrases: tuple[str, ...] = ()  # wordings never collected (evaluation with instructions=paraphrase)
    held_out: frozenset[tuple[str, str]] = frozenset()  # (named color, destination color) pairs
    held_out_sets: frozenset[frozenset[str]] = frozenset()  # color sets held out in both orders

    @property
    def wordings(self) -> tuple[str, ...]:
        """Every wording; ``Goal.template`` indexes this (training templates first)."""
        return self.templates + self.paraphrases

    def sample_goal(self, layout: Layout, rng: np.random.Generator) -> Goal | None:
        """A goal for ``layout``, or None when the layout does not admit one (resample)."""
        raise NotImplementedError

    def expert_plan(self, env) -> list[Phase]:
        """The scripted expert's phases for ``env``'s current goal (envs/phases.py, envs/experts.py)."""
        raise NotImplementedError

    def sample(
        self, layout: Layout, rng: np.random.Generator, goals: str = "all", instructions: str = "train"
    ) -> Goal | None:
        """A goal from the ``goals`` set worded from the ``instructions`` set, or None (new layout).

        ``goals="all"`` and ``instructions="train"`` draw exactly what ``sample_goal`` draws, so seeds
        give the episodes they gave before these options existed. Other goal sets redraw the goal from
        the same ``rng`` until it is in the set (the first draw stands when it already is). A
        paraphrase is one more draw after the goal, so an episode's layout and goal are those of
        ``instructions="train"`` with the same seed: only the wording differs.
        """
        for _ in range(1 if goals == "all" else GOAL_TRIES):
            goal = self.sample_goal(layout, rng)
            if goal is None:
                return None
            if self.in_goal_set(layout, goal, goals):
                break
        else:
            return None
        if instructions == "paraphrase":
            goal = replace(goal, template=len(self.templates) + int(rng.integers(len(self.paraphrases))))
        return goal

    def combination(self, layout: Layout, goal: Goal) -> tuple[str, str] | None:
        """The goal's (named color, destination color), or None when it names no destination."""
        if goal.dst < 0:
            return None
        return layout.color_of(goal.src_slot), layout.color_of(goal.dst_slot)

    def held_out_pairs(self, split: str = "pairs") -> frozenset[tuple[str, str]]:
        """The (named color, destination color) pairs ``split`` holds out: ``held_out`` ("pairs"),
        or both orders of each color set of ``held_out_sets`` ("sets")."""
        if split == "sets":
            return frozenset((a, b) for s in self.held_out_sets for a in s for b in s - {a})
        return self.held_out

    def has_split(self, split: str) -> bool:
        """Whether the task holds anything out in ``split`` ("pairs" or "sets")."""
        return bool(self.held_out_pairs(split))

    def is_held_out(self, layout: Layout, goal: Goal, split: str = "pairs") -> bool:
        """Whether the goal is one of the task's held-out combinations in ``split``."""
        return self.combination(layout, goal) in self.held_out_pairs(split)

    def in_goal_set(self, layout: Layout, goal: Goal, goals: str) -> bool:
        """Whether ``goal`` belongs to the ``goals`` set (a name of GOAL_SETS)."""
        if goals == "all":
            return True
        split, held_out = GOAL_SPLITS[goals]
        return self.is_held_out(layout, goal, split) == held_out

    def instruction(self, layout: Layout, goal: Goal) -> str:
        dst = layout.describe(goal.dst_slot) if goal.dst >= 0 else ""
        direction = PUSH_DIRS.get(goal.aux, ("", 0))[0]
        return self.wordings[goal.template].format(src=layout.describe(goal.src_slot), dst=dst, dir=direction)

    def success(self, sim: Sim, layout: Layout, goal: Goal) -> bool:
        raise NotImplementedError

    def events(self, sim: Sim, layout: Layout, goal: Goal) -> dict[str, bool]:
        """What holds in the current state on the way to success (the evaluator records the first
        step each one held, so a failure says how far the episode got and what went wrong).

        Every task whose named object can be picked up reports ``grasped`` (the named object held
        off the table) and ``grasped_other`` (another object held: the wrong one); subclasses add
        their own. The keys are the same every step.
        """
        if goal.src_slot not in MOVABLE:
            return {}
        return {
            "grasped": held(sim, goal.src_slot),
            "grasped_other": any(held(sim, s) for s in MOVABLE if s != goal.src_slot),
        }

    def _template(self, rng: np.random.Generator) -> int:
        return int(rng.integers(len(self.templates)))


def _pick(rng: np.random.Generator, names: tuple[str, ...]) -> int:
    return SLOTS.index(names[int(rng.integers(len(names)))])


class PickPlace(Task):
    name = "pick_place"
    max_steps = 160
    templates = (
        "put the {src} in the {dst}",
        "place the {src} into the {dst}",
        "pick up the {src} and put it in the {dst}",
    )
    paraphrases = (
        "drop the {src} into the {dst}",
        "get the {src} and set it in the {dst}",
        "the {src} goes in the {dst}",
        "transfer the {src} to the {dst}",
    )
    held_out = color_cycle(1)  # red cube -> green bowl, green -> blue, blue -> yellow, yellow -> red
    held_out_sets = color_matching(("red", "green"), ("blue", "yellow"))

    def sample_goal(self, layout, rng):
        return Goal(_pick(rng, CUBES), _pick(rng, BOWLS), 0, self._template(rng))

    @staticmethod
    def _inside_rim(sim, goal) -> bool:
        """The named cube within the bowl's rim in xy (held above it or dropped in)."""
        obj, bowl = sim.pos(goal.src_slot), sim.pos(goal.dst_slot)
        return bool(np.all(np.abs(obj[:2] - bowl[:2]) < BOWL_INNER_HALF - 0.01))

    def success(self, sim, layout, goal):
        low = sim.pos(goal.src_slot)[2] < 0.06
        return self._inside_rim(sim, goal) and low and sim.touching_fingers(goal.src_slot) == 0

    def events(self, sim, layout, goal):
        return {**super().events(sim, layout, goal), "over_destination": self._inside_rim(sim, goal)}

    def expert_plan(self, env):
        # Release within 3 cm of the drop point, approached at >= 5 mm/step: with a tight tolerance
        # the proportional command fades to ~0 near the drop point and policies learn to hover just
        # outside it holding the cube; a wide release band gives them one consistent "open here"
        # (see docs/experiments/2026-11-scene-and-expert-changes.md).
        dst = env.goal.dst_slot
        return [
            *grasp(env.goal.src_slot),
            *release_above(lambda e: xy_at(e, dst, 0.085), tol=0.03, min_speed=0.25),
        ]


class Reach(Task):
    name = "reach"
    max_steps = 80
    templates = ("move the gripper above the {src}", "reach for the {src}", "go to the {src}")
    paraphrases = ("hover over the {src}", "bring the hand over the {src}", "approach the {src}")
    offset = np.array([0.0, 0.0, 0.06])

    def sample_goal(self, layout, rng):
        # bowls too: the suite's only task that names a bowl, so a base pretrained without
        # pick_place still grounds "the <color> bowl" (see docs/experiments/2026-11-pick-place-rounds.md)
        return Goal(_pick(rng, MOVABLE + BOWLS), -1, 0, self._template(rng))

    def _distance(self, sim, goal) -> float:
        return float(np.linalg.norm(sim.tcp() - (sim.pos(goal.src_slot) + self.offset)))

    def success(self, sim, layout, goal):
        return self._distance(sim, goal) < 0.025

    def events(self, sim, layout, goal):
        return {"near": self._distance(sim, goal) < NEAR_DIST, **super().events(sim, layout, goal)}

    def expert_plan(self, env):
        src = env.goal.src_slot
        return [Phase(lambda e: at(e, src, self.offset), OPEN, tol=0.008)]


class Lift(Task):
    name = "lift"
    max_steps = 100
    templates = ("pick up the {src}", "lift the {src}", "raise the {src} off the table")
    paraphrases = ("grab the {src} and hold it up", "hold the {src} up in the air", "get the {src} up high")

    def sample_goal(self, layout, rng):
        return Goal(_pick(rng, MOVABLE), -1, 0, self._template(rng))

    def success(self, sim, layout, goal):
        return sim.pos(goal.src_slot)[2] > 0.1 and sim.touching_fingers(goal.src_slot) > 0

    def expert_plan(self, env):
        src = env.goal.src_slot
        return [*grasp(src)[:3], Phase(lambda e: xy_at(e, src, 0.17), CLOSE, tol=0.01, track=False)]


class Push(Task):
    name = "push"
    max_steps = 120
    templates = ("push the {src} to the {dir}", "slide the {src} {dir}", "nudge the {src} to the {dir}")
    paraphrases = (
        "shove the {src} to the {dir}",
        "the {src} has to go {dir}",
        "bump the {src} toward the {dir}",
    )

    def sample_goal(self, layout, rng):
        options = [
            (SLOTS.index(c), aux) for c in CUBES for aux in PUSH_DIRS if self._corridor_clear(layout, c, aux)
        ]
        if not options:
            return None
        src, aux = options[int(rng.integers(len(options)))]
        return Goal(src, -1, aux, self._template(rng))

    @staticmethod
    def _corridor_clear(layout: Layout, cube: str, aux: int) -> bool:
        """No other object in the strip the hand and cube sweep (from 10 cm behind to 20 cm ahead)."""
        d = PUSH_DIRS[aux][1]
        x0, y0 = layout.xy[SLOTS.index(cube)]
        if abs(y0 + d * 0.15) > 0.36:
            return False
        for k, other in enumerate(SLOTS):
            if other == cube:
                continue
            x, y = layout.xy[k]
            along = (y - y0) * d
            if abs(x - x0) < 0.04 + RADIUS[other] and -0.1 - RADIUS[other] < along < 0.2 + RADIUS[other]:
                return False
        return True

    @staticmethod
    def _moved(sim, layout, goal) -> float:
        """How far the cube has moved in the instructed direction (m)."""
        return float((sim.pos(goal.src_slot)[1] - layout.xy[goal.src, 1]) * PUSH_DIRS[goal.aux][1])

    def success(self, sim, layout, goal):
        return self._moved(sim, layout, goal) >= PUSH_DIST

    def events(self, sim, layout, goal):
        halfway = self._moved(sim, layout, goal) >= PUSH_DIST / 2
        return {"touched": sim.touching_fingers(goal.src_slot) > 0, "halfway": halfway}

    def expert_plan(self, env):
        src, d = env.goal.src_slot, PUSH_DIRS[env.goal.aux][1]

        def behind(z: float):
            return lambda e: at(e, src, (0, -d * 0.075, 0)) * [1, 1, 0] + [0, 0, z]

        return [
            Phase(behind(0.1), CLOSE, tol=0.012),
            Phase(behind(0.015), CLOSE, tol=0.008, max_speed=0.7),
            Phase(lambda e: xy_at(e, src, 0.015) + [0, d * 0.06, 0], CLOSE, tol=0.01, max_speed=0.5),
            Phase(lambda e: e.sim.tcp() + [0, 0, 0.1], CLOSE, tol=0.02, track=False),
        ]


class Stack(Task):
    name = "stack"
    max_steps = 160
    templates = (
        "stack the {src} on the {dst}",
        "put the {src} on top of the {dst}",
        "place the {src} on the {dst}",
    )
    paraphrases = (
        "set the {src} atop the {dst}",
        "the {src} goes on the {dst}",
        "pile the {src} onto the {dst}",
    )
    held_out = color_cycle(-1)  # red on yellow, green on red, blue on green, yellow on blue
    held_out_sets = color_matching(("red", "yellow"), ("green", "blue"))  # none is pick_place's

    def sample_goal(self, layout, rng):
        src, dst = rng.choice(len(CUBES), size=2, replace=False)
        return Goal(SLOTS.index(CUBES[src]), SLOTS.index(CUBES[dst]), 0, self._template(rng))

    @staticmethod
    def _offset(sim, goal) -> tuple[float, float]:
        """(xy distance, height) of the named cube relative to the lower one (m)."""
        top, bottom = sim.pos(goal.src_slot), sim.pos(goal.dst_slot)
        return float(np.linalg.norm(top[:2] - bottom[:2])), float(top[2] - bottom[2])

    def success(self, sim, layout, goal):
        xy, dz = self._offset(sim, goal)
        return xy < 0.025 and 0.04 < dz < 0.06 and sim.touching_fingers(goal.src_slot) == 0

    def events(self, sim, layout, goal):
        xy, dz = self._offset(sim, goal)
        return {**super().events(sim, layout, goal), "over_destination": xy < 0.025 and dz > 0.03}

    def expert_plan(self, env):
        # a tight drop, unlike pick_place: the cube lands on a cube
        dst = env.goal.dst_slot
        above_bottom = (0, 0, 0.05 + 0.004 - GRASP_DZ - 0.002)
        return [*grasp(env.goal.src_slot), *release_above(lambda e: at(e, dst, above_bottom))]


TASKS: dict[str, Task] = {t.name: t for t in (PickPlace(), Reach(), Lift(), Push(), Stack())}


def list_tasks() -> list[str]:
    """Names of every registered task."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        UnknownTaskError: no such task; the message lists the valid names.
    """
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]
