"""How the local stack's Airflow components connect to their SQLite database; named in their config by import path
(`[database] sql_alchemy_connect_args` and its async twin), so each component imports it when it starts."""

# SQLite lets one writer in at a time: the others wait up to the busy timeout, then fail with "database is locked"
# (the API server answers that with 500 "Database error"). Python's default, 5 s, is shorter than a write lock can
# be held on a busy 2-core laptop while a restarted scheduler, the DAG processor and a run's tasks start together.
BUSY_TIMEOUT_SECONDS = 30.0

CONNECT_ARGS = {"timeout": BUSY_TIMEOUT_SECONDS}  # sqlite3.connect's and aiosqlite.connect's keyword
