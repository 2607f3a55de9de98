"""vla-ft MuJoCo task suite: language-conditioned tabletop manipulation with scripted experts.

>>> import envs
>>> env = envs.make("pick_place", image_size=64)
>>> obs, info = env.reset(seed=0); info["instruction"]
>>> expert = envs.make_expert(env); expert.reset(); obs, r, term, trunc, info = env.step(expert.act(obs))

Importing this package chooses a headless GL backend (EGL, else OSMesa) unless ``MUJOCO_GL`` is set,
and registers every task with gymnasium (``gymnasium.make("vla_ft/PickPlace-v0")``). No torch here.
"""

from envs.rendering import select_gl_backend

select_gl_backend()  # must run before mujoco is imported

from envs.errors import EnvError, InvalidActionError, UnknownTaskError  # noqa: E402
from envs.factory import gym_id, make, make_expert, register_all  # noqa: E402
from envs.tasks import list_tasks  # noqa: E402

register_all()

__all__ = [
    "EnvError",
    "InvalidActionError",
    "UnknownTaskError",
    "gym_id",
    "list_tasks",
    "make",
    "make_expert",
]
