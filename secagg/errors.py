"""Typed errors for the whole toolkit.

Every error says whose fault it is and what to do next. Crypto failures are opaque on
purpose (like `cryptography`'s ``InvalidToken``): they never reveal which check failed.
Validation never uses ``assert``; ``verify``-style functions raise, they do not return bool.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every error raised by secagg, privacy and federation."""


class ConfigError(SecAggError, ValueError):
    """A parameter or configuration is invalid; the message names the fix."""


class InputError(SecAggError, ValueError):
    """A client's input (an update vector) is unusable: wrong shape, NaN/inf, out of range."""


class OverflowRisk(InputError):
    """The sum of n encoded inputs could wrap around the modulus; raise bits or clip harder."""


class ProtocolError(SecAggError):
    """Abstract: the protocol cannot go on. Use a subclass that says whose fault it is."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """This party was asked to do something the protocol does not allow in its current state."""


class RemoteProtocolError(ProtocolError):
    """A peer (client or server) sent something the protocol does not allow."""

    def __init__(self, message: str, peer_id: int | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class UnexpectedMessage(RemoteProtocolError):
    """A message arrived that is illegal in the receiver's current state."""


class MaliciousServerDetected(RemoteProtocolError):
    """The server asked for something an honest server never asks for; the client aborted."""


class NotEnoughSurvivors(ProtocolError):
    """Fewer than the threshold t of clients remain; the round cannot be unmasked."""


class AlreadyFinalized(LocalProtocolError):
    """A one-shot secret (a share bundle, an unmask response) was requested a second time."""


class SessionAborted(LocalProtocolError):
    """The session hit an error earlier and is aborted; start a new session for the next round."""


class CryptoError(SecAggError):
    """Base class for cryptographic failures (opaque on purpose)."""


class InvalidSignature(CryptoError):
    """A signature did not verify: the message was forged, altered or signed by someone else."""


class InvalidPublicKey(CryptoError):
    """A public key is unusable (e.g. a low-order X25519 point that would make every shared secret zero)."""


class InvalidShare(CryptoError):
    """A secret share could not be decrypted or is inconsistent."""


class InvalidCiphertext(CryptoError):
    """A ciphertext is corrupted, truncated, oversized or made under another key."""


class KeyRoleError(CryptoError):
    """A party tried an operation its key role does not permit (e.g. the server decrypting)."""


class WireError(SecAggError, ValueError):
    """A message could not be decoded: malformed, oversized, wrong version or wrong schema."""


class ReplayError(WireError):
    """A message was seen before (same round, sender and type) or belongs to another round."""


class PrivacyError(SecAggError):
    """Base class for differential-privacy errors."""


class PrivacyBudgetExceeded(PrivacyError):
    """The planned spend would exceed the privacy budget; the round was refused before it ran."""


class LedgerIntegrityError(PrivacyError):
    """The ledger's hash chain is broken: a row was edited, inserted or deleted."""


class UnsupportedEventError(PrivacyError, ValueError):
    """An accountant was asked to account a mechanism it does not support."""


class DataError(SecAggError, FileNotFoundError):
    """A dataset is missing or malformed; the message names the files expected."""


class ConnectionLost(SecAggError):
    """A peer went away before the work was done and did not come back in time (e.g. the server
    stopped before its last round): start again once it is reachable, or allow a longer retry."""
