import copy

import pytest

from hpcllm.config import compose, derive


@pytest.fixture(scope="module")
def demo_batch_jobs():
    """jobs(*overrides) -> a composed, derived job (cached per module; each call gets a copy). The planner's
    formulas are checked at the batch and lengths each test names; model.recipe=demo keeps the rest fixed
    (micro batch x data-parallel size, no accumulation) whatever the published recipes say."""
    cache = {}

    def get(*overrides):
        if overrides not in cache:
            cache[overrides] = compose(["model.recipe=demo", *overrides])
            derive(cache[overrides])  # fills the method's values as every job's config.yaml has them
        return copy.deepcopy(cache[overrides])
    return get
