"""Download one weights file into a directory and verify its size and hashes (the image's weights stage).

    VGG16_NOTOP_URL=... VGG16_NOTOP_MD5=... VGG16_NOTOP_SIZE=... [VGG16_NOTOP_SHA256=...] python3 fetch_weights.py DIR

The size and the MD5 are always checked: the MD5 is the one Keras publishes for the file (the
hash tf_keras itself verifies), so it holds even before anyone has pinned a SHA-256. The SHA-256
is checked when VGG16_NOTOP_SHA256 is set; the step always prints the SHA-256 it computed, so the
first build tells the value to pin (docs/operations.md, "The image's supply chain").

Standard library only: it runs in the bare base image, before the trainer is installed. A file
that fails a check ends the build (exit 1, one `error:` line), so no image bakes wrong weights.
tests/chart/test_chart_image.py runs it on a file:// URL.
"""

import hashlib
import os
import sys
import urllib.request


def problems_of(data: bytes, md5: str, sha256: str) -> list[str]:
    expected_size, expected_md5 = os.environ["VGG16_NOTOP_SIZE"], os.environ["VGG16_NOTOP_MD5"].lower()
    expected_sha256 = os.environ.get("VGG16_NOTOP_SHA256", "").strip().lower()
    found = []
    if len(data) != int(expected_size):
        found.append(f"size {len(data)} != {expected_size}")
    if md5 != expected_md5:
        found.append(f"md5 {md5} != {expected_md5}")
    if expected_sha256 and sha256 != expected_sha256:
        found.append(f"sha256 {sha256} != {expected_sha256}")
    return found


def main(directory: str) -> None:
    url = os.environ["VGG16_NOTOP_URL"]
    target = os.path.join(directory, url.rsplit("/", 1)[1])
    urllib.request.urlretrieve(url, target)
    with open(target, "rb") as f:
        data = f.read()
    md5, sha256 = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    print(f"{target}: {len(data)} bytes, md5 {md5}, sha256 {sha256}")
    problems = problems_of(data, md5, sha256)
    if problems:
        os.remove(target)
        sys.exit(f"error: {url} failed verification: {'; '.join(problems)}")
    if os.environ.get("VGG16_NOTOP_SHA256", "").strip():
        print("verified: size, md5 (Keras' published hash) and the pinned sha256")
    else:
        # Printed on every unpinned build, so the value to pin is in the build log.
        print(f"verified: size and md5 (Keras' published hash); sha256 not pinned: pin VGG16_NOTOP_SHA256={sha256}")


if __name__ == "__main__":
    main(sys.argv[1])
