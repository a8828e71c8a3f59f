"""Prefect tasks: load inputs by path -> call the library -> write outputs -> return paths + summaries."""
