"""The shipped recipes end to end (`pytest -m recipes`); their runs start in the background (conftest.py)."""
