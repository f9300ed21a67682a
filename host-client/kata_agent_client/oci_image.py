"""An offline busybox image for containerd: an OCI image layout archive made from the host's
busybox-static (the rootfs of ``kata_agent_client.bundle``), for ``ctr image import``.

    python3 -m kata_agent_client.oci_image busybox.tar [--name docker.io/library/kata-busybox:latest]
    ctr image import busybox.tar

The archive holds ``oci-layout``, ``index.json`` and ``blobs/sha256/``: one image config, one
manifest and one uncompressed layer (a tar of the rootfs, owned by root, every mtime 0, so the same
busybox always gives the same digests). The index names the image for containerd
(``io.containerd.image.name``) and for OCI tools (``org.opencontainers.image.ref.name``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

from kata_agent_client.bundle import BundleError, make_rootfs

DEFAULT_NAME = "docker.io/library/kata-busybox:latest"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def _layer(rootfs: Path) -> bytes:
    """The rootfs as a tar: sorted, root-owned, mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build(out: Path, name: str = DEFAULT_NAME, busybox: str | None = None, arch: str | None = None) -> dict:
    """Write the archive to ``out``; returns the manifest's descriptor."""
    arch = GOARCH.get(arch or platform.machine(), arch or platform.machine())
    with tempfile.TemporaryDirectory(prefix="oci-busybox-") as tmp:
        layer = _layer(make_rootfs(Path(tmp) / "rootfs", busybox))
    blobs: dict[str, bytes] = {}
    layer_desc = _blob(blobs, layer, MEDIA_LAYER)
    config = {
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},  # uncompressed: the same
        "history": [{"created_by": "kata_agent_client.oci_image (busybox-static)"}],
    }
    config_desc = _blob(blobs, json.dumps(config, sort_keys=True).encode(), MEDIA_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    manifest_desc = _blob(blobs, json.dumps(manifest, sort_keys=True).encode(), MEDIA_MANIFEST)
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [{
        **manifest_desc, "platform": {"architecture": arch, "os": "linux"},
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}}]}
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index, sort_keys=True).encode()}
    files.update({f"blobs/sha256/{d.split(':', 1)[1]}": data for d, data in blobs.items()})
    out = Path(out)
    tmp_out = out.with_name(out.name + ".tmp")
    try:
        with tarfile.open(tmp_out, "w") as tar:
            for d in ("blobs", "blobs/sha256"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        tmp_out.replace(out)
    except BaseException:
        tmp_out.unlink(missing_ok=True)  # a full disk, a cancel: no half archive left
        raise
    return manifest_desc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the archive to write")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"the image's name (default {DEFAULT_NAME})")
    a = p.parse_args(argv)
    try:
        desc = build(a.out, a.name)
    except (BundleError, OSError) as exc:
        print(f"oci_image: {exc}", file=sys.stderr)
        return 1
    print(f"{a.out}: {a.name} {desc['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
