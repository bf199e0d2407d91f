"""Session settings shared by every test module.

* Under pytest-xdist (``make test`` runs ``-n auto``), each worker gets its share of the cores
  for torch's intra-op threads, so two workers on CI's two cores do not run four threads. The
  Triton interpreter runs inherit the setting through the environment.
* ``ZOO_TEST_SHARD=i/n`` keeps the i-th of every n collected tests that can run (those a
  ``skipif`` already rules out are dropped): tests/triton_harness.py splits each interpreter run
  into shards this way, so the xdist workers share it.
"""

import os

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(f"ZOO_TEST_SHARD={text!r}: expected 'i/n' with 0 <= i < n")
    return index, count


@pytest.hookimpl(trylast=True)  # after `-m` has deselected, so shards split what is left
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("ZOO_TEST_SHARD")
    if not shard:
        return
    index, count = parse_shard(shard)
    runnable = [item for item in items
                if not any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))]
    keep = set(runnable[index::count])
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = [item for item in items if item in keep]
