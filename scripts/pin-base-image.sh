#!/usr/bin/env bash
# Pin the Dockerfile's base image by digest: resolve the digest its tag points to now and rewrite
# `ARG BASE_IMAGE=image:tag` (what both FROMs use) to `image:tag@sha256:...`, dropping the
# "unpinned" marker. Needs the registry: run it where the registry is reachable, review the diff,
# commit. Run it again to move the pin (the tag is resolved afresh).
#
#   scripts/pin-base-image.sh              # the tag the Dockerfile names
#   scripts/pin-base-image.sh IMAGE:TAG    # another tag (a new TensorFlow: bump constraints.txt too)
#
# The digest is the tag's manifest list (index), as `docker pull image:tag` resolves it, so the pin
# holds for every platform. Tools, first found: crane, docker buildx imagetools, else curl against
# Docker Hub's registry API (images on Docker Hub only).
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=${DOCKERFILE:-Dockerfile}  # tests pin a copy
current=$(sed -n 's/^ARG BASE_IMAGE=//p' "$dockerfile")
[ -n "$current" ] || { echo "pin-base-image: no 'ARG BASE_IMAGE=' line in $dockerfile" >&2; exit 1; }
image=${1:-${current%@*}}  # the tag, without any old digest
name=${image%:*} tag=${image##*:}
[ "$name" != "$image" ] && [[ $tag != */* ]] || { echo "pin-base-image: '$image' is not IMAGE:TAG" >&2; exit 1; }

if command -v crane >/dev/null 2>&1; then
  digest=$(crane digest "$image")
elif command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
  digest=$(docker buildx imagetools inspect "$image" --format '{{json .Manifest.Digest}}' | tr -d '"')
else
  # Docker Hub: an anonymous pull token, then HEAD of the manifest; the digest is in a header.
  [[ $name != *.*/* ]] || { echo "pin-base-image: $name is not on Docker Hub; install crane or docker buildx" >&2; exit 1; }
  repo=$name
  [[ $repo == */* ]] || repo=library/$repo
  unreachable="pin-base-image: Docker Hub unreachable from here; run this where the registry is reachable"
  token=$(curl -fsS "https://auth.docker.io/token?service=registry.docker.io&scope=repository:$repo:pull") ||
    { echo "$unreachable" >&2; exit 1; }
  token=$(printf '%s' "$token" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
  digest=$(curl -fsSI -H "Authorization: Bearer $token" \
    -H "Accept: application/vnd.oci.image.index.v1+json" \
    -H "Accept: application/vnd.docker.distribution.manifest.list.v2+json" \
    -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    -H "Accept: application/vnd.docker.distribution.manifest.v2+json" \
    "https://registry-1.docker.io/v2/$repo/manifests/$tag" |
    tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p') || { echo "$unreachable" >&2; exit 1; }
fi
[[ $digest =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin-base-image: no digest for $image (got '$digest')" >&2; exit 1; }

sed -i -e "s|^ARG BASE_IMAGE=.*|ARG BASE_IMAGE=$image@$digest|" -e '/^# unpinned: run scripts\/pin-base-image.sh/d' "$dockerfile"
echo "pin-base-image: $image@$digest in $dockerfile"
