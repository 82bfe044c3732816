"""The names that say where the database is (the environment variable, the app's
data folder); the errors name them in their messages, the records resolve them."""

from __future__ import annotations

APP_NAME = "rome-workbench"
DB_ENV_VAR = "ROME_WORKBENCH_DB"
