"""broker.gcpause: the pauses are timed, and freezing hides the start-up objects."""
import gc

from broker.gcpause import GcPauses, freeze


def test_every_collection_is_timed_and_full_ones_counted():
    pauses = GcPauses()
    try:
        before = pauses.histogram.snapshot()["count"]
        gc.collect()        # a full collection
        gc.collect(0)       # a young one
        snapshot = pauses.histogram.snapshot()
        assert snapshot["count"] == before + 2 and snapshot["sum"] > 0
        assert pauses.full_collections == 1
    finally:
        pauses.close()
    gc.collect()
    assert pauses.full_collections == 1  # no longer listening


def test_freeze_puts_what_exists_out_of_the_collectors_sight():
    try:
        frozen = freeze()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
        assert sum(len(gc.get_objects(generation)) for generation in range(3)) < frozen
    finally:
        gc.unfreeze()
