"""Signing with GnuPG: the signing key checked before any work (require_key), SHA256SUMS signed
detached and armored (sign), and a signature verified against a key file or a fingerprint
(verify_signature)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import PipelineError
from ..run import run

FINGERPRINT = re.compile(r"[0-9A-F]{40}|[0-9A-F]{64}")  # v4 and v5 OpenPGP keys
SUMS = "SHA256SUMS"  # what is signed: a version's checksums (pipeline.publish.verify)
SIGNATURE = "SHA256SUMS.asc"


def _gpg_env(gnupg_home: Path | None) -> dict[str, str]:
    return {"GNUPGHOME": str(gnupg_home)} if gnupg_home else {}


def gnupg_home_of(given: Path | None) -> Path | None:
    """The GnuPG home given, else $GNUPGHOME: the gateway's clean environment drops it."""
    home = given or os.environ.get("GNUPGHOME")
    return Path(home) if home else None


def require_key(key: str | None, gnupg_home: Path | None = None) -> str:
    """The fingerprint of the one secret key `key` names that can sign, or a one-line error."""
    if not key:
        raise PipelineError("no signing key given: pass --key FINGERPRINT or EMAIL (gpg --list-secret-keys shows them)")
    where = f" in GNUPGHOME {gnupg_home}" if gnupg_home else " in ~/.gnupg"
    if gnupg_home and not Path(gnupg_home).is_dir():
        raise PipelineError(f"GNUPGHOME {gnupg_home} is not a directory")
    listing = run(["gpg", "--batch", "--with-colons", "--list-secret-keys", "--", key],
                  env=_gpg_env(gnupg_home), capture=True, check=False)
    keys = []  # (fingerprint, capabilities) of each primary secret key
    for line in listing.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "sec":
            keys.append(["", fields[11] if len(fields) > 11 else ""])
        elif fields[0] == "fpr" and keys and not keys[-1][0]:
            keys[-1][0] = fields[9]
    if listing.returncode != 0 or not keys:
        raise PipelineError(f"signing key {key!r} not found{where}: gpg --list-secret-keys shows the keys there")
    if len(keys) > 1:
        raise PipelineError(f"signing key {key!r} matches {len(keys)} secret keys{where}: give a fingerprint")
    fingerprint, capabilities = keys[0]
    if "S" not in capabilities:
        raise PipelineError(f"signing key {key!r} ({fingerprint}){where} cannot sign: "
                            "expired, revoked or without a signing subkey")
    return fingerprint


def sign(sums: Path, fingerprint: str, gnupg_home: Path | None = None) -> Path:
    """A detached, armored signature of `sums` beside it, checked with gpg --verify."""
    signature = sums.with_name(SIGNATURE)
    run(["gpg", "--batch", "--yes", "--local-user", fingerprint, "--armor", "--detach-sign",
         "--output", signature, sums], env=_gpg_env(gnupg_home))
    verify_signature(sums.read_bytes(), signature, fingerprint, gnupg_home)
    return signature


def _fingerprints(gnupg_home: Path) -> set[str]:
    listing = run(["gpg", "--batch", "--with-colons", "--list-keys"], env=_gpg_env(gnupg_home), capture=True)
    return {line.split(":")[9] for line in listing.stdout.splitlines() if line.startswith("fpr:")}


@contextlib.contextmanager
def _verifying_keys(key: str, gnupg_home: Path | None) -> Iterator[tuple[Path | None, set[str]]]:
    """(GnuPG home, the fingerprints a good signature may be by) for `key`: a key file, imported
    into a throw-away home that holds nothing else, or a full fingerprint of a key in gnupg_home."""
    if Path(key).is_file():
        home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))  # short: gpg-agent's socket lives in it
        try:
            imported = run(["gpg", "--batch", "--import", "--", Path(key).resolve()], env=_gpg_env(home),
                           check=False, capture=True)
            allowed = _fingerprints(home) if imported.returncode == 0 else set()
            if not allowed:
                raise PipelineError(f"verify key {key}: no OpenPGP public key in the file")
            yield home, allowed
        finally:
            remove_gpg_home(home)
    elif FINGERPRINT.fullmatch(key.upper()):
        yield gnupg_home, {key.upper()}
    else:
        raise PipelineError(f"verify key {key!r}: neither a file nor a full fingerprint (40 hex digits): give "
                            "the public key that signs the published versions")


def verify_signature(data: bytes, signature: Path, key: str, gnupg_home: Path | None = None) -> str:
    """The fingerprint that made `signature`, a good detached signature over `data` by `key` (a key
    file or a full fingerprint); any other signature is a one-line error naming the file."""
    if not signature.is_file():
        raise PipelineError(f"{signature} is missing: {signature.with_name(SUMS)} is not signed")
    with _verifying_keys(key, gnupg_home) as (home, allowed):
        # The data on stdin: what is verified is exactly what the caller goes on to read.
        result = run(["gpg", "--batch", "--status-fd", "1", "--verify", "--", signature, "-"], env=_gpg_env(home),
                     input=data, capture=True, check=False)
    status = [line.split()[1:] for line in result.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    valid = [fields for fields in status if fields[0] == "VALIDSIG" and len(fields) > 2]
    signers = {fields[1] for fields in valid} | {fields[-1] for fields in valid}
    if result.returncode == 0 and any(fields[0] == "GOODSIG" for fields in status) and signers & allowed:
        return (signers & allowed).pop()
    if any(fields[0] == "BADSIG" for fields in status):
        problem = f"a bad signature: {signature.with_name(SUMS).name} was changed after it was signed"
    elif valid:
        problem = f"signed by {valid[0][-1]}, not by the key given"
    else:
        problem = (result.stderr.strip().splitlines() or [f"gpg exited {result.returncode}"])[-1]
    raise PipelineError(f"{signature}: not a good signature by {key}: {problem}")


def make_gpg_home() -> tuple[Path, str]:
    """A throw-away GNUPGHOME (a short path: gpg-agent's socket lives in it) with one signing key,
    and the key's email: for the benchmark's publishes and the tests."""
    home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
    email = "publish-test@example.invalid"
    run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"Publish Test <{email}>",
         "ed25519", "sign", "never"], env={"GNUPGHOME": str(home)})
    return home, email


def remove_gpg_home(home: Path) -> None:
    """Remove a throw-away GnuPG home, and the agent gpg started for it."""
    run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
    shutil.rmtree(home, ignore_errors=True)
