"""Simulators outside this repository's own suite (envs/) that also bring scripted experts, so both
demo collection (vla_ft.data.collect) and evaluation (vla_ft.eval) build them: robosuite. Also the
registry of env types (env_types.py): what each ``env.type`` builds, checks and collects."""
