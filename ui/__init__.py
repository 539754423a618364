"""The pipeline inside Airflow's own UI: an Airflow plugin (registered by entry point) with the run note."""
