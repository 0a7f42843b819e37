"""Download one weights file into a directory and verify its size and hashes (the image's weights stage).

    VGG16_NOTOP_URL=... VGG16_NOTOP_MD5=... VGG16_NOTOP_SIZE=... [VGG16_NOTOP_SHA256=...] python3 fetch_weights.py DIR

Standard library only: it runs in the bare base image, before the trainer is installed. A file
that fails a check ends the build (exit 1, one `error:` line), so no image bakes wrong weights.
tests/chart/test_chart_image.py runs it on a file:// URL.
"""

import hashlib
import os
import sys
import urllib.request


def problems_of(data: bytes) -> list[str]:
    md5, sha256 = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    found = []
    if len(data) != int(os.environ["VGG16_NOTOP_SIZE"]):
        found.append(f"size {len(data)} != {os.environ['VGG16_NOTOP_SIZE']}")
    if md5 != os.environ["VGG16_NOTOP_MD5"]:
        found.append(f"md5 {md5} != {os.environ['VGG16_NOTOP_MD5']}")
    # The SHA-256 is optional: Keras publishes only an MD5 for this file.
    if os.environ.get("VGG16_NOTOP_SHA256") and sha256 != os.environ["VGG16_NOTOP_SHA256"]:
        found.append(f"sha256 {sha256} != {os.environ['VGG16_NOTOP_SHA256']}")
    return found


def main(directory: str) -> None:
    url = os.environ["VGG16_NOTOP_URL"]
    target = os.path.join(directory, url.rsplit("/", 1)[1])
    urllib.request.urlretrieve(url, target)
    with open(target, "rb") as f:
        data = f.read()
    print(
        f"{target}: {len(data)} bytes, md5 {hashlib.md5(data).hexdigest()}, sha256 {hashlib.sha256(data).hexdigest()}"
    )
    problems = problems_of(data)
    if problems:
        os.remove(target)
        sys.exit(f"error: {url} failed verification: {'; '.join(problems)}")


if __name__ == "__main__":
    main(sys.argv[1])
