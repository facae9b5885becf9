"""Choosing patch stages: the whole-network planner (`search`, `plan`) and the single-stage schedules (`schedule`)."""
