"""CurveZMQ keys shipped as a Kubernetes Secret volume, as deploy/k8s/ mounts them.

The kubelet writes a Secret volume as: the files in a hidden timestamped directory, `..data` a
symlink to it, each key a symlink `name -> ..data/name`; `defaultMode` sets the files' mode and a pod
`fsGroup` adds group read and gives them that group. These tests build that layout with real files
and check which of them the key loader accepts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from popo.common.keys import KeysError, create_keys, load_keypair, public_path, secret_path

REPO = Path(__file__).resolve().parents[2]


def _secret_volume(src: Path, dst: Path, mode: int, gid: int | None = None) -> Path:
    """`dst` laid out as the kubelet lays out a Secret volume holding the key files of `src`."""
    stamp = dst / "..2026_12_01_21_00_00.123456789"
    stamp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        shutil.copyfile(f, stamp / f.name)
        os.chmod(stamp / f.name, mode)
        if gid is not None:
            os.chown(stamp / f.name, 0, gid)
        (dst / f.name).symlink_to(f"..data/{f.name}")
    (dst / "..data").symlink_to(stamp.name)
    return dst


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    create_keys(tmp_path / "made")
    return tmp_path / "made"


def test_secret_volume_with_restrictive_mode_loads(keys: Path, tmp_path: Path) -> None:
    """defaultMode 0400 (mode 0400), and 0400 with an fsGroup (the kubelet adds group read: 0440,
    group = the pod's fsGroup, here one of this process's groups) both load the same pair."""
    want = load_keypair(keys, "actor")
    for name, mode in (("plain", 0o400), ("fsgroup", 0o440)):
        vol = _secret_volume(keys, tmp_path / name, mode, gid=os.getegid())
        assert secret_path(vol, "actor").is_symlink()
        assert load_keypair(vol, "actor") == want, name


def test_secret_volume_with_default_mode_is_refused(keys: Path, tmp_path: Path) -> None:
    """Kubernetes' default 0644 (and 0644 with an fsGroup) is readable by every user of the node's
    container: refused, the error says which setting fixes it."""
    vol = _secret_volume(keys, tmp_path / "default", 0o644)
    with pytest.raises(KeysError, match=r"readable by others.*defaultMode: 0400"):
        load_keypair(vol, "learner")
    vol = _secret_volume(keys, tmp_path / "groupwrite", 0o460, gid=os.getegid())
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(vol, "learner")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another group needs root")
def test_secret_volume_of_a_foreign_group_is_refused(keys: Path, tmp_path: Path) -> None:
    """0440 is fine only when the group is the pod's own (fsGroup): a group this process is not in
    could be any other user's."""
    foreign = max([os.getegid(), *os.getgroups()]) + 4242
    vol = _secret_volume(keys, tmp_path / "foreign", 0o440, gid=foreign)
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(vol, "verifier")


def test_local_group_readable_key_is_still_refused(keys: Path, tmp_path: Path) -> None:
    """The Secret rule does not weaken the local one: a plain file, or a symlink that only looks
    like a Secret volume's (pointing outside `..data`), needs 0600."""
    os.chmod(secret_path(keys, "actor"), 0o640)
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(keys, "actor")
    # `..data` present, but the key links elsewhere
    fake = tmp_path / "fake"
    (fake / "real").mkdir(parents=True)
    (fake / "..data").symlink_to("real")
    shutil.copyfile(public_path(keys, "actor"), public_path(fake, "actor"))
    outside = tmp_path / "outside.key_secret"
    shutil.copyfile(secret_path(keys, "actor"), outside)
    os.chmod(outside, 0o440)
    secret_path(fake, "actor").symlink_to(outside)
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(fake, "actor")
    # a plain 0440 file inside a `..data` layout directory, not linked through `..data`
    plain = tmp_path / "plain"
    _secret_volume(keys, plain, 0o440, gid=os.getegid())
    secret_path(plain, "actor").unlink()
    shutil.copyfile(plain / "..data" / "actor.key_secret", secret_path(plain, "actor"))
    os.chmod(secret_path(plain, "actor"), 0o440)
    with pytest.raises(KeysError, match="readable by others"):
        load_keypair(plain, "actor")


def _pods(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def test_manifests_mount_the_keys_secret_read_only_with_mode_0400() -> None:
    """Every pod that runs roles mounts the keys Secret with defaultMode 0400 under an fsGroup,
    holding its roles' secret keys only (and every public key), where the job's config looks."""
    cluster = yaml.safe_load((REPO / "deploy/k8s/raycluster.yaml").read_text())
    job = yaml.safe_load((REPO / "deploy/k8s/rayjob.yaml").read_text())
    entry = job["spec"]["entrypoint"]
    keys_dir = entry.split("--transport.curve_keys_dir=")[1].split()[0]
    secrets = {}
    for name, pod in _pods(cluster):
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["name"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        keyvols = [v for v in vols.values() if "secret" in v and "curve" in v["name"]]
        if name == "head":  # the driver only: no role, no key
            assert not keyvols, keyvols
            continue
        assert len(keyvols) == 1, name
        vol = keyvols[0]
        assert vol["secret"]["defaultMode"] == 0o400, name
        assert pod["securityContext"]["fsGroup"] >= 1, name
        m = mounts[vol["name"]]
        assert m["mountPath"] == keys_dir and m["readOnly"] is True, name
        secrets[name] = sorted(i["path"] for i in vol["secret"]["items"])
    public = ["actor.key", "learner.key", "verifier.key"]
    assert secrets == {
        "learner": sorted([*public, "learner.key_secret", "verifier.key_secret"]),
        "actors": sorted([*public, "actor.key_secret"]),
    }, secrets
