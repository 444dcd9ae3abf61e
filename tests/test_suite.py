"""What the suite itself relies on: pytest-xdist's groups reach its scheduler (`--dist loadgroup`, pyproject.toml).

Tests that share a trained adapter or a fixture carry an `xdist_group`, so that one worker builds it once. With
pytest 9.2 and pytest-xdist 3.8 the group never reached the scheduler (xdist writes it into a node attribute pytest
9.2 no longer reads): the groups' tests ran on any worker and their fixtures were built on each, silently.
"""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("suite-check")
def test_xdist_groups_reach_the_scheduler(request):
    if not hasattr(request.config, "workerinput"):
        pytest.skip("not under pytest-xdist (README's command runs it with -n auto)")
    assert request.config.getvalue("dist") == "no" and request.config.getvalue("loadgroup")  # a loadgroup worker
    assert request.node.nodeid.endswith("@suite-check"), request.node.nodeid  # what LoadGroupScheduling splits on
