"""Transports: move the protocol sessions' sealed bytes between machines; no protocol logic here.

* :mod:`.certs` -- CA, client/server certificates; a client certificate binds the client id
  to its Ed25519 protocol identity (``secagg certs``).
* :mod:`.grpc_server`, :mod:`.grpc_client` -- gRPC with mutual TLS, chunked payloads, stage
  timeouts, size and rate limits (``secagg serve`` / ``secagg join``).
* the protocols themselves are not here: a transport is a link of :mod:`secagg.rounds`
  (the modes ``masking``, ``ckks`` and the insecure ``none`` baseline live in the core,
  and :func:`secagg.rounds.drive` is the one loop that runs a round).
* :mod:`.training` -- the federation engine with clients training on their own hosts.
* :mod:`.ray_backend` -- client sessions on Ray actors; ``RayExecutor`` / ``RayAggregator``
  for the engine.

See docs/deployment.md. Optional extras: ``grpc`` (and ``he`` for CKKS), ``ray``.
"""
