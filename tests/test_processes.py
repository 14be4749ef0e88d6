"""The simulated round with its clients in worker processes (secagg.protocol.pool.ProcessLink).

It must release exactly what the one-process round releases: same sum to the bit, same
included clients and same dropouts, whatever the stage clients vanish at. Keys and masks
are fresh in each run; with the same rounding seed the masks cancel and the encoded sum
is the same integers, so equality is exact, not approximate.
"""

import numpy as np
import pytest

import secagg
from secagg.encoding import FixedPointCodec
from secagg.errors import ConfigError, LocalProtocolError
from secagg.protocol.common import STAGE_NAMES
from secagg.protocol.pool import ProcessLink
from secagg.protocol.simulate import InMemoryRound, ProcessRound

# one client (0-based row) vanishes at every stage, several at the masked input
DROPOUTS = {"advertise": [0], "share": [4], "masked_input": [7, 8], "consistency": [11], "unmask": [13]}


@pytest.mark.parametrize("graph", ["complete", "sparse"])
def test_two_processes_release_the_same_sum_as_one_with_dropouts_at_every_stage(graph):
    updates = np.random.default_rng(5).uniform(-1, 1, (24, 300))  # test data, not secret
    assert set(DROPOUTS) == set(STAGE_NAMES)
    serial = secagg.aggregate(updates, graph=graph, seed=11, dropouts=DROPOUTS)
    parallel = secagg.aggregate(updates, graph=graph, seed=11, dropouts=DROPOUTS, processes=2)
    np.testing.assert_array_equal(parallel.total, serial.total)
    assert parallel.included == serial.included
    assert parallel.dropped == serial.dropped == {s: tuple(rows) for s, rows in DROPOUTS.items()}
    assert parallel.parameters == serial.parameters
    # clients that dropped after uploading still count; the ones before do not
    assert set(serial.included) == set(range(24)) - {0, 4, 7, 8}


def test_three_processes_with_float32_updates_match_the_in_process_round():
    updates = np.random.default_rng(6).uniform(-1, 1, (10, 257)).astype(np.float32)  # test data
    codec = FixedPointCodec.for_clients(clip=1.0, max_clients=10, clip_mode="coordinate")
    dropouts = {"masked_input": [3], "share": [9]}
    serial = InMemoryRound(updates, codec, seed=3, graph="sparse", dropout_hint=0.2)
    one = serial.run(dropouts)
    parallel = ProcessRound(updates, codec, seed=3, graph="sparse", dropout_hint=0.2, processes=3)
    assert parallel.config.degree == serial.config.degree and parallel.config.threshold == serial.config.threshold
    other = parallel.run(dropouts)
    np.testing.assert_array_equal(other.total, one.total)
    assert other.included == one.included and other.dropped == one.dropped
    # every stage timed from the workers, and the vanished clients known to the round
    assert set(parallel.client_total_seconds) == set(serial.client_total_seconds) == set(STAGE_NAMES)
    assert parallel.gone == serial.gone == {3, 9}


def test_an_error_in_a_worker_is_raised_in_the_parent_with_its_type():
    link = ProcessLink([0, 1], processes=2)  # client id 0 cannot hold a Shamir share
    keys = link.start()
    with link, pytest.raises(LocalProtocolError, match="client ids start at 1"):
        link.begin({-2: keys[1], **keys}, np.zeros((2, 4)), {})


def test_process_counts_and_callbacks_that_cannot_cross_are_refused():
    updates = np.zeros((4, 3))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="processes"):
            secagg.aggregate(updates, processes=bad)
    with pytest.raises(ConfigError, match="client_noise"):
        secagg.aggregate(updates, processes=2, client_noise=lambda row, dim, scale: np.zeros(dim, np.int64))
