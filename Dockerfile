# syntax=docker/dockerfile:1.7
# The trainer's container image: GPU TensorFlow, the trainer installed from a hashed lock of the
# pinned versions of constraints.txt (docker/requirements.lock), the VGG16 "notop" ImageNet
# weights baked in (pods start without downloads; air-gapped clusters work), a fixed non-root
# user, `trainer` as the entrypoint.
#
#   docker build -t REGISTRY/vgg-trainer:0.1.0 .
#   docker run --rm --gpus all REGISTRY/vgg-trainer:0.1.0 config
#
# tests/chart/test_chart_image.py keeps this file in step with pyproject.toml, constraints.txt, the lock,
# trainer/contract.py and the Helm chart (versions, user id, entrypoint, ports, weights path) and
# runs hadolint on it (accepted rule ignores, with reasons: .hadolint.yaml).
# Supply chain (docs/operations.md, "The image's supply chain"): the base image by digest, every
# Python package by SHA-256, the weights by Keras' MD5 and, once pinned, by SHA-256.

# The TensorFlow version of the base image must equal the tensorflow pin in constraints.txt. It is
# pinned by digest (image:tag@sha256:...) by scripts/pin-base-image.sh, which needs the registry;
# until then the line below says so, and tests/chart/test_chart_image.py accepts the tag alone.
# unpinned: run scripts/pin-base-image.sh on a machine with registry access
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu

# --------------------------------------------------------------------------- weights
FROM ${BASE_IMAGE} AS weights
# The file and the hash tf_keras.applications.vgg16 uses for include_top=False (Keras publishes an
# MD5 for it, checked on every build). Its SHA-256 is checked once pinned: the step prints the
# SHA-256 it computed (`docker build --progress=plain`); set it as VGG16_NOTOP_SHA256's default
# below (or pass --build-arg VGG16_NOTOP_SHA256=<hex>). docker/fetch_weights.py fails the build on
# a mismatch of the size, the MD5 or a pinned SHA-256.
ARG VGG16_NOTOP_URL=https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
ARG VGG16_NOTOP_MD5=6d6bbae143d832006294945121d1f1fc
ARG VGG16_NOTOP_SHA256=
ARG VGG16_NOTOP_SIZE=58889256
COPY docker/fetch_weights.py /usr/local/bin/
RUN mkdir -p /weights && python3 /usr/local/bin/fetch_weights.py /weights

# --------------------------------------------------------------------------- image
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="vgg-trainer" \
      org.opencontainers.image.description="Distributed VGG16 transfer learning with tf.distribute (MultiWorkerMirroredStrategy), run as a Kubernetes Indexed Job" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# MPLCONFIGDIR: matplotlib (the training-curves PNG) needs a writable cache; the root filesystem is read-only.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=1 \
    HOME=/home/trainer \
    MPLCONFIGDIR=/tmp/matplotlib

# The fixed non-root user the chart's securityContext runs as (trainer/contract.py CONTAINER_UID/GID).
RUN groupadd --gid 10001 trainer \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/trainer \
      --shell /usr/sbin/nologin trainer

# The project's runtime dependencies at the versions of constraints.txt, each wheel checked against
# its SHA-256 in docker/requirements.lock (scripts/lock.sh writes it). --no-deps: the lock is the
# whole resolution, nothing else may come in. Not in the lock: tensorflow and its CUDA libraries,
# the base image's (pinned by its digest). The lock carries the build backend too, so the project
# itself builds without isolation and fetches nothing unhashed; pip check then proves the result
# complete and consistent, as pip's resolver would have.
WORKDIR /tmp/vgg-trainer-src
COPY pyproject.toml README.md ./
COPY docker/requirements.lock ./docker/
COPY trainer ./trainer
RUN python3 -c "import sys; sys.exit(None if sys.version_info >= (3, 11) else 'error: the base image has Python ' + sys.version.split()[0] + '; the trainer needs >= 3.11')" \
 && python3 -m pip install --require-hashes --no-deps --only-binary=:all: -r docker/requirements.lock \
 && python3 -m pip install --no-deps --no-build-isolation . \
 && python3 -m pip check \
 && python3 -c "import tensorflow as tf, tf_keras; v = tf.__version__; print('tensorflow', v, 'tf_keras', tf_keras.__version__); assert tf_keras.__version__.split('.')[:2] == v.split('.')[:2], 'tf_keras does not match tensorflow'" \
 && trainer config > /dev/null \
 && rm -rf /tmp/vgg-trainer-src

# The weights at the fixed path the chart's default model.weights names (contract BAKED_WEIGHTS_PATH),
# and in the Keras cache, so `model.weights: imagenet` finds them too where $HOME is writable.
COPY --from=weights /weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 /opt/vgg-trainer/weights/
RUN chmod 0444 /opt/vgg-trainer/weights/*.h5 \
 && mkdir -p /home/trainer/.keras/models \
 && ln -s /opt/vgg-trainer/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 /home/trainer/.keras/models/ \
 && chown -R 10001:10001 /home/trainer

WORKDIR /home/trainer
USER 10001:10001
# Worker port (tf.distribute collectives) and Prometheus metrics port (trainer/contract.py).
EXPOSE 2222 9090
ENTRYPOINT ["trainer"]
CMD ["--help"]
