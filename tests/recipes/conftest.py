"""The recipe runs of this folder: started in the background as the test loop begins, when a test of
this folder is selected, so they overlap the rest of the suite; this folder's tests run last and wait
for them.

Nothing here changes the test process (its priority, threads or environment): the runs are
subprocesses with their own thread count and the lowest priority (`recipe_runs.py`); the only hook
that sees other tests' items reorders them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.recipes.recipe_runs import RecipeRuns

HERE = Path(__file__).resolve().parent
RUNS = pytest.StashKey[RecipeRuns]()


def _is_recipe_test(item: pytest.Item) -> bool:
    """Whether `item` is a test of this folder."""
    return HERE in item.path.resolve().parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """This folder's tests last (a stable sort: every other test keeps its place)."""
    items.sort(key=_is_recipe_test)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Start the recipe runs before the first test when any selected test is in this folder."""
    if session.config.option.collectonly or not any(_is_recipe_test(item) for item in session.items):
        return
    if session.testsfailed and not session.config.option.continue_on_collection_errors:
        return  # collection failed: the loop runs no test
    runs = RecipeRuns(Path(tempfile.mkdtemp(prefix="mmalign-recipes-")))
    session.stash[RUNS] = runs
    runs.start()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Kill any run still going and remove the runs' folder."""
    runs = session.stash.get(RUNS, None)
    if runs is not None:
        runs.stop()
        shutil.rmtree(runs.root, ignore_errors=True)


@pytest.fixture(scope="session")
def recipe_runs(request: pytest.FixtureRequest) -> RecipeRuns:
    """The runs `pytest_runtestloop` started."""
    return request.session.stash[RUNS]
