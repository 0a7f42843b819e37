"""Kubernetes-native distributed VGG16 transfer learning on tf.distribute."""

__version__ = "0.1.0"
