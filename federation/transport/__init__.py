"""Transports: move the protocol sessions' sealed bytes between machines; no protocol logic here.

* :mod:`.certs` -- CA, client/server certificates; a client certificate binds the client id
  to its Ed25519 protocol identity (``secagg certs``).
* :mod:`.grpc_server`, :mod:`.grpc_client` -- gRPC with mutual TLS, chunked payloads, stage
  timeouts, size and rate limits (``secagg serve`` / ``secagg join``).
* :mod:`.rounds` -- the seam between a transport and a protocol (``ServerRound`` /
  ``ClientRound``), with the modes :mod:`.masking_mode`, :mod:`.ckks_mode` and the insecure
  ``plain`` baseline.
* :mod:`.training` -- the federation engine with clients training on their own hosts.
* :mod:`.ray_backend` -- client sessions on Ray actors; ``RayExecutor`` / ``RayAggregator``
  for the engine.

See docs/deployment.md. Optional extras: ``grpc`` (and ``he`` for CKKS), ``ray``.
"""
