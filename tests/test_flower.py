"""Flower interop: the mod + workflow inside Flower's own message flow, against plain FedAvg.

Skipped when flwr is not installed (``pip install 'secagg[flower]'``).
"""

from __future__ import annotations

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="Flower is not installed: pip install 'secagg[flower]' (flwr 1.42)")

from federation.flower import FlowerPrivacy, SecAggPlusWorkflow, dp_metrics
from federation.flower.workflow import SecAggWorkflow
from privacy.ledger import Ledger
from secagg import wire
from secagg.protocol.common import SERVER_ID
from secagg.protocol.messages import UnmaskRequest
from tests.flower_harness import LOCAL, initial_parameters, partition, run_in_process

NODES, ROUNDS = 10, 3
DROP = (2, 4)  # (round, partition): node 4 trains, then goes offline after sharing its keys in round 2


def _privacy(tmp_path) -> FlowerPrivacy:
    sizes = [len(partition(p)[1]) for p in range(NODES)]
    return FlowerPrivacy(
        noise_multiplier=LOCAL["noise_multiplier"], sample_rate=max(LOCAL["batch_size"] / n for n in sizes),
        steps=max(-(-n // LOCAL["batch_size"]) for n in sizes), max_grad_norm=LOCAL["max_grad_norm"],
        delta=1e-5, budget_epsilon=50.0, ledger=str(tmp_path / "ledger.db"),
    )


def _error_bound(workflow, nodes: int = NODES, drop=DROP) -> float:
    """Quantisation error of the released means, summed over rounds, times 10 for propagation."""
    sizes = {p: len(partition(p)[1]) for p in range(nodes)}
    total = 0.0
    for report in workflow.reports:
        weight = sum(sizes[p] for p in range(nodes) if (report.round, p) != drop) / workflow.max_weight
        total += report.max_quantization_error / weight
    return 10 * total


def _claims(nodes: int) -> dict[str, float]:
    """DP-SGD metrics the torch-free clients report (the ledger's plan covers them)."""
    return dp_metrics(noise_multiplier=1.1, sample_rate=0.5, steps=4, max_grad_norm=1.0)


def _plan(tmp_path, **overrides) -> FlowerPrivacy:
    args = {"noise_multiplier": 1.1, "sample_rate": 0.5, "steps": 4, "max_grad_norm": 1.0, "delta": 1e-5,
                "budget_epsilon": 100.0, "ledger": str(tmp_path / "ledger.db"), "accountant": "rdp"}
    args.update(overrides)
    return FlowerPrivacy(**args)


def test_fast_secure_rounds_equal_plain_fedavg_with_a_node_dropping_mid_round(tmp_path):
    nodes, drop = 5, (2, 1)
    plain, _ = run_in_process(secure=False, num_nodes=nodes, rounds=2, drop=[drop], kind="lsq",
                              claimed=_claims(nodes))
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, privacy=_plan(tmp_path))
    secure, grid = run_in_process(secure=True, num_nodes=nodes, rounds=2, fit_workflow=workflow, drop=[drop],
                                  kind="lsq", claimed=_claims(nodes))
    assert np.max(np.abs(plain[0])) > 1e-2
    np.testing.assert_allclose(secure[0], plain[0], rtol=0, atol=_error_bound(workflow, nodes, drop))
    assert [len(r.included) for r in workflow.reports] == [nodes, nodes - 1]
    assert workflow.reports[1].dropped[grid.node_ids[1]].startswith("masked_input")
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == 2
        assert [r.released_participants for r in ledger.rows()] == [nodes, nodes - 1]


class DoubleListingWorkflow(SecAggWorkflow):
    """A lying server: its unmask request lists one survivor as dropped too, to get both of its
    secrets (self-mask seed shares and mask-key shares) and so its individual update."""

    victim = 1

    def _round_identity(self):
        self.identity = super()._round_identity()
        return self.identity

    def _collect(self, grid, rnd, sends, report, **kwargs):
        if next(iter(sends.values()))[0] == "unmask":
            lies = {}
            for nid, (stage, payload) in sends.items():
                _, honest = wire.open_sealed(payload, lambda _: self.identity.public_bytes, expect=UnmaskRequest)
                lie = UnmaskRequest(honest.round_id, honest.survivors, (*honest.dropped, self.victim),
                                    honest.signatures)
                lies[nid] = (stage, wire.seal(lie, SERVER_ID, self.identity))
            sends = lies
        return super()._collect(grid, rnd, sends, report, **kwargs)


def test_a_server_listing_a_survivor_as_dropped_too_is_refused_by_every_mod(tmp_path):
    workflow = DoubleListingWorkflow(num_shares=1.0, reconstruction_threshold=0.5, privacy=_plan(tmp_path))
    params, _grid = run_in_process(secure=True, num_nodes=5, rounds=1, fit_workflow=workflow, kind="lsq",
                                  claimed=_claims(5))
    report = workflow.reports[0]
    assert report.aborted is not None and "NotEnoughSurvivors" in report.aborted
    assert len(report.dropped) == 5
    assert all(why.startswith("unmask: MaliciousServerDetected") for why in report.dropped.values())
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])  # nothing was released
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert [r.status for r in ledger.rows()] == ["aborted"]  # the spend still counts


def test_a_plain_train_message_gets_no_update_out_of_a_protected_client():
    # Flower's default fit workflow asks for the update in the clear: every node refuses.
    params, _grid = run_in_process(secure=True, num_nodes=4, rounds=1, fit_workflow=None, kind="lsq")
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])


def test_a_client_whose_dp_sgd_spends_more_than_the_ledger_records_does_not_upload(tmp_path):
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, privacy=_plan(tmp_path, steps=2))
    params, _ = run_in_process(secure=True, num_nodes=4, rounds=1, fit_workflow=workflow, kind="lsq",
                               claimed=_claims(4))  # clients report 4 steps, the ledger records 2
    report = workflow.reports[0]
    assert all("PrivacyError" in why for why in report.dropped.values()) and len(report.dropped) == 4
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])


def test_a_replayed_round_gets_no_second_signature_from_a_node(tmp_path):
    import copy

    from flwr.app import Context, RecordDict

    from federation.flower.grid import InProcessGrid
    from tests.flower_harness import client_app, run_server

    sent = []

    class RecordingGrid(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            sent.extend(copy.deepcopy(m) for m in messages)
            return super().push_messages(messages)

    grid = RecordingGrid(client_app(secure=True, kind="lsq"), 4)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5)
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
               rounds=1, num_nodes=4, fit_workflow=workflow, kind="lsq")
    assert workflow.reports[0].aborted is None
    node = grid.node_ids[0]
    hello, advertise = [m for m in sent if m.metadata.dst_node_id == node][:2]
    replies = grid.send_and_receive([hello, advertise])  # the same round, sent again (a fresh hello first)
    assert not replies[0].has_error()
    assert replies[1].has_error() and "ReplayError" in replies[1].error.reason


@pytest.fixture
def deployment(pki):
    """The shared CA's server and five client credential directories (client ids 11..15)."""
    return {"server": pki / "ca" / "server", **{p: pki / "ca" / f"client-{11 + p}" for p in range(5)}}


def _with_credentials(deployment):
    return lambda pid: {"secagg-credentials": str(deployment[pid])}


def test_with_a_ca_nodes_take_their_certified_ids_and_the_round_equals_plain_fedavg(deployment):
    plain, _ = run_in_process(secure=False, num_nodes=5, rounds=1, kind="lsq")
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, credentials=deployment["server"])
    secure, _ = run_in_process(secure=True, num_nodes=5, rounds=1, fit_workflow=workflow, kind="lsq",
                               node_config=_with_credentials(deployment))
    assert workflow.reports[0].aborted is None and len(workflow.reports[0].included) == 5
    np.testing.assert_allclose(secure[0], plain[0], rtol=0, atol=_error_bound(workflow, 5, None))


class KeySwappingWorkflow(SecAggWorkflow):
    """An active server that puts its own key in place of node 12's (a man in the middle)."""

    def _enrol(self, hellos, report):
        nodes, identities, certificates = super()._enrol(hellos, report)
        from secagg.keys import IdentityKey

        identities[12] = IdentityKey.generate().public_bytes
        return nodes, identities, certificates


def test_with_a_ca_a_server_substituting_a_key_is_refused_by_every_node(deployment):
    workflow = KeySwappingWorkflow(num_shares=1.0, reconstruction_threshold=0.5, credentials=deployment["server"])
    params, _ = run_in_process(secure=True, num_nodes=5, rounds=1, fit_workflow=workflow, kind="lsq",
                               node_config=_with_credentials(deployment))
    report = workflow.reports[0]
    assert report.aborted is not None
    assert all(why.startswith("advertise: MaliciousServerDetected") for why in report.dropped.values())
    assert len(report.dropped) == 5
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])


def test_a_node_with_credentials_refuses_a_server_that_relays_uncertified_keys(deployment):
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5)  # no CA on the server
    params, _ = run_in_process(secure=True, num_nodes=5, rounds=1, fit_workflow=workflow, kind="lsq",
                               node_config=_with_credentials(deployment))
    report = workflow.reports[0]
    assert report.aborted is not None
    assert all("lacks certificates" in why for why in report.dropped.values()) and len(report.dropped) == 5
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])


@pytest.mark.slow  # DP-SGD (Opacus) for 10 nodes x 3 rounds, twice: ~1-2 min on a 2-core machine
def test_secure_flower_rounds_equal_plain_fedavg_and_the_ledger_verifies(tmp_path):
    pytest.importorskip("opacus", reason="these Flower clients run DP-SGD with Opacus: pip install 'secagg[dp]'")
    plain, _ = run_in_process(secure=False, num_nodes=NODES, rounds=ROUNDS, drop=[DROP])
    # 7 shares: degree 6 over 10 nodes, where the planner's secure threshold is 6 (one neighbour may drop)
    workflow = SecAggPlusWorkflow(num_shares=7, reconstruction_threshold=3, privacy=_privacy(tmp_path))
    secure, grid = run_in_process(secure=True, num_nodes=NODES, rounds=ROUNDS, fit_workflow=workflow, drop=[DROP])

    start = initial_parameters()[0]
    assert np.max(np.abs(plain[0] - start)) > 1e-2  # training moved the model
    np.testing.assert_allclose(secure[0], plain[0], rtol=0, atol=_error_bound(workflow))

    assert [r.aborted for r in workflow.reports] == [None] * ROUNDS
    assert [len(r.included) for r in workflow.reports] == [NODES, NODES - 1, NODES]
    dropped_node = grid.node_ids[DROP[1]]
    assert workflow.reports[1].dropped[dropped_node].startswith("masked_input")
    assert workflow.reports[0].degree == 6 and workflow.reports[0].threshold == 6  # 3 raised to the secure minimum

    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == ROUNDS
        rows = ledger.rows()
        assert [r.status for r in rows] == ["released"] * ROUNDS
        assert [r.released_participants for r in rows] == [NODES, NODES - 1, NODES]


@pytest.mark.slow  # Flower's simulation engine (Ray) polls between messages: a few minutes on 2 cores
def test_flower_simulation_with_the_mod_and_workflow_equals_plain_fedavg(tmp_path):
    pytest.importorskip("opacus", reason="these Flower clients run DP-SGD with Opacus: pip install 'secagg[dp]'")
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'flwr[simulation]'")
    from flwr.simulation import run_simulation

    from tests.flower_harness import client_app, server_app

    plain, _ = run_in_process(secure=False, num_nodes=NODES, rounds=ROUNDS, drop=[DROP])
    workflow = SecAggPlusWorkflow(num_shares=7, reconstruction_threshold=3, privacy=_privacy(tmp_path))
    out: dict = {}
    run_simulation(
        server_app=server_app(rounds=ROUNDS, num_nodes=NODES, fit_workflow=workflow, out=out),
        client_app=client_app(secure=True, drop=[DROP]),
        num_supernodes=NODES,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    np.testing.assert_allclose(out["parameters"][0], plain[0], rtol=0, atol=_error_bound(workflow))
    assert [len(r.included) for r in workflow.reports] == [NODES, NODES - 1, NODES]
    assert any(why.startswith("masked_input") for why in workflow.reports[1].dropped.values())
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == ROUNDS
        assert [r.released_participants for r in ledger.rows()] == [NODES, NODES - 1, NODES]


@pytest.mark.slow  # DP-SGD (Opacus) for 10 hospitals x 2 rounds: about a minute on 2 cores
def test_the_example_app_trains_and_writes_a_ledger_that_verifies(tmp_path, monkeypatch):
    pytest.importorskip("opacus", reason="the example's hospitals run DP-SGD with Opacus: pip install 'secagg[dp]'")
    from pathlib import Path

    from flwr.app import Context, RecordDict

    from federation.flower.grid import InProcessGrid

    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "examples" / "flower"))
    monkeypatch.chdir(tmp_path)
    from secagg_flower_example.client_app import app as client_app
    from secagg_flower_example.server_app import app as server_app

    grid = InProcessGrid(client_app, 10)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                             run_config={"num-server-rounds": 2}))
    with Ledger.open(tmp_path / "flower-ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == 2
        assert [r.released_participants for r in ledger.rows()] == [10, 10]


# --------------------------------------------------------------------------- the ckks option


@pytest.fixture(scope="module")
def ckks_deployment(tmp_path_factory):
    """A CA, the server's credentials and ten nodes' (client ids 11..20); client 11 holds the key-holder role."""
    pytest.importorskip("tenseal", reason="the ckks option needs TenSEAL: pip install 'secagg[he]'")
    from federation.transport.certs import init_ca, issue

    ca = tmp_path_factory.mktemp("ckks-ca")
    init_ca(ca)
    return {"server": issue(ca, server=True),
            **{p: issue(ca, client_id=11 + p, role="keyholder" if p == 0 else "client") for p in range(10)}}


def _ckks_node_config(deployment):
    """Each node's credentials, and the key holder every node trusts (client 11)."""
    return lambda pid: {"secagg-credentials": str(deployment[pid]), "secagg-keyholder": 11}


def _ckks_error_bound(workflow, plain_rounds) -> float:
    """CKKS error of the released means summed over rounds, plus float32 rounding of the plain
    FedAvg they are compared with, times 10 for propagation through later rounds."""
    f32 = 4 * np.finfo(np.float32).eps * max(float(np.max(np.abs(p))) for p in plain_rounds)
    return 10 * sum(r.max_quantization_error + f32 for r in workflow.reports)


def test_ckks_rounds_equal_plain_fedavg_with_the_uploads_forwarded_one_per_message(ckks_deployment, tmp_path):
    nodes, drop = 5, (2, 3)
    plain, _ = run_in_process(secure=False, num_nodes=nodes, rounds=2, drop=[drop], kind="lsq", claimed=_claims(nodes))
    workflow = SecAggPlusWorkflow(protection="ckks", credentials=ckks_deployment["server"], forward_bytes=1,
                                  privacy=_plan(tmp_path))
    secure, grid = run_in_process(secure=True, num_nodes=nodes, rounds=2, fit_workflow=workflow, drop=[drop],
                                  kind="lsq", claimed=_claims(nodes), node_config=_ckks_node_config(ckks_deployment))
    assert [r.aborted for r in workflow.reports] == [None, None]
    assert [len(r.included) for r in workflow.reports] == [nodes, nodes - 1]
    assert workflow.reports[1].dropped[grid.node_ids[3]].startswith("ckks.upload")
    assert np.max(np.abs(plain[0])) > 1e-2
    np.testing.assert_allclose(secure[0], plain[0], rtol=0, atol=_ckks_error_bound(workflow, plain))
    # a round: hello and upload to every node, keys to the key holder, and -- every upload
    # forwarded in a message of its own -- one ckks.decrypt message per upload in the sum
    assert grid.messages_sent == (nodes + 1 + nodes + nodes) + (nodes + 1 + nodes + (nodes - 1))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == 2
        assert [r.released_participants for r in ledger.rows()] == [nodes, nodes - 1]
        assert all("ckks" in r.note for r in ledger.rows())


class ForgingCkksWorkflow(SecAggWorkflow):
    """A lying server: in place of the sum of the uploads it sends the key holder a ciphertext of
    its own making (chosen values encrypted under the round's public key, which it relays), signed
    as the aggregate over every node -- what a chosen-ciphertext key-recovery attack needs decrypted."""

    def _collect(self, grid, rnd, sends, report, **kwargs):
        stage = next(iter(sends.values()))[0]
        if stage == "ckks.upload":
            self.public_context = next(iter(sends.values()))[1]
        if stage == "ckks.decrypt":
            sends = {nid: (stage, self._forge(payload)) for nid, (stage, payload) in sends.items()}
        return super()._collect(grid, rnd, sends, report, **kwargs)

    def _forge(self, payload: bytes) -> bytes:
        import tenseal as ts

        from secagg.ckks.messages import (
            CkksDecryptRequest,
            HeAggregateHeader,
            HeCiphertexts,
            HeContext,
            chunks_digest,
        )
        from secagg.ckks.roles import SERVER_ID as HE_SERVER

        request = wire.decode(payload, expect=CkksDecryptRequest)
        outer = wire.decode(request.aggregate, expect=HeCiphertexts)
        _, honest = wire.open_sealed(outer.header, lambda _: self._credentials.identity.public_bytes,
                                     expect=HeAggregateHeader)
        context = wire.decode(wire.unverified_envelope(self.public_context)[1], expect=HeContext)  # relayed, public
        public = ts.context_from(context.context)
        chunks = (ts.ckks_vector(public, [1e-3] * honest.dim).serialize(),)  # the server's chosen plaintext
        header = HeAggregateHeader(honest.round_id, honest.fingerprint, honest.dim, honest.weighted, honest.included,
                                   len(chunks), chunks_digest(b"aggregate", chunks))
        forged = wire.encode(HeCiphertexts(wire.seal(header, HE_SERVER, self._credentials.identity), chunks))
        return wire.encode(CkksDecryptRequest(request.round, request.index, request.count, forged, request.uploads))


def test_the_ckks_key_holder_refuses_a_ciphertext_the_server_built(ckks_deployment, tmp_path):
    workflow = ForgingCkksWorkflow(protection="ckks", credentials=ckks_deployment["server"], privacy=_plan(tmp_path))
    params, grid = run_in_process(secure=True, num_nodes=4, rounds=1, fit_workflow=workflow, kind="lsq",
                                  claimed=_claims(4), node_config=_ckks_node_config(ckks_deployment))
    report = workflow.reports[0]
    assert report.aborted is not None and "NotEnoughSurvivors" in report.aborted
    assert report.dropped[grid.node_ids[0]].startswith("ckks.decrypt: MaliciousServerDetected")
    assert "not the sum of the signed uploads" in report.dropped[grid.node_ids[0]]
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])  # nothing was released
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert [r.status for r in ledger.rows()] == ["aborted"]


@pytest.mark.slow  # Flower's simulation engine (Ray) with 10 supernodes: a few minutes on 2 cores
def test_flower_simulation_with_the_ckks_option_equals_plain_fedavg(ckks_deployment, tmp_path):
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'flwr[simulation]'")
    from flwr.simulation import run_simulation

    from federation.flower.mod import make_secagg_mod
    from tests.flower_harness import client_app, server_app

    nodes, rounds, drop = 10, 2, (2, 4)
    plain, _ = run_in_process(secure=False, num_nodes=nodes, rounds=rounds, drop=[drop], kind="lsq",
                              claimed=_claims(nodes))
    workflow = SecAggPlusWorkflow(protection="ckks", credentials=ckks_deployment["server"], privacy=_plan(tmp_path))
    # the simulation engine gives a node only its partition id: the mod maps it to the node's credentials
    configure = _ckks_node_config(ckks_deployment)
    mod = make_secagg_mod(node_config=lambda ctxt: configure(int(ctxt.node_config["partition-id"])))
    out: dict = {}
    run_simulation(
        server_app=server_app(rounds=rounds, num_nodes=nodes, fit_workflow=workflow, out=out, kind="lsq"),
        client_app=client_app(secure=True, drop=[drop], mod=mod, kind="lsq", claimed=_claims(nodes)),
        num_supernodes=nodes,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
    assert [r.aborted for r in workflow.reports] == [None] * rounds
    assert [len(r.included) for r in workflow.reports] == [nodes, nodes - 1]
    np.testing.assert_allclose(out["parameters"][0], plain[0], rtol=0, atol=_ckks_error_bound(workflow, plain))
    with Ledger.open(tmp_path / "ledger.db") as ledger:
        assert ledger.verify(recompute=True).releases == rounds
        assert [r.released_participants for r in ledger.rows()] == [nodes, nodes - 1]


def test_a_node_refuses_a_ckks_round_below_its_policys_minimum_sum(ckks_deployment):
    """Nodes that add their updates only to sums of at least 5: a 4-node round is refused by all."""
    from federation.flower.mod import make_secagg_mod
    from secagg.protocol import ClientPolicy

    workflow = SecAggPlusWorkflow(protection="ckks", credentials=ckks_deployment["server"])
    params, grid = run_in_process(secure=True, num_nodes=4, rounds=1, fit_workflow=workflow, kind="lsq",
                                  mod=make_secagg_mod(policy=ClientPolicy(min_participants=5)),
                                  node_config=_ckks_node_config(ckks_deployment))
    report = workflow.reports[0]
    assert report.aborted is not None and "did not send the round's keys" in report.aborted
    assert report.dropped[grid.node_ids[0]].startswith("ckks.keys: MaliciousServerDetected")
    assert "min_participants" in report.dropped[grid.node_ids[0]]
    np.testing.assert_array_equal(params[0], initial_parameters("lsq")[0])
