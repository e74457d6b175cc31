"""Sizes shared by the train tests (a uniquely named module: conftest names collide)."""

MAX_LENGTH = 160
