"""Give ``opentelemetry-proto`` its own files back after an install.

``xds-protos`` (the Envoy messages the EPP speaks) ships a copy of the OpenTelemetry
protos under the same module paths as ``opentelemetry-proto`` (``opentelemetry/proto/``),
and its copy is older: the OTLP exporter behind ``--tracing`` fails to import
(``InstrumentationScope``) when pip happens to unpack ``xds-protos`` last. Which one pip
unpacks last changes with the resolver's order, so the install steps (``make install``,
the Dockerfile) run this module afterwards: it compares the files on disk with
``opentelemetry-proto``'s own record and, when any differ, reinstalls that exact version
without dependencies. Envoy's own messages only use fields the newer copy still has.

    python -m epp.devtools.otel_protos
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from importlib import metadata

DISTRIBUTION = "opentelemetry-proto"


def overwritten_files(dist: metadata.Distribution) -> list[str]:
    """The files of ``dist`` whose content no longer matches the hash in its RECORD."""
    changed = []
    for entry in dist.files or ():
        if entry.hash is None or entry.hash.mode != "sha256":
            continue
        path = entry.locate()
        try:
            data = path.read_bytes()
        except OSError:
            changed.append(str(entry))
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        if digest.decode() != entry.hash.value:
            changed.append(str(entry))
    return changed


def main() -> int:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return 0  # no tracing extra installed: nothing to restore
    changed = overwritten_files(dist)
    if not changed:
        return 0
    print(f"{DISTRIBUTION} {dist.version}: {len(changed)} files were overwritten by another "
          f"distribution (e.g. {changed[0]}); reinstalling it", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--force-reinstall", f"{DISTRIBUTION}=={dist.version}"], check=True)
    still = overwritten_files(metadata.distribution(DISTRIBUTION))
    if still:
        print(f"{DISTRIBUTION}: still overwritten after reinstalling: {still[:3]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
