"""CurveZMQ keys of a cluster (`popo keys`), and who holds which.

One key pair per role kind: `learner`, `verifier`, `actor`. A role uses its pair both as a Curve
server (on the endpoints it binds) and as a Curve client (on the endpoints it connects to), so a
cluster needs three pairs, whatever its number of actors or verifier replicas:

| endpoint | server (binds, its secret key) | allowed clients (public keys)  |
| -------- | ------------------------------ | ------------------------------ |
| dispatch | learner                        | actor                          |
| rollouts | verifier                       | actor                          |
| ingest   | learner                        | verifier                       |
| weights  | learner                        | actor                          |

Files (ZeroMQ certificate format, readable by `zmq.auth.load_certificate`):
`<dir>/<role>.key` (public, mode 0644) and `<dir>/<role>.key_secret` (public + secret, mode 0600).
Copy every `*.key` to every node and each `<role>.key_secret` only to the nodes running that role:
a node holding only `actor.key_secret` can lease prompts and push rollouts, nothing else.

On Kubernetes the keys are a Secret volume (deploy/k8s/): the kubelet writes the files into a
hidden timestamped directory, points `..data` at it and makes each key name a symlink
`<role>.key_secret -> ..data/<role>.key_secret`. With `defaultMode: 0400` and a pod `fsGroup` the
kubelet makes a secret file root-owned, mode 0440, group fsGroup: readable by the pod's processes
only. The loader accepts exactly that (see `_secret_volume_ok`); a plain file still needs 0600.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Literal

import zmq

Role = Literal["learner", "verifier", "actor"]
ROLES: tuple[Role, ...] = ("learner", "verifier", "actor")


class KeysError(RuntimeError):
    """A key file is missing, unreadable or malformed, or would be overwritten."""


def public_path(keys_dir: str | Path, role: Role) -> Path:
    return Path(keys_dir) / f"{role}.key"


def secret_path(keys_dir: str | Path, role: Role) -> Path:
    return Path(keys_dir) / f"{role}.key_secret"


def _cert_text(role: Role, public: bytes, secret: bytes | None) -> str:
    kind = "Secret" if secret is not None else "Public"
    lines = [
        f"#   ZeroMQ CURVE {kind} Certificate of the POPO-RL `{role}` role ({_now()}, popo keys)",
        "#   DO NOT share this file." if secret is not None else "#   Copy to every node.",
        "",
        "metadata",
        f"    role = {role}",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write under a temporary name created with `mode` (never world-readable in between), fsync,
    rename over `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (never widened) the mode
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def create_keys(keys_dir: str | Path, force: bool = False) -> list[Path]:
    """Create one Curve key pair per role kind in `keys_dir` (made with mode 0700 if missing).

    Refuses (KeysError, nothing written) if any key file already exists, unless `force`.
    Returns the files written.
    """
    d = Path(keys_dir)
    targets = [p for r in ROLES for p in (public_path(d, r), secret_path(d, r))]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise KeysError(
            f"{existing[0]} already exists ({len(existing)} key files in {d}); "
            "pass --force to replace every key of the cluster"
        )
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for role in ROLES:
        public, secret = zmq.curve_keypair()
        # Secret first: a crash in between leaves at worst a pair whose public half is stale,
        # which `load_keypair` detects, never a public key with no secret.
        _write_atomic(secret_path(d, role), _cert_text(role, public, secret), 0o600)
        _write_atomic(public_path(d, role), _cert_text(role, public, None), 0o644)
        written += [secret_path(d, role), public_path(d, role)]
    from popo.common.weights import fsync_dir

    fsync_dir(d)
    return written


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    from zmq.auth import load_certificate

    try:
        public, secret = load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"{path}: {e}") from None
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise KeysError(f"{path}: not a Z85 Curve key (40 characters)")
    return public, secret


def _in_secret_volume(path: Path) -> bool:
    """Whether `path` is a key of a Kubernetes Secret (or projected) volume: a symlink
    `name -> ..data/name` next to a `..data` symlink, the layout the kubelet's atomic writer makes."""
    data = path.parent / "..data"
    if not (path.is_symlink() and data.is_symlink()):
        return False
    return os.readlink(path) == f"..data/{path.name}" and path.resolve().parent == data.resolve()


def _secret_volume_ok(path: Path, st: os.stat_result) -> bool:
    """A group-readable secret file is accepted only as the kubelet writes it for a Secret volume
    with `defaultMode: 0400` and a pod `fsGroup`: in the volume's layout, mode 0440 exactly (no
    world bits, no group write), owned by root (the kubelet) or this user, and its group one this
    process belongs to (the pod's fsGroup) — so only the pod's own processes can read it."""
    mode = st.st_mode & 0o777
    if mode & 0o037 or not _in_secret_volume(path):
        return False
    ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    return ours and st.st_uid in (0, os.geteuid())


def load_public(keys_dir: str | Path, role: Role) -> bytes:
    """The Z85 public key of `role`."""
    path = public_path(keys_dir, role)
    if not path.is_file():
        raise KeysError(f"{path}: no such key file (create the keys with `popo keys`)")
    return _read_cert(path)[0]


def load_keypair(keys_dir: str | Path, role: Role) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of `role`, from its secret file. Refuses a secret file that other
    users may read, and a pair whose public half disagrees with `<role>.key`."""
    path = secret_path(keys_dir, role)
    if not path.is_file():
        raise KeysError(
            f"{path}: no such key file: this node holds no secret key of the {role} role"
        )
    st = path.stat()
    if st.st_mode & 0o077 and not _secret_volume_ok(path, st):
        raise KeysError(
            f"{path}: secret key is readable by others (chmod 600 it; in a Kubernetes Secret "
            "volume set defaultMode: 0400)"
        )
    public, secret = _read_cert(path)
    if secret is None:
        raise KeysError(f"{path}: holds no secret-key")
    if zmq.curve_public(secret) != public:
        raise KeysError(f"{path}: public-key does not match its secret-key")
    pub_file = public_path(keys_dir, role)
    if pub_file.is_file() and _read_cert(pub_file)[0] != public:
        raise KeysError(f"{pub_file}: does not match {path.name} (keys from two different runs)")
    return public, secret
